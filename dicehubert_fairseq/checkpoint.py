"""Fairseq HuBERT-family checkpoints (teachers, students): loaded with clear errors, as one :class:`Source`.

A source is any checkpoint this project trains or reads: a ``dicehubert_student`` (any preset,
with or without feature-distillation heads) or a fairseq ``hubert`` teacher. It is loaded the
way fairseq loads it (``checkpoint_utils.load_model_ensemble_and_task``, fairseq's own model
builder), so a checkpoint that fairseq cannot build is refused before anything uses it. The
labels' teacher, the probe's upstream, the L_feat teacher and every export go through
:func:`load_source` (or :func:`load_model`, its model and config).
"""

import dataclasses
import hashlib
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.models.hubert.hubert import HubertConfig
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from omegaconf import OmegaConf

from . import _compat  # noqa: F401  (allow-list fairseq globals for torch.load)
from .errors import InputError

logger = logging.getLogger(__name__)

#: fairseq model names whose checkpoints we can run as teachers / feature extractors.
HUBERT_FAMILY = ("hubert", "dicehubert_student")
#: HuBERT's masked-prediction heads (one label set's): never copied into a student, kept in
#: fairseq/s3prl exports, left out of Hugging Face ones.
PRETRAINING_HEADS = ("label_embs_concat", "final_proj.", "target_glu.")
#: Parameters of feature-distillation heads (criterion ``dicehubert_feat``): never copied, never exported.
FEAT_HEADS = ("feat_heads.",)


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


@dataclass
class Source:
    """A loaded source checkpoint.

    Attributes:
        path: the checkpoint file.
        model_name: ``hubert`` or ``dicehubert_student``.
        state: the checkpoint dict as fairseq's loader returns it.
        cfg: its full fairseq config (``DictConfig``).
        model: the fairseq model, built by fairseq and loaded, in eval mode, on the CPU.
        dictionaries: the symbols of each label dictionary (``task_state``), one list per stream.
    """

    path: str
    model_name: str
    state: Dict[str, Any]
    cfg: Any
    model: torch.nn.Module
    dictionaries: List[List[str]]

    def model_cfg(self) -> Dict[str, Any]:
        """The model config as plain Python, restricted to fairseq ``HubertConfig``'s fields.

        ``_name`` becomes ``hubert``; this project's own fields (``init_from_teacher``,
        ``feat_*``) are left out; interpolations (``label_rate: ${task.label_rate}``) resolved.
        """
        return _restrict(self.cfg.model, HubertConfig, "hubert")

    def needs_plugin(self) -> bool:
        """Whether only ``dicehubert_student`` can build this model: a convolution-only encoder
        (``layer_type=conv``), which fairseq's own ``HubertModel`` does not have."""
        return str(_plain(self.cfg.model).get("layer_type", "transformer")) == "conv"

    def student_model_cfg(self) -> Dict[str, Any]:
        """The model config as plain Python for ``dicehubert_student`` itself (:meth:`needs_plugin`):
        ``DiceHubertStudentConfig``'s fields but the feature-distillation heads' and
        ``init_from_teacher`` (training-only)."""
        from .models.dicehubert_student import DiceHubertStudentConfig

        cfg = _restrict(self.cfg.model, DiceHubertStudentConfig, "dicehubert_student")
        return {k: v for k, v in cfg.items() if not k.startswith("feat_") and k != "init_from_teacher"}

    def task_cfg(self) -> Dict[str, Any]:
        """The task config as plain Python, restricted to ``HubertPretrainingConfig``'s fields."""
        return _restrict(self.cfg.task, HubertPretrainingConfig, "hubert_pretraining")

    def num_layers(self) -> int:
        return len(self.model.encoder.layers)

    def dim(self) -> int:
        return int(self.model.encoder.embedding_dim)

    def describe(self) -> str:
        return f"{self.model_name}, {self.num_layers()} layers x {self.dim()}"


def _plain(node) -> Any:
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def _restrict(node, dataclass_type, name: str) -> Dict[str, Any]:
    cfg = _plain(node)
    fields = {f.name for f in dataclasses.fields(dataclass_type)}
    out = {k: v for k, v in cfg.items() if k in fields}
    out["_name"] = name
    require_plain(out, name)
    return out


_PLAIN = (str, int, float, bool, type(None))


def require_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` if ``value`` holds anything but dicts, lists, str, numbers, None, tensors.

    What an export writes must load with ``torch.load(weights_only=True)`` and no allow-list.
    """
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not a plain type")
            require_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            require_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN + (torch.Tensor,)):
        raise TypeError(f"{where}: {type(value).__module__}.{type(value).__name__} is not a plain type")


def load_source(path: str, device: str = "cpu", layer: Optional[int] = None) -> Source:
    """Load and build a HuBERT-family checkpoint, in eval mode, every parameter frozen.

    Args:
        path: a fairseq ``hubert`` or ``dicehubert_student`` checkpoint.
        device: where to put the model.
        layer: if given, check that the model has transformer layer ``layer`` (1-based).

    Raises:
        InputError: missing, a directory, unreadable, truncated, not a fairseq checkpoint, not
            HuBERT-family, ``layer`` out of range, or a model fairseq cannot build from it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError([f"{path}: is a directory (expected a fairseq checkpoint file)"])
    state = load_state(path)
    name = require_hubert_family(state, path)
    n = num_layers(state)
    if layer is not None and not 1 <= layer <= n:
        raise InputError([f"{path}: layer {layer} out of range (the model has transformer layers 1..{n})"])
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    except InputError:
        raise
    except Exception as e:  # a state dict or config fairseq's HubertModel does not accept
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise InputError([f"{path}: fairseq could not build the '{name}' model it names: "
                          f"{type(e).__name__}: {msg}"]) from None
    model = models[0].eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    dicts = (state.get("task_state") or {}).get("dictionaries")
    if dicts is None:
        dicts = task.dictionaries
    symbols = [list(d.symbols) if hasattr(d, "symbols") else [str(s) for s in d] for d in dicts]
    return Source(path=path, model_name=name, state=state, cfg=cfg, model=model, dictionaries=symbols)


def load_model(path: str, device: str = "cpu", layer: Optional[int] = None) -> Tuple[torch.nn.Module, Any]:
    """The model of :func:`load_source` and its checkpoint's full fairseq config: ``(model, cfg)``."""
    source = load_source(path, device, layer)
    return source.model, source.cfg
