"""What every export target shares besides its source (:class:`dicehubert_fairseq.checkpoint.Source`):
the tensors it keeps and drops, sizes, and atomic output.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Dict, Iterator, Sequence, Tuple

import torch

from ..errors import InputError


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

