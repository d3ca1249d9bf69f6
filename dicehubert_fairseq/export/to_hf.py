"""``--to hf``: a directory that ``transformers.HubertModel.from_pretrained`` loads.

Every fairseq field that changes the computation is mapped to ``transformers.HubertConfig``:

==============================  ==============================================================
fairseq (``HubertConfig``)      transformers (``HubertConfig``)
==============================  ==============================================================
conv_feature_layers             conv_dim, conv_kernel, conv_stride (read from the built model)
conv_bias                       conv_bias
extractor_mode default          feat_extract_norm ``group`` (GroupNorm after the first conv)
extractor_mode layer_norm       feat_extract_norm ``layer`` (LayerNorm after every conv)
(conv and pos-conv GELU)        feat_extract_activation ``gelu``
layer_norm (features)           feat_proj_layer_norm True, feature_projection.layer_norm
post_extract_proj               feature_projection.projection (identity when fairseq has none)
conv_pos, conv_pos_groups       num_conv_pos_embeddings, num_conv_pos_embedding_groups
pos conv weight_norm (dim=2)    the same weight norm (torch parametrisation g, v)
conv_pos_batch_norm             conv_pos_batch_norm
layer_norm_first                do_stable_layer_norm
encoder_embed_dim / _layers     hidden_size / num_hidden_layers
encoder_ffn_embed_dim           intermediate_size
encoder_attention_heads         num_attention_heads
activation_fn                   hidden_act (gelu, relu, tanh, linear; gelu_accurate and
                                gelu_fast -> gelu_new)
dropout, attention_dropout,     hidden_dropout, attention_dropout, activation_dropout,
activation_dropout,             feat_proj_dropout, layerdrop (training only)
dropout_input, encoder_layerdrop
mask_emb                        masked_spec_embed
==============================  ==============================================================

LayerNorm/GroupNorm epsilon is 1e-5 on both sides.  What ``HubertModel`` cannot represent is
refused with the field and its value (a Conformer or convolution-only encoder, an activation it
lacks).  Dropped:
the pretraining heads (``final_proj``, ``label_embs_concat``, ``target_glu``) and the
feature-distillation heads; the HF model ends at the encoder output.

The feature-extractor config (``preprocessor_config.json``) is a ``Wav2Vec2FeatureExtractor``
at the checkpoint's ``task.sample_rate`` with ``do_normalize = task.normalize`` and
``return_attention_mask = True``: with an attention mask, transformers zeroes padded frames
before the positional conv and masks them in attention, which is what fairseq does with a
padding mask.
"""

import logging
import os
from typing import Any, Dict, List, Tuple

import torch

from ..checkpoint import FEAT_HEADS, PRETRAINING_HEADS, Source
from ..errors import InputError
from ..frames import conv_layers
from .output import split_state_dict

logger = logging.getLogger(__name__)

#: fairseq ``activation_fn`` -> transformers ``ACT2FN`` name computing the same function.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_accurate": "gelu_new",
    "gelu_fast": "gelu_new",
    "relu": "relu",
    "tanh": "tanh",
    "linear": "linear",
}


