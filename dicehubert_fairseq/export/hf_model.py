"""Hugging Face HuBERT model directories as upstreams: loading and hidden states.

Used by ``dicehubert-probe`` (``--checkpoint`` may be a directory written by
``dicehubert-export --to hf``, or any ``transformers`` HuBERT directory) and by the export's
own check.  ``transformers`` is imported only when a directory is actually loaded.
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError

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
    from ..checkpoint import load_model

    return load_model(path, device)


def hidden_dim(model: torch.nn.Module) -> int:
    """Width of the hidden states of an HF or fairseq HuBERT model."""
    if is_hf_model(model):
        return int(model.config.hidden_size)
    return int(model.encoder.embedding_dim)


def hf_hidden_states(
    model: torch.nn.Module, input_values: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> Dict[str, Any]:
    """Hidden states of a ``transformers`` HubertModel, in fairseq's terms.

    Taken with forward hooks (the same in every transformers version): the feature projection's
    output (the transformer input before the positional conv, fairseq's projected features),
    every encoder layer's output (fairseq's ``layer_results``: for ``do_stable_layer_norm``
    models the last one before the encoder's final layer norm) and ``last_hidden_state``.

    Args:
        model: a ``transformers.HubertModel`` in eval mode.
        input_values: ``(B, S)`` waveforms, zero-padded.
        attention_mask: ``(B, S)`` 1 on samples, 0 on padding (or None).

    Returns:
        dict with ``features`` ``(B, T, D)``, ``layers`` (list of ``L`` ``(B, T, D)``),
        ``final`` ``(B, T, D)`` and ``hidden_states`` (transformers' own tuple).
    """
    captured: Dict[str, Any] = {"layers": [None] * len(model.encoder.layers)}

    def grab(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def on_features(_m, _args, out):
        captured["features"] = grab(out)

    def on_layer(k):
        def hook(_m, _args, out):
            captured["layers"][k] = grab(out)
        return hook

    handles = [model.feature_projection.register_forward_hook(on_features)]
    handles += [layer.register_forward_hook(on_layer(k)) for k, layer in enumerate(model.encoder.layers)]
    try:
        with torch.inference_mode():
            out = model(input_values, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return {"features": captured["features"], "layers": captured["layers"], "final": out.last_hidden_state,
            "hidden_states": out.hidden_states}


def probe_hidden_states(model: torch.nn.Module, source: torch.Tensor, normalize_waveform: bool = False) -> torch.Tensor:
    """All hidden states of an HF HuBERT for one utterance, as the probe takes them from fairseq.

    Args:
        model: a ``transformers.HubertModel`` in eval mode.
        source: ``(S,)`` or ``(1, S)`` waveform.
        normalize_waveform: layer-normalise the waveform first (fairseq's ``task.normalize``,
            computed exactly as fairseq does, ``F.layer_norm`` over the whole waveform).

    Returns:
        ``(L + 1, T, D)``: 0 is the projected conv features, ``1..L`` the layers' outputs.
    """
    x = source.reshape(1, -1).float()
    if normalize_waveform:
        x = F.layer_norm(x, x.shape)
    h = hf_hidden_states(model, x)
    states: List[torch.Tensor] = [h["features"][0]] + [s[0] for s in h["layers"]]
    return torch.stack(states)
