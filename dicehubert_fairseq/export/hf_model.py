"""Hugging Face HuBERT model directories as upstreams: loading and hidden states.

Used by ``dicehubert-probe`` (``--checkpoint`` may be a directory written by
``dicehubert-export --to hf``, or any ``transformers`` HuBERT directory) and by the export's
own check.  ``transformers`` is imported only when a directory is actually loaded.
"""

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch

from ..checkpoint import load_model
from ..errors import InputError
from ..frames import conv_layers, conv_output_length, padding_mask_of
from ..hidden_states import HiddenStates

logger = logging.getLogger(__name__)


def is_hf_model_dir(path: str) -> bool:
    """A directory (an HF model directory or not: :func:`load_hf_model` says what is wrong)."""
    return os.path.isdir(os.fspath(path))


def is_hf_model(model: torch.nn.Module) -> bool:
    """True for a ``transformers`` model (without importing transformers)."""
    return type(model).__module__.startswith("transformers.")


def load_hf_model(path: str, device: str = "cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load a ``transformers`` HuBERT directory, frozen, in eval mode.

    Args:
        path: directory with ``config.json`` (``model_type`` hubert), the weights and, ideally,
            ``preprocessor_config.json`` (its ``sampling_rate`` and ``do_normalize``).
        device: where to put the model.

    Returns:
        ``(model, cfg)`` with ``cfg = {"task": {"sample_rate": int, "normalize": bool},
        "model": dict of config.json}``, the keys the probe reads from a fairseq config.

    Raises:
        InputError: no config.json, not a HuBERT config, transformers missing, unloadable weights.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise InputError([f"{path}: a directory without config.json (expected a Hugging Face model directory, "
                          f"e.g. from dicehubert-export --to hf, or a fairseq checkpoint file)"])
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError([f"{config_path}: not readable JSON ({e})"]) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "hubert":
        raise InputError([f"{config_path}: model_type {model_type!r}, expected 'hubert' (a transformers HubertModel)"])
    try:
        from transformers import HubertModel
    except ImportError as e:
        raise InputError([f"{path}: loading a Hugging Face model needs transformers ({e}): "
                          f"pip install 'dicehubert_fairseq[export]'"]) from None
    try:
        model = HubertModel.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise InputError([f"{path}: transformers could not load the model: {msg}"]) from None
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    sample_rate, normalize = 16000, False
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            fe = json.load(f)
        sample_rate = int(fe.get("sampling_rate", sample_rate))
        normalize = bool(fe.get("do_normalize", normalize))
    else:
        logger.warning(f"{path}: no preprocessor_config.json; assuming 16 kHz audio, not normalised")
    return model, {"task": {"sample_rate": sample_rate, "normalize": normalize}, "model": config}


def load_upstream(path: str, device: str = "cpu") -> Tuple[torch.nn.Module, Any]:
    """A frozen upstream for the probe: an HF directory or a fairseq HuBERT-family checkpoint.

    Returns:
        ``(model, cfg)``: see :func:`load_hf_model` and
        :func:`dicehubert_fairseq.checkpoint.load_model`.
    """
    if is_hf_model_dir(path):
        return load_hf_model(path, device)
    return load_model(path, device)


def hidden_dim(model: torch.nn.Module) -> int:
    """Width of the hidden states of an HF or fairseq HuBERT model."""
    if is_hf_model(model):
        return int(model.config.hidden_size)
    return int(model.encoder.embedding_dim)


def hf_hidden_states(
    model: torch.nn.Module, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
) -> HiddenStates:
    """Hidden states of a ``transformers`` HubertModel, as :func:`~dicehubert_fairseq.hidden_states.hidden_states`
    gives them for a fairseq model (same arguments, same :class:`HiddenStates` fields).

    Taken with forward hooks (the same in every transformers version): the conv front end's
    output (for ``features_pen``), the feature projection's output (``features``: the
    transformer input before the positional conv, fairseq's projected features, the probe's
    hidden state 0) and every encoder layer's output (``layers``; for ``do_stable_layer_norm``
    models the last one before the encoder's final layer norm, as fairseq's).  ``padding_mask``
    becomes transformers' ``attention_mask``, whose frames are the conv arithmetic's
    (:func:`~dicehubert_fairseq.frames.conv_output_length`); the front end runs on the padded
    batch (a GroupNorm front end normalises over the padding too, as transformers does).

    Args:
        model: a ``transformers.HubertModel`` in eval mode.
        source: ``(B, S)`` waveforms (normalised already if the model's feature extractor normalises).
        padding_mask: ``(B, S)`` bool, True on padded samples (at the end of each row), or None.

    Returns:
        :class:`HiddenStates` with ``x`` = ``last_hidden_state`` ``(B, T, D)``, ``L`` ``layers``,
        ``features``, the ``(B, T)`` frame ``padding_mask``, no masked frames and no targets.
    """
    captured: Dict[str, Any] = {"layers": [None] * len(model.encoder.layers)}

    def grab(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def keep(name):
        def hook(_m, _args, out):
            captured[name] = grab(out)
        return hook

    def on_layer(k):
        def hook(_m, _args, out):
            captured["layers"][k] = grab(out)
        return hook

    handles = [model.feature_extractor.register_forward_hook(keep("conv")),
               model.feature_projection.register_forward_hook(keep("features"))]
    handles += [layer.register_forward_hook(on_layer(k)) for k, layer in enumerate(model.encoder.layers)]
    attention_mask = None if padding_mask is None else (~padding_mask).long()
    try:
        x = model(source, attention_mask=attention_mask).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    B, T = x.shape[:2]
    frames = torch.full((B,), T) if padding_mask is None else torch.tensor(
        [conv_output_length(int(n), conv_layers(model)) for n in (~padding_mask).sum(1)])
    frame_padding = padding_mask_of(frames, T, device=x.device)
    return HiddenStates(x=x, layers=captured["layers"], features=captured["features"], padding_mask=frame_padding,
                        mask_indices=torch.zeros_like(frame_padding),
                        features_pen=captured["conv"].float().pow(2).mean())