def refusals(source: Source) -> List[str]:
    """What transformers' ``HubertModel`` cannot represent in this checkpoint, one line each."""
    m = source.model_cfg()
    where = source.path
    problems = []
    layer_type = str(m.get("layer_type", "transformer"))
    if layer_type != "transformer":
        instead = "--to fairseq" if layer_type == "conv" else "--to fairseq or --to s3prl"
        problems.append(f"{where}: model.layer_type={layer_type}: transformers' HubertModel has only "
                        f"transformer encoder layers (export this model with {instead})")
    act = str(m.get("activation_fn", "gelu"))
    if act not in ACTIVATIONS:
        problems.append(f"{where}: model.activation_fn={act}: no transformers activation computes it "
                        f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    mode = str(m.get("extractor_mode", "default"))
    if mode not in ("default", "layer_norm"):
        problems.append(f"{where}: model.extractor_mode={mode}: expected default or layer_norm")
    return problems


def hf_config_kwargs(source: Source) -> Dict[str, Any]:
    """``transformers.HubertConfig`` keyword arguments equivalent to the source's model config.

    Raises:
        InputError: a field ``HubertModel`` cannot represent (see :func:`refusals`).
    """
    problems = refusals(source)
    if problems:
        raise InputError(problems)
    m = source.model_cfg()
    t = source.task_cfg()
    model = source.model
    dims = [int(block[0].out_channels) for block in model.feature_extractor.conv_layers]
    kernels, strides = zip(*conv_layers(model))
    return dict(
        hidden_size=int(m["encoder_embed_dim"]),
        num_hidden_layers=int(m["encoder_layers"]),
        num_attention_heads=int(m["encoder_attention_heads"]),
        intermediate_size=int(m["encoder_ffn_embed_dim"]),
        hidden_act=ACTIVATIONS[str(m.get("activation_fn", "gelu"))],
        hidden_dropout=float(m.get("dropout", 0.1)),
        activation_dropout=float(m.get("activation_dropout", 0.0)),
        attention_dropout=float(m.get("attention_dropout", 0.1)),
        feat_proj_dropout=float(m.get("dropout_input", 0.0)),
        layerdrop=float(m.get("encoder_layerdrop", 0.0)),
        layer_norm_eps=1e-5,
        feat_extract_norm="group" if str(m.get("extractor_mode", "default")) == "default" else "layer",
        feat_extract_activation="gelu",
        conv_dim=dims,
        conv_kernel=list(kernels),
        conv_stride=list(strides),
        conv_bias=bool(m.get("conv_bias", False)),
        num_conv_pos_embeddings=int(m["conv_pos"]),
        num_conv_pos_embedding_groups=int(m["conv_pos_groups"]),
        conv_pos_batch_norm=bool(m.get("conv_pos_batch_norm", False)),
        do_stable_layer_norm=bool(m.get("layer_norm_first", False)),
        feat_proj_layer_norm=True,
        mask_time_length=int(m.get("mask_length", 10)),
        # not a computation field: where the model came from
        dicehubert_source={"checkpoint": os.path.basename(source.path), "model": source.model_name,
                           "sample_rate": int(t.get("sample_rate", 16000)),
                           "normalize": bool(t.get("normalize", False))},
    )


def _name_map(source: Source, hf_keys: List[str]) -> Dict[str, str]:
    """HF parameter name -> fairseq parameter name (identity projection handled by the caller)."""
    m = source.model_cfg()
    layer_norm_mode = str(m.get("extractor_mode", "default")) == "layer_norm"
    names: Dict[str, str] = {}
    for i in range(len(source.model.feature_extractor.conv_layers)):
        for p in ("weight", "bias"):
            names[f"feature_extractor.conv_layers.{i}.conv.{p}"] = f"feature_extractor.conv_layers.{i}.0.{p}"
            norm = f"feature_extractor.conv_layers.{i}.2.1.{p}" if layer_norm_mode else (
                f"feature_extractor.conv_layers.{i}.2.{p}" if i == 0 else None)
            if norm is not None:
                names[f"feature_extractor.conv_layers.{i}.layer_norm.{p}"] = norm
    for p in ("weight", "bias"):
        names[f"feature_projection.layer_norm.{p}"] = f"layer_norm.{p}"
        names[f"feature_projection.projection.{p}"] = f"post_extract_proj.{p}"
        names[f"encoder.layer_norm.{p}"] = f"encoder.layer_norm.{p}"
    names["masked_spec_embed"] = "mask_emb"
    if bool(m.get("conv_pos_batch_norm", False)):
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            names[f"encoder.pos_conv_embed.batch_norm.{p}"] = f"encoder.pos_conv.0.{p}"
        names["encoder.pos_conv_embed.conv.weight"] = "encoder.pos_conv.1.weight"
        names["encoder.pos_conv_embed.conv.bias"] = "encoder.pos_conv.1.bias"
    else:
        # weight norm over dim 2 on both sides: g (1, 1, K) and v; torch's parametrisation
        # (original0, original1) or the older weight_g / weight_v, whichever this transformers has
        names["encoder.pos_conv_embed.conv.bias"] = "encoder.pos_conv.0.bias"
        for hf_g, hf_v in (("parametrizations.weight.original0", "parametrizations.weight.original1"),
                           ("weight_g", "weight_v")):
            names[f"encoder.pos_conv_embed.conv.{hf_g}"] = "encoder.pos_conv.0.weight_g"
            names[f"encoder.pos_conv_embed.conv.{hf_v}"] = "encoder.pos_conv.0.weight_v"
    for i in range(source.num_layers()):
        e, f = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names[f"{e}attention.{proj}.{p}"] = f"{f}self_attn.{proj}.{p}"
            names[f"{e}layer_norm.{p}"] = f"{f}self_attn_layer_norm.{p}"
            names[f"{e}feed_forward.intermediate_dense.{p}"] = f"{f}fc1.{p}"
            names[f"{e}feed_forward.output_dense.{p}"] = f"{f}fc2.{p}"
            names[f"{e}final_layer_norm.{p}"] = f"{f}final_layer_norm.{p}"
    return {k: v for k, v in names.items() if k in set(hf_keys)}


def hf_state_dict(source: Source, hf_model: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The HF model's state dict filled from the source, and the dropped source tensors.

    Every HF tensor is filled and every kept fairseq tensor used exactly once, with equal
    shapes, or a ``RuntimeError`` names the first mismatch (a bug, not bad input).
    """
    kept, dropped = split_state_dict(source.model.state_dict(), FEAT_HEADS + PRETRAINING_HEADS)
    target = hf_model.state_dict()
    names = _name_map(source, list(target))
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for key, ref in target.items():
        src_name = names.get(key)
        if src_name is None or src_name not in kept:
            if key.startswith("feature_projection.projection.") and "post_extract_proj.weight" not in kept:
                # fairseq has no projection when the conv output already has the model's width
                out[key] = torch.eye(ref.shape[0]) if key.endswith("weight") else torch.zeros_like(ref)
                continue
            raise RuntimeError(f"no fairseq tensor for transformers' {key} (looked for {src_name})")
        tensor = kept[src_name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise RuntimeError(f"{src_name} {tuple(tensor.shape)} does not fit transformers' {key} {tuple(ref.shape)}")
        out[key] = tensor.detach().to(ref.dtype if ref.is_floating_point() else tensor.dtype).clone()
        used.add(src_name)
    unused = sorted(set(kept) - used)
    if unused:
        raise RuntimeError(f"fairseq tensors not mapped to transformers: {unused[:5]}")
    return out, dropped


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise InputError([f"--to hf needs transformers and safetensors ({e}): "
                          f"pip install 'dicehubert_fairseq[export]'"]) from None
    return transformers


def write_hf(source: Source, directory: str) -> Dict[str, Any]:
    """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` into ``directory``.

    Returns:
        dict with ``parameters`` (of the HF model) and ``dropped`` (source tensors left out).
    """
    kwargs = hf_config_kwargs(source)
    transformers = _transformers()
    t = kwargs["dicehubert_source"]
    config = transformers.HubertConfig(**kwargs)
    model = transformers.HubertModel(config).eval()
    state, dropped = hf_state_dict(source, model)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(directory, safe_serialization=True)
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=t["sample_rate"], padding_value=0.0, do_normalize=t["normalize"],
        return_attention_mask=True,
    )
    extractor.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters()), "dropped": dropped}
