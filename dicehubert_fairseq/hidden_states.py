"""Hidden states of a HuBERT-family model (fairseq ``hubert`` or ``dicehubert_student``), up to a layer.

The one path this project takes to a model's layer outputs: the student's training forward
(L_SSL and L_feat), the frozen teacher of L_feat, ``dicehubert-labels``' teacher features and
the phone probe all call :func:`hidden_states`.

It runs fairseq's own building blocks in ``HubertModel.forward``'s order -- ``forward_features``,
``forward_targets``, the feature penalty, ``layer_norm``, ``forward_padding_mask``,
``post_extract_proj``, ``dropout_input``, ``apply_mask`` -- then fairseq's encoder, stopped at
``output_layer`` with its own ``layer=`` argument (as ``extract_features(output_layer=L)``).
Every layer's output is taken by forward hooks, so the encoder (transformer, conformer or the
convolution-only blocks of ``layer_type=conv``, LayerDrop, activation checkpointing) runs
unchanged; a layer skipped by LayerDrop passes its input on, and so does its hidden state.
``HubertModel.forward`` itself cannot serve: it keeps neither the layer outputs, the mask nor the
aligned targets.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .frames import conv_layers, conv_output_length, padding_mask_of


@dataclass
class HiddenStates:
    """What :func:`hidden_states` returns (``B`` utterances, ``T`` frames, ``D`` model dim).

    Attributes:
        x: ``(B, T, D)`` the encoder's output, as ``HubertModel.forward(output_layer=...)``
            computes it: layer ``output_layer``'s output, or with ``output_layer=None`` the last
            layer's (through the encoder's final layer norm when ``layer_norm_first``).
        layers: the outputs of transformer layers ``1..L``, ``(B, T, D)`` each, layer 1 first.
        features: ``(B, T, D)`` the transformer's input: the conv features after ``layer_norm``,
            ``post_extract_proj`` and ``dropout_input``, masked frames replaced when masking
            (the probe's hidden state 0, as s3prl's HuBERT upstream).
        padding_mask: ``(B, T)`` bool, True on padded frames.
        mask_indices: ``(B, T)`` bool, True on masked frames (all False without masking).
        features_pen: scalar, HuBERT's feature penalty (mean squared conv feature).
        target_list: the ``target_list`` given, aligned to the frames by ``forward_targets``
            (``None`` if none was given).
    """

    x: torch.Tensor
    layers: List[torch.Tensor]
    features: torch.Tensor
    padding_mask: torch.Tensor
    mask_indices: torch.Tensor
    features_pen: torch.Tensor
    target_list: Optional[List[torch.Tensor]] = None


def hidden_states(
    model: nn.Module,
    source: torch.Tensor,
    padding_mask: Optional[torch.Tensor] = None,
    *,
    output_layer: Optional[int] = None,
    mask: bool = False,
    mask_indices: Optional[torch.Tensor] = None,
    target_list: Optional[Sequence[torch.Tensor]] = None,
    exact_padding: bool = False,
) -> HiddenStates:
    """Hidden states of a HuBERT-family model, transformer layers ``1..output_layer``.

    Args:
        model: a fairseq ``HubertModel`` (``hubert``) or a subclass (``dicehubert_student``).
        source: ``(B, S)`` waveforms (normalised already if the model's task normalises).
        padding_mask: ``(B, S)`` bool, True on padded samples (at the end of each row), or None.
        output_layer: run the encoder up to this transformer layer (1-based) and stop there;
            None: every layer.
        mask: apply the model's span masking (``model.apply_mask``; the student's L_SSL path).
        mask_indices: ``(B, T')`` bool, frames to mask given rather than drawn (the teacher of
            masking distillation sees the student's masks): they get the model's own
            ``mask_emb``, as ``apply_mask`` does to the frames it draws.  ``T'`` may differ from
            the model's frame count by the last frames (a teacher whose conv front end counts
            one frame more or less): missing frames are not masked.  Not with ``mask``.
        target_list: label tensors ``(B, T_label, ...)`` to align to the frames with fairseq's
            ``forward_targets`` (which may trim the frames to the labels); passed to
            ``apply_mask`` as fairseq does.
        exact_padding: each utterance's states equal the ones it gets alone (up to float
            rounding; a model in eval mode): its frames are counted from its length
            (:func:`~dicehubert_fairseq.frames.conv_output_length`), a conv front end that
            normalises over time (GroupNorm, ``extractor_mode=default``) runs per utterance, and
            the positional convolution reads zeros on padded frames, as it reads zeros past the
            end of a lone utterance (fairseq zeroes them at the encoder's input, but with
            ``conv_pos_batch_norm`` its BatchNorm makes them non-zero again).  An encoder whose
            layers mix frames outside attention (the conformer's depthwise convolution, which
            fairseq does not mask) runs each utterance alone; then ``mask`` and ``target_list``
            are refused.  False (training): fairseq's semantics, the front end on the padded
            batch and ``forward_padding_mask``.

    Returns:
        :class:`HiddenStates` with ``len(layers) == output_layer`` (or the number of layers).
    """
    n_layers = len(model.encoder.layers) if output_layer is None else int(output_layer)
    if mask and mask_indices is not None:
        raise ValueError("hidden_states: give mask (draw the masks) or mask_indices (use these), not both")
    if exact_padding and padding_mask is not None and not padding_mask.any():
        padding_mask = None  # as alone: no mask at all
    if exact_padding and padding_mask is not None and _layers_mix_frames(model):
        if mask or mask_indices is not None or target_list is not None:
            raise ValueError("exact_padding runs this model's utterances one by one (its encoder layers mix "
                             "frames outside attention): mask and target_list are not supported")
        return _one_by_one(model, source, padding_mask, output_layer)
    if exact_padding and padding_mask is not None:
        features, frame_mask = _exact_front_end(model, source, padding_mask)
    else:
        features, frame_mask = model.forward_features(source), None
    if target_list is not None:
        features, target_list = model.forward_targets(features, list(target_list))
    features_pen = features.float().pow(2).mean()
    features = model.layer_norm(features.transpose(1, 2))
    if frame_mask is not None:
        padding_mask = frame_mask[:, : features.size(1)]
    elif padding_mask is not None:
        padding_mask = model.forward_padding_mask(features, padding_mask)
    if model.post_extract_proj is not None:
        features = model.post_extract_proj(features)
    features = model.dropout_input(features)
    if mask_indices is not None:
        mask_indices = _fit_frames(mask_indices, features.size(1))
        features[mask_indices] = model.mask_emb.to(features.dtype)
    elif mask:
        features, mask_indices = model.apply_mask(features, padding_mask, target_list)
    x, layers = _encoder_layers(model.encoder, features, padding_mask, n_layers,
                                None if output_layer is None else n_layers - 1,
                                zero_padded_conv_input=frame_mask is not None)
    no_frames = features.new_zeros(features.shape[:2], dtype=torch.bool)
    return HiddenStates(
        x=x, layers=layers, features=features,
        padding_mask=no_frames if padding_mask is None else padding_mask,
        mask_indices=no_frames if mask_indices is None else mask_indices,
        features_pen=features_pen, target_list=target_list,
    )


def _fit_frames(mask_indices: torch.Tensor, frames: int) -> torch.Tensor:
    """``(B, T')`` bool mask cut or padded (with False) to ``(B, frames)``."""
    out = mask_indices.new_zeros((mask_indices.size(0), frames), dtype=torch.bool)
    n = min(frames, mask_indices.size(1))
    out[:, :n] = mask_indices[:, :n]
    return out


def _exact_front_end(model: nn.Module, source: torch.Tensor, padding_mask: torch.Tensor):
    """Conv features ``(B, C, T)`` independent of the batch, and the exact ``(B, T)`` frame padding."""
    lengths = (~padding_mask).sum(1).tolist()
    layers = conv_layers(model)
    frames = [conv_output_length(n, layers) for n in lengths]
    if any(isinstance(m, nn.GroupNorm) for m in model.feature_extractor.modules()):
        # normalisation over time: padding would change every frame's statistics
        outs = [model.forward_features(source[b : b + 1, :n]) for b, n in enumerate(lengths)]
        features = outs[0].new_zeros(len(outs), outs[0].size(1), max(frames))
        for b, o in enumerate(outs):
            features[b, :, : o.size(2)] = o[0]
    else:
        features = model.forward_features(source)
    frame_mask = padding_mask_of(frames, features.size(2), device=features.device)
    return features, frame_mask


def _layers_mix_frames(model: nn.Module) -> bool:
    """Whether an encoder layer mixes frames outside attention (a convolution or batch norm: the
    conformer's convolution module, where fairseq lets padded frames leak into real ones; the
    convolution-only blocks, which zero them, are run one by one all the same)."""
    return any(isinstance(m, (nn.Conv1d, nn.modules.batchnorm._BatchNorm)) for m in model.encoder.layers.modules())


def _one_by_one(model: nn.Module, source: torch.Tensor, padding_mask: torch.Tensor,
                output_layer: Optional[int]) -> HiddenStates:
    """:func:`hidden_states` of each utterance alone, zero-padded into one batch."""
    lengths = (~padding_mask).sum(1).tolist()
    outs = [hidden_states(model, source[b : b + 1, :n], output_layer=output_layer) for b, n in enumerate(lengths)]
    frames = [o.x.size(1) for o in outs]
    T = max(frames)

    def stack(items: List[torch.Tensor]) -> torch.Tensor:
        out = items[0].new_zeros((len(items), T) + tuple(items[0].shape[2:]))
        for b, t in enumerate(items):
            out[b, : t.size(1)] = t[0]
        return out

    frame_mask = padding_mask_of(frames, T, device=source.device)
    # HuBERT's feature penalty is a mean over the batch's conv features: here over every utterance's own
    pen = sum(o.features_pen * t for o, t in zip(outs, frames)) / sum(frames)
    return HiddenStates(
        x=stack([o.x for o in outs]), layers=[stack([o.layers[k] for o in outs]) for k in range(len(outs[0].layers))],
        features=stack([o.features for o in outs]), padding_mask=frame_mask,
        mask_indices=torch.zeros_like(frame_mask), features_pen=pen, target_list=None,
    )


def _zero_padding(padding_mask: torch.Tensor):
    """A forward pre-hook that zeroes the padded frames of a ``(B, C, T)`` conv input."""
    def hook(_module, args):
        x = args[0]
        return (x.masked_fill(padding_mask[:, None, : x.size(2)], 0.0),) + tuple(args[1:])
    return hook


def _encoder_layers(encoder: nn.Module, x: torch.Tensor, padding_mask: Optional[torch.Tensor], n: int,
                    stop: Optional[int], zero_padded_conv_input: bool = False):
    """fairseq's encoder on ``x`` ``(B, T, D)``; its output and layers ``1..n``'s outputs by forward hooks.

    With ``zero_padded_conv_input``, every convolution of the positional embedding reads zeros on
    the frames ``padding_mask`` marks (see :func:`hidden_states`' ``exact_padding``).
    """
    T = x.size(1)
    outputs: Dict[int, torch.Tensor] = {}
    first_input: List[torch.Tensor] = []

    def pre_hook(_module, args):
        if not first_input:
            first_input.append(args[0])

    def make_hook(k):
        def hook(_module, _args, out):
            outputs[k] = out[0]
        return hook

    handles = []
    if zero_padded_conv_input and padding_mask is not None and getattr(encoder, "pos_conv", None) is not None:
        for m in encoder.pos_conv.modules():
            if isinstance(m, nn.Conv1d):
                handles.append(m.register_forward_pre_hook(_zero_padding(padding_mask)))
    for k, layer in enumerate(encoder.layers[:n]):
        handles.append(layer.register_forward_pre_hook(pre_hook))
        handles.append(layer.register_forward_hook(make_hook(k)))
    try:
        x, _ = encoder(x, padding_mask=padding_mask, layer=stop)
    finally:
        for h in handles:
            h.remove()
    # layer outputs are (T', B, D), T' possibly padded to required_seq_len_multiple; a layer that
    # LayerDrop skipped passes its input on (the first layer's input, if no layer ran: the output)
    prev = first_input[0] if first_input else x.transpose(0, 1)
    layers = []
    for k in range(n):
        prev = outputs.get(k, prev)
        layers.append(prev.transpose(0, 1)[:, :T])
    return x, layers
