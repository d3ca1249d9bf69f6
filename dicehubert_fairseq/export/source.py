"""What every export target shares: the source checkpoint, its plain configs, atomic output.

A source is any checkpoint this project trains or reads: a ``dicehubert_student`` (any preset,
with or without feature-distillation heads) or a fairseq ``hubert`` teacher.  It is loaded the
way fairseq loads it (:func:`dicehubert_fairseq.checkpoint.load_state`, fairseq's own model
builder), so a checkpoint that fairseq cannot build is refused before anything is written.
"""

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.models.hubert.hubert import HubertConfig
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from omegaconf import OmegaConf

from ..checkpoint import load_state, require_hubert_family
from ..errors import InputError

logger = logging.getLogger(__name__)

#: Parameters of feature-distillation heads (criterion ``dicehubert_feat``): never exported.
FEAT_HEADS = ("feat_heads.",)
#: HuBERT's masked-prediction heads (one label set's): kept in fairseq/s3prl files, not in HF ones.
PRETRAINING_HEADS = ("label_embs_concat", "final_proj.", "target_glu.")


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
        from ..models.dicehubert_student import DiceHubertStudentConfig

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


def load_source(path: str) -> Source:
    """Load and build a HuBERT-family checkpoint on the CPU.

    Raises:
        InputError: missing, unreadable, truncated, not a fairseq checkpoint, not HuBERT-family,
            or a model fairseq cannot build from it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError([f"{path}: is a directory (expected a fairseq checkpoint file)"])
    state = load_state(path)
    name = require_hubert_family(state, path)
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    except InputError:
        raise
    except Exception as e:  # a state dict or config fairseq's HubertModel does not accept
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise InputError([f"{path}: fairseq could not build the '{name}' model it names: "
                          f"{type(e).__name__}: {msg}"]) from None
    model = models[0].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dicts = (state.get("task_state") or {}).get("dictionaries")
    if dicts is None:
        dicts = task.dictionaries
    symbols = [list(d.symbols) if hasattr(d, "symbols") else [str(s) for s in d] for d in dicts]
    return Source(path=path, model_name=name, state=state, cfg=cfg, model=model, dictionaries=symbols)


def split_state_dict(
    state_dict: Dict[str, torch.Tensor], drop: Sequence[str]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(kept, dropped)``: the tensors whose names start with one of ``drop`` are dropped."""
    kept, dropped = {}, {}
    for k, v in state_dict.items():
        (dropped if k.startswith(tuple(drop)) else kept)[k] = v
    return kept, dropped


def count_parameters(tensors: Dict[str, torch.Tensor]) -> int:
    """Elements of the floating-point tensors (BatchNorm's step counter is not a parameter)."""
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def describe_dropped(dropped: Dict[str, torch.Tensor]) -> str:
    """``feat_heads (4 tensors, 12,352 parameters), final_proj (...)`` grouped by top-level name."""
    if not dropped:
        return "nothing"
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in dropped.items():
        groups.setdefault(k.split(".")[0], {})[k] = v
    return ", ".join(f"{g} ({len(t)} tensor{'s' if len(t) > 1 else ''}, {count_parameters(t):,} parameters)"
                     for g, t in sorted(groups.items()))


def disk_size(path: str) -> int:
    """Bytes of a file, or of every file under a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"  # pragma: no cover


def check_output(out: str, force: bool, directory: bool) -> None:
    """Refuse an existing output (unless ``force``) or one of the wrong kind, before any work."""
    out = os.fspath(out)
    if os.path.lexists(out):
        if directory and not os.path.isdir(out):
            raise InputError([f"{out}: exists and is not a directory (the hf target writes a directory)"])
        if not directory and os.path.isdir(out):
            raise InputError([f"{out}: is a directory (this target writes one file)"])
        if not force:
            raise InputError([f"{out}: already exists (use --force to replace it)"])


@contextlib.contextmanager
def atomic_output(out: str, directory: bool) -> Iterator[str]:
    """A temporary path beside ``out`` to write to; renamed to ``out`` only if the block succeeds.

    A directory replaces an existing one (``--force``) by two renames, so a reader sees the old
    or the new directory, never a half-written one.
    """
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(out)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
        os.close(fd)
    try:
        yield tmp
        if directory:
            old = None
            if os.path.isdir(out):
                old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
                os.rmdir(old)
                os.rename(out, old)
            os.rename(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise

