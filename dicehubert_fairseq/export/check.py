"""The export's own check: the written model, loaded back, against the source on random audio.

A padded batch of three utterances of different lengths (seeded random noise) goes through
the source (fairseq, :func:`~dicehubert_fairseq.hidden_states.hidden_states`) and through the
exported model loaded from what was just written (transformers ``HubertModel.from_pretrained``
with an attention mask, :func:`~dicehubert_fairseq.export.hf_model.hf_hidden_states`; fairseq's
``load_model_ensemble_and_task``; s3prl's ``HubertModel`` when s3prl is installed).  The
largest absolute difference of every transformer layer's output is compared on the valid
(unpadded) frames only.  Tests repeat this in fresh processes; this check runs on every export.

Both sides run the conv front end on the padded batch, as transformers does (a GroupNorm front
end then normalises over the padding too), and mask exactly the frames the conv arithmetic
calls padding (:func:`batch_padding_mask`).
"""

import logging
from typing import Dict, List, Optional, Sequence

import torch
from fairseq import checkpoint_utils

from ..checkpoint import Source
from ..frames import conv_layers, conv_output_length, padding_mask_of
from ..hidden_states import HiddenStates, hidden_states

logger = logging.getLogger(__name__)

#: Largest absolute difference of a layer output accepted by the check.
TOLERANCE = 1e-4


def random_batch(source: Source, seconds=(1.0, 0.73, 0.41), seed: int = 0):
    """``(wavs (B, S), lengths)``: seeded noise at the checkpoint's sample rate, zero-padded."""
    rate = int(source.task_cfg().get("sample_rate", 16000))
    g = torch.Generator().manual_seed(seed)
    lengths = [max(int(s * rate), 1) for s in seconds]
    layers = conv_layers(source.model)
    # at least a few frames each, whatever the conv front end
    while min(conv_output_length(n, layers) for n in lengths) < 4:
        lengths = [2 * n for n in lengths]
    wavs = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        wavs[b, :n] = 0.1 * torch.randn(n, generator=g)
    return wavs, lengths


def batch_padding_mask(model: torch.nn.Module, lengths: Sequence[int], num_samples: int) -> torch.Tensor:
    """``(B, S)`` sample padding mask under which a fairseq model masks the frames transformers masks.

    With ``attention_mask``, transformers calls frame ``t`` of item ``b`` padding iff ``t`` is at
    least the frames the conv front end makes of ``lengths[b]`` samples.  fairseq's
    ``HubertModel.forward_padding_mask`` calls a frame padding when its whole block of
    ``S // T`` samples is, which can count one frame more for the same lengths; this mask
    starts the padding at a block boundary so that both agree.  (``hidden_states(...,
    exact_padding=True)`` counts frames the same way but runs a GroupNorm front end per
    utterance, which transformers cannot do on a batch.)

    Args:
        model: a fairseq HuBERT-family model (its conv front end gives the frames).
        lengths: samples of each utterance.
        num_samples: ``S``, the padded length.

    Returns:
        ``(B, S)`` bool, True on padding.
    """
    layers = conv_layers(model)
    block = num_samples // conv_output_length(num_samples, layers)
    frames = torch.tensor([conv_output_length(int(n), layers) for n in lengths])
    return padding_mask_of(frames * block, num_samples)


def frames_of(model: torch.nn.Module, lengths: Sequence[int]) -> List[int]:
    """Valid frames of each utterance (conv arithmetic)."""
    layers = conv_layers(model)
    return [conv_output_length(int(n), layers) for n in lengths]


def max_abs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], frames: Sequence[int]) -> List[float]:
    """Per pair of ``(B, T, D)`` tensors, the max abs difference over each item's valid frames."""
    out = []
    for x, y in zip(a, b):
        out.append(max(float((x[i, :n] - y[i, :n]).abs().max()) for i, n in enumerate(frames)))
    return out


def outputs(h: HiddenStates) -> List[torch.Tensor]:
    """What the check compares: every layer's output (1..L), then the encoder output ``x``."""
    return list(h.layers) + [h.x]


def source_states(source: Source, wavs: torch.Tensor, lengths: Sequence[int]) -> HiddenStates:
    """The source's hidden states on the check's padded batch."""
    with torch.inference_mode():
        return hidden_states(source.model, wavs, batch_padding_mask(source.model, lengths, wavs.shape[1]))


def check_hf(source: Source, directory: str) -> List[float]:
    """Per layer (1..L) then the final output: max abs difference, HF vs fairseq."""
    from transformers import HubertModel

    from .hf_model import hf_hidden_states

    wavs, lengths = random_batch(source)
    ref = source_states(source, wavs, lengths)
    model = _frozen(HubertModel.from_pretrained(directory))
    with torch.inference_mode():
        got = hf_hidden_states(model, wavs, padding_mask_of(lengths, wavs.shape[1]))
    return max_abs(outputs(got), outputs(ref), frames_of(source.model, lengths))


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    # as the source: fairseq's attention takes another kernel (about 1e-6 apart) when
    # parameters require grad, even under inference_mode
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_fairseq_model(source: Source, model: torch.nn.Module) -> List[float]:
    wavs, lengths = random_batch(source)
    ref = source_states(source, wavs, lengths)
    with torch.inference_mode():
        got = hidden_states(_frozen(model), wavs, batch_padding_mask(model, lengths, wavs.shape[1]))
    return max_abs(outputs(got), outputs(ref), frames_of(source.model, lengths))


def check_fairseq(source: Source, path: str) -> List[float]:
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path])
    return _check_fairseq_model(source, models[0])


def check_s3prl(source: Source, path: str) -> Optional[List[float]]:
    """With s3prl installed: its ``HubertModel`` built as ``load_converted_model`` does; else None."""
    try:
        from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig
    except ImportError:
        return None

    def keep(dc, cfg):  # what s3prl's merge_with_parent does
        fields = set(dc.__dataclass_fields__)
        return dc(**{k: v for k, v in cfg.items() if k in fields})

    state = torch.load(path, map_location="cpu", weights_only=True)
    model = HubertModel(keep(HubertConfig, state["model_cfg"]), keep(HubertPretrainingConfig, state["task_cfg"]),
                        state["dictionaries_symbols"])
    model.load_state_dict(state["model_weight"])
    return _check_fairseq_model(source, model)


CHECKS = {"hf": check_hf, "fairseq": check_fairseq, "s3prl": check_s3prl}


def run_check(target: str, source: Source, path: str) -> Optional[Dict[str, object]]:
    """``{"max_abs": [...], "ok": bool}`` for the written ``path``, or None if not checkable here."""
    diffs = CHECKS[target](source, path)
    if diffs is None:
        return None
    return {"max_abs": diffs, "ok": max(diffs) <= TOLERANCE}
