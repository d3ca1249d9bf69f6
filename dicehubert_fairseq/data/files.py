"""Readers and writers for the files DiceHuBERT exchanges with fairseq.

fairseq formats (read unchanged by ``HubertDataset`` and fairseq's own scripts):

* ``{split}.tsv`` -- first line the audio root, then ``relative/path.wav<TAB>num_samples``.
* ``{split}.{label}`` -- one line per manifest row, space-separated label tokens.
* ``dict.{label}.txt`` -- ``symbol count`` per line.

Soft labels (ours), for a label stream ``{label}`` of ``K`` clusters kept to its ``k`` most
likely clusters per frame, beside the hard ``{split}.{label}`` (the argmax, always written):

* ``{split}.{label}.soft_ids.npy`` -- ``(num_frames, k)`` int16/int32 cluster ids, most likely first;
* ``{split}.{label}.soft_probs.npy`` -- ``(num_frames, k)`` float32 probabilities (each row sums
  to 1 over the kept ids);
* ``{split}.{label}.soft_offsets.npy`` -- ``(num_utterances + 1,)`` int64 frame offsets;
* ``{split}.{label}.soft.json`` -- ``{"n_clusters", "top_k", "temperature", "normalize", ...}``.

All arrays are plain ``.npy`` files, memory-mapped on read.
"""

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError, Problems, where

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **kwargs):
    """Open a temporary file beside ``path``; rename it to ``path`` only if the block succeeds.

    No reader ever sees a truncated file under the final name.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class Manifest:
    """A parsed ``{split}.tsv``.

    Attributes:
        path: the manifest file.
        root: audio root (first line).
        names: relative audio paths, one per row.
        sizes: number of samples of each row.
    """

    path: str
    root: str
    names: List[str]
    sizes: List[int]

    def __len__(self) -> int:
        return len(self.names)

    def audio_path(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])


def read_manifest(path: str, check_root: bool = True) -> Manifest:
    """Parse a fairseq audio manifest, reporting every malformed line.

    Raises:
        InputError: the file is missing or empty, the root directory is missing, or rows are
            not ``path<TAB>positive integer``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError([f"{path}: manifest not found (expected a file '<root>\\n<path>\\t<samples>...')"])
    problems = Problems()
    names: List[str] = []
    sizes: List[int] = []
    lines = _read_lines(path)
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise InputError([f"{where(path, 1)}: manifest is empty (expected the audio root directory on line 1)"])
    stray = [i for i, line in enumerate(lines, start=1) if "\r" in (line[:-1] if line.endswith("\r") else line)]
    if stray:  # fairseq reads '\r' as a line break: it would see other lines than we do
        for i in stray:
            problems.add(path, f"{where(path, i)}: carriage return (\\r) inside the line")
        problems.raise_if_any()
    root = lines[0].strip()
    if check_root and not os.path.isdir(root):
        problems.add(path, f"{where(path, 1)}: audio root directory '{root}' does not exist")
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.strip()  # as fairseq's load_audio
        items = line.split("\t")
        if len(items) != 2 or not items[0]:
            problems.add(path, f"{where(path, lineno)}: expected '<relative path><TAB><num samples>', "
                               f"found {line[:80]!r}")
            continue
        try:
            size = int(items[1])
        except ValueError:
            problems.add(path, f"{where(path, lineno)}: num samples must be an integer, found {items[1][:40]!r}")
            continue
        if size <= 0:
            problems.add(path, f"{where(path, lineno)}: num samples must be positive, found {size}")
            continue
        names.append(items[0])
        sizes.append(size)
    if not problems.kept and not names:
        problems.add(path, f"{path}: manifest lists no audio (expected at least one row after the root line)")
    problems.raise_if_any()
    return Manifest(path=path, root=root, names=names, sizes=sizes)


def _read_lines(path: str) -> List[str]:
    """The file's text split at ``\\n`` only (a ``\\r`` before it is kept); InputError if not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError([f"{where(path, line)}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} "
                          f"at offset {e.start})"]) from None


#: Symbols every fairseq ``Dictionary`` starts with: a ``dict.{label}.txt`` may not list them again.
FAIRSEQ_SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")


def read_dictionary_symbols(path: str) -> List[str]:
    """Symbols of a fairseq ``dict.{label}.txt`` in file order; errors for missing/empty/duplicates.

    Accepts exactly what fairseq's ``Dictionary.load`` accepts (``<symbol> <count>`` lines, the
    ``#fairseq:overwrite`` flag; no blank lines; no symbol twice, fairseq's own ``<s> <pad> </s>
    <unk>`` included), so a file that passes never fails later inside fairseq.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError([f"{path}: label dictionary not found (expected lines '<symbol> <count>')"])
    symbols: List[str] = []
    seen: Dict[str, int] = {}
    problems = Problems()
    text = "\n".join(_read_lines(path))
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):  # fairseq's line breaks
        line = line.rstrip()
        parts = line.rsplit(" ", 1)
        overwrite = len(parts) == 2 and parts[1] == "#fairseq:overwrite"
        if overwrite:
            parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2:
            what = "blank line" if not line else f"found {line[:80]!r}"
            problems.add(path, f"{where(path, lineno)}: expected '<symbol> <count>', {what}")
            continue
        sym, count = parts
        try:
            int(count)
        except ValueError:
            problems.add(path, f"{where(path, lineno)}: count must be an integer, found {count[:40]!r}")
            continue
        if overwrite:  # fairseq appends the symbol again and points it at the new index
            seen.setdefault(sym, lineno)
            symbols.append(sym)
            continue
        if sym in FAIRSEQ_SPECIAL_SYMBOLS:
            problems.add(path, f"{where(path, lineno)}: {sym!r} is one of fairseq's special symbols "
                               f"{list(FAIRSEQ_SPECIAL_SYMBOLS)}, which every dictionary already has")
            continue
        if sym in seen:
            problems.add(path, f"{where(path, lineno)}: duplicate symbol {sym!r} (first on line {seen[sym]})")
            continue
        seen[sym] = lineno
        symbols.append(sym)
    if not problems.kept and not symbols:
        problems.add(path, f"{path}: label dictionary is empty (expected one '<symbol> <count>' line per label)")
    problems.raise_if_any()
    return symbols


def write_dictionary(path: str, n_clusters: int) -> None:
    """Write ``dict.{label}.txt`` for cluster ids ``0..K-1`` whole and atomically (idempotent)."""
    with atomic_write(path) as f:
        for i in range(n_clusters):
            f.write(f"{i} 1\n")


def soft_label_paths(label_dir: str, split: str, label: str) -> Dict[str, str]:
    """Paths of the soft-label files of stream ``label`` for ``split``."""
    base = os.path.join(label_dir, f"{split}.{label}")
    return {
        "ids": base + ".soft_ids.npy",
        "probs": base + ".soft_probs.npy",
        "offsets": base + ".soft_offsets.npy",
        "meta": base + ".soft.json",
    }


class SoftLabels:
    """Memory-mapped reader of a soft-label stream (format in the module docstring).

    Args:
        label_dir: directory holding the files.
        split: e.g. ``train``.
        label: label stream name.

    Attributes:
        ids: ``(num_frames, k)`` cluster ids, most likely first.
        probs: ``(num_frames, k)`` float32 probabilities.
        offsets: ``(num_utterances + 1,)`` int64.
        meta: the json sidecar as a dict.
    """

    def __init__(self, label_dir: str, split: str, label: str):
        self.paths = soft_label_paths(label_dir, split, label)
        missing = [p for p in self.paths.values() if not os.path.isfile(p)]
        if missing:
            raise InputError(
                [f"{p}: soft-label file not found (write it with 'dicehubert-labels dump --soft')" for p in missing]
            )
        with open(self.paths["meta"], "rb") as f:
            try:
                self.meta = json.loads(f.read().decode("utf-8"))
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
                raise InputError([f"{self.paths['meta']}: not valid JSON ({str(e)[:200]})"]) from None
        K = self.meta.get("n_clusters") if isinstance(self.meta, dict) else None
        if not isinstance(K, int) or isinstance(K, bool) or K < 1:
            raise InputError([f"{self.paths['meta']}: expected a JSON object with an integer \"n_clusters\" >= 1, "
                              f"found {str(K if isinstance(self.meta, dict) else self.meta)[:80]}"])
        arrays = {}
        for key in ("ids", "probs", "offsets"):
            try:
                arrays[key] = np.load(self.paths[key], mmap_mode="r" if key != "offsets" else None)
            except (ValueError, OSError, EOFError) as e:
                raise InputError([f"{self.paths[key]}: not a readable .npy array ({str(e)[:200]})"]) from None
        self.ids, self.probs, self.offsets = arrays["ids"], arrays["probs"], arrays["offsets"]
        problems = []
        for key, kind, what in (("ids", "iu", "integer"), ("probs", "f", "floating-point"), ("offsets", "iu", "integer")):
            if arrays[key].dtype.kind not in kind:
                problems.append(f"{self.paths[key]}: expected {what} values, found dtype {arrays[key].dtype}")
        if problems:
            raise InputError(problems)
        if self.ids.ndim != 2 or self.probs.shape != self.ids.shape:
            problems.append(
                f"{self.paths['probs']}: expected ids and probs of the same shape (frames, k), "
                f"found {self.ids.shape} and {self.probs.shape}"
            )
        if self.offsets.ndim != 1 or len(self.offsets) < 2 or self.offsets[0] != 0 or (
            self.ids.ndim == 2 and self.offsets[-1] != self.ids.shape[0]
        ) or np.any(np.diff(self.offsets) < 0):
            problems.append(
                f"{self.paths['offsets']}: expected non-decreasing offsets from 0 to the number of "
                f"frames ({self.ids.shape[0] if self.ids.ndim else '?'})"
            )
        if problems:
            raise InputError(problems)

    @property
    def n_clusters(self) -> int:
        return int(self.meta["n_clusters"])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def frame_range(self, utt: int):
        return int(self.offsets[utt]), int(self.offsets[utt + 1])

    def validate(self, num_utterances: Optional[int] = None, atol: float = 1e-3) -> List[str]:
        """Every problem with the values (K range, probabilities, utterance count), as messages."""
        problems = []
        K = self.n_clusters
        if num_utterances is not None and len(self) != num_utterances:
            problems.append(
                f"{self.paths['offsets']}: {len(self)} utterances, but the manifest has {num_utterances}"
            )
        chunk = 1 << 20
        for start in range(0, self.ids.shape[0], chunk):
            ids = np.asarray(self.ids[start : start + chunk])
            probs = np.asarray(self.probs[start : start + chunk], dtype=np.float64)
            bad = np.flatnonzero((ids < 0).any(1) | (ids >= K).any(1))
            if len(bad):
                problems.append(
                    f"{self.paths['ids']}: frame {start + bad[0]}: cluster id outside 0..{K - 1} "
                    f"(found {ids[bad[0]].tolist()}; {len(bad)} such frames in this block)"
                )
                break
            sums = probs.sum(1)
            bad = np.flatnonzero(~np.isfinite(sums) | (np.abs(sums - 1.0) > atol) | (probs < 0).any(1))
            if len(bad):
                problems.append(
                    f"{self.paths['probs']}: frame {start + bad[0]}: probabilities must be >= 0 and sum "
                    f"to 1, found sum {sums[bad[0]]:.4f} ({len(bad)} such frames in this block)"
                )
                break
        return problems


class SoftLabelWriter:
    """Streams soft labels utterance by utterance into the format above (atomic on close).

    Args:
        label_dir, split, label: where to write.
        n_clusters: K (the dictionary size).
        top_k: how many clusters to keep per frame.
        meta: extra fields for the json sidecar (temperature, normalize, ...).
    """

    def __init__(self, label_dir: str, split: str, label: str, n_clusters: int, top_k: int, meta: Optional[dict] = None):
        self.paths = soft_label_paths(label_dir, split, label)
        self.n_clusters = int(n_clusters)
        self.top_k = int(top_k)
        self.id_dtype = np.int16 if n_clusters <= np.iinfo(np.int16).max else np.int32
        self.meta = dict(meta or {})
        os.makedirs(label_dir, exist_ok=True)
        self._tmp = {k: p + ".partial" for k, p in self.paths.items()}
        self._ids = open(self._tmp["ids"] + ".raw", "wb")
        self._probs = open(self._tmp["probs"] + ".raw", "wb")
        self._offsets = [0]

    def add(self, ids: np.ndarray, probs: np.ndarray) -> None:
        """Append one utterance: ``ids`` and ``probs`` of shape ``(T, k)``."""
        assert ids.shape == probs.shape and ids.shape[1] == self.top_k, (ids.shape, probs.shape)
        self._ids.write(np.ascontiguousarray(ids, dtype=self.id_dtype).tobytes())
        self._probs.write(np.ascontiguousarray(probs, dtype=np.float32).tobytes())
        self._offsets.append(self._offsets[-1] + ids.shape[0])

    def close(self) -> None:
        """Convert the raw streams to ``.npy`` and move every file to its final name."""
        self._ids.close()
        self._probs.close()
        n = self._offsets[-1]
        for key, dtype in (("ids", self.id_dtype), ("probs", np.float32)):
            raw = self._tmp[key] + ".raw"
            src = np.memmap(raw, dtype=dtype, mode="r", shape=(n, self.top_k)) if n else np.zeros((0, self.top_k), dtype)
            dst = np.lib.format.open_memmap(self._tmp[key], mode="w+", dtype=dtype, shape=(n, self.top_k))
            step = 1 << 20
            for s in range(0, n, step):
                dst[s : s + step] = src[s : s + step]
            dst.flush()
            del dst, src
            os.unlink(raw)
        with open(self._tmp["offsets"], "wb") as f:
            np.save(f, np.asarray(self._offsets, dtype=np.int64))
        meta = dict(self.meta, n_clusters=self.n_clusters, top_k=self.top_k,
                    n_utterances=len(self._offsets) - 1, n_frames=n)
        with open(self._tmp["meta"], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        # the sidecar goes last: its presence means the arrays are complete
        for key in ("ids", "probs", "offsets", "meta"):
            os.replace(self._tmp[key], self.paths[key])

    def abort(self) -> None:
        for f in (self._ids, self._probs):
            f.close()
        for p in list(self._tmp.values()) + [self._tmp["ids"] + ".raw", self._tmp["probs"] + ".raw"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def label_lengths(path: str) -> List[int]:
    """Number of tokens on every line of a label file."""
    with open(path, encoding="utf-8") as f:
        return [len(line.split()) for line in f]


def duration_mismatch(num_samples: int, sample_rate: float, num_labels: int, label_rate: float) -> float:
    """Seconds by which ``num_labels`` at ``label_rate`` differ from the audio's duration."""
    return abs(num_samples / sample_rate - num_labels / label_rate)


__all__: Sequence[str] = (
    "Manifest", "SoftLabels", "SoftLabelWriter", "atomic_write", "read_manifest",
    "read_dictionary_symbols", "write_dictionary", "soft_label_paths", "label_lengths",
)
