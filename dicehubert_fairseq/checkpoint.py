"""Loading fairseq HuBERT-family checkpoints (teachers, students) with clear errors."""

import hashlib
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch
from fairseq import checkpoint_utils

from . import _compat  # noqa: F401  (allow-list fairseq globals for torch.load)
from .errors import InputError

logger = logging.getLogger(__name__)

#: fairseq model names whose checkpoints we can run as teachers / feature extractors.
HUBERT_FAMILY = ("hubert", "dicehubert_student")


#: the checksum file beside a checkpoint (``sha256sum`` format: ``HEX  NAME``)
CHECKSUM_SUFFIX = ".sha256"


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: str) -> Optional[str]:
    """Check ``path`` against ``path + ".sha256"`` when that file exists (``sha256sum -c`` format).

    Checkpoints committed with a checksum (examples/tiny's pretrained teachers) are verified at
    every load; others load as they are.

    Returns:
        the verified digest, or None without a checksum file.

    Raises:
        InputError: the checksum file is malformed, or the checkpoint's digest differs from it.
    """
    side = os.fspath(path) + CHECKSUM_SUFFIX
    if not os.path.isfile(side):
        return None
    with open(side, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    expected = first.split()[0].lower() if first else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise InputError([f"{side}:1: expected a SHA-256 checksum (64 hex digits, then the file name), "
                          f"found {first[:80]!r}"])
    found = sha256_file(path)
    if found != expected:
        raise InputError([f"{path}: SHA-256 {found} differs from {side} ({expected}): the checkpoint is corrupt "
                          f"or was replaced; restore it (git checkout -- {os.path.basename(path)}) or retrain it"])
    return found


def load_state(path: str) -> Dict[str, Any]:
    """Load a fairseq checkpoint on CPU (``weights_only``, fairseq's globals allow-listed).

    A checkpoint with a checksum file beside it (:func:`verify_checksum`) is verified first.

    Raises:
        InputError: missing, corrupt (checksum), truncated, or not a fairseq checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError([f"{path}: checkpoint not found"])
    verify_checksum(path)
    try:
        # fairseq's loader also upgrades old (argparse) checkpoints to a config
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError([f"{path}: not a readable torch checkpoint (truncated or corrupt?): {msg}"]) from None
    except pickle.UnpicklingError as e:  # torch's weights_only refusal
        msg = str(e).splitlines()[0][:200]
        raise InputError([f"{path}: cannot be loaded safely as a fairseq checkpoint: {msg}"]) from None
    except Exception as e:  # e.g. KeyError from fairseq's upgrade of a dict it does not recognise
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise InputError([f"{path}: not a fairseq checkpoint (expected one saved by fairseq's trainer, with "
                          f"'model', 'cfg' and 'optimizer_history'; fairseq's loader failed with {msg})"]) from None
    if not isinstance(state, dict) or "model" not in state:
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise InputError([f"{path}: not a fairseq checkpoint (expected a dict with 'model' and 'cfg', found {found})"])
    return state


def model_name(state: Dict[str, Any]) -> Optional[str]:
    """The registered fairseq model name stored in a checkpoint, if any."""
    cfg = state.get("cfg")
    if cfg is not None:
        model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
        if model_cfg is not None:
            name = model_cfg.get("_name") if hasattr(model_cfg, "get") else getattr(model_cfg, "_name", None)
            if name is None and hasattr(model_cfg, "arch"):
                name = model_cfg.arch
            return name
    args = state.get("args")
    if args is not None:
        return getattr(args, "arch", None)
    return None


def require_hubert_family(state: Dict[str, Any], path: str) -> str:
    name = model_name(state)
    if name not in HUBERT_FAMILY:
        raise InputError([f"{path}: model '{name}' is not a HuBERT-family model (expected one of {list(HUBERT_FAMILY)})"])
    return name


def num_layers(state: Dict[str, Any]) -> int:
    """Transformer layers of a checkpoint's model, counted from its weights."""
    layers = set()
    for key in state["model"]:
        if key.startswith("encoder.layers."):
            layers.add(int(key.split(".")[2]))
    return len(layers)


def load_model(path: str, device: str = "cpu", layer: Optional[int] = None) -> Tuple[torch.nn.Module, Any]:
    """Build a HuBERT-family model from a checkpoint, in eval mode, on ``device``.

    Args:
        path: a fairseq ``hubert`` or ``dicehubert_student`` checkpoint.
        device: where to put the model.
        layer: if given, check that the model has transformer layer ``layer`` (1-based).

    Returns:
        ``(model, cfg)`` where ``cfg`` is the checkpoint's full fairseq config.
    """
    state = load_state(path)
    require_hubert_family(state, path)
    n = num_layers(state)
    if layer is not None and not 1 <= layer <= n:
        raise InputError([f"{path}: layer {layer} out of range (the model has transformer layers 1..{n})"])
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0].eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg
