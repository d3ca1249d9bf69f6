"""Phone transcripts of the probe: ``{split}.phn`` beside ``{split}.tsv``, checked and encoded.

One line per manifest row, phones separated by white space.  A phone of valid/test that never
occurs in train cannot be predicted; by default (``unseen="unk"``) it becomes ``<unk>`` in the
reference, where it always counts as an error, and a warning names the file and line; with
``unseen="error"`` it is an :class:`~dicehubert_fairseq.errors.InputError`.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from ..data.files import Manifest, read_manifest
from ..errors import InputError, Problems, where

logger = logging.getLogger(__name__)

#: Reference id of a valid/test phone unseen in train: never predicted, always an error.
UNK_ID = -1
UNK = "<unk>"
UNSEEN_CHOICES = ("unk", "error")


@dataclass
class PhoneSplit:
    """A manifest and its phone transcripts.

    Attributes:
        name: split name, e.g. ``train``.
        manifest: the parsed ``{split}.tsv``.
        phn_path: the ``{split}.phn`` file.
        transcripts: one list of phone symbols per manifest row.
    """

    name: str
    manifest: Manifest
    phn_path: str
    transcripts: List[List[str]]

    def __len__(self) -> int:
        return len(self.manifest)

    def subset(self, rows: Sequence[int]) -> "PhoneSplit":
        """The manifest rows ``rows`` (0-based) in that order, with their transcripts."""
        m = self.manifest
        manifest = Manifest(m.path, m.root, [m.names[i] for i in rows], [m.sizes[i] for i in rows])
        return PhoneSplit(self.name, manifest, self.phn_path, [self.transcripts[i] for i in rows])


def read_transcripts(path: str, manifest: Manifest) -> List[List[str]]:
    """Read ``{split}.phn``: one line per row of ``manifest``, phones separated by white space.

    Raises:
        InputError: missing file, a line count different from the manifest's rows, or empty
            lines (each named by file and line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError([f"{path}: phone transcripts not found (expected one line of space-separated "
                          f"phones per row of {manifest.path})"])
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    problems = Problems()
    if len(lines) != len(manifest):
        problems.add(path, f"{path}: {len(lines)} lines, but {manifest.path} lists {len(manifest)} utterances "
                           f"(expected one transcript line per manifest row)")
    transcripts = [line.split() for line in lines]
    for lineno, phones in enumerate(transcripts[: len(manifest)], start=1):
        if not phones:
            problems.add(path, f"{where(path, lineno)}: empty transcript for {manifest.names[lineno - 1]} "
                               f"(expected at least one phone)")
    problems.raise_if_any()
    return transcripts


def load_split(data: str, split: str) -> PhoneSplit:
    """``{data}/{split}.tsv`` and ``{data}/{split}.phn``, checked (not the audio itself).

    Raises:
        InputError: every problem with the manifest or the transcripts.
    """
    manifest = read_manifest(os.path.join(data, f"{split}.tsv"))
    phn = os.path.join(data, f"{split}.phn")
    return PhoneSplit(split, manifest, phn, read_transcripts(phn, manifest))


def phone_inventory(transcripts: Sequence[Sequence[str]]) -> List[str]:
    """Sorted phone symbols of a split; the class id of ``phones[i]`` is ``i + 1`` (0 is blank)."""
    return sorted({p for t in transcripts for p in t})


def encode_transcripts(
    split: PhoneSplit, phones: Sequence[str], unseen: str = "unk"
) -> Tuple[List[List[int]], Dict[str, int]]:
    """Map a split's transcripts to class ids ``1..P`` of ``phones``.

    Args:
        split: transcripts to encode.
        phones: the phone inventory (of the training split).
        unseen: ``"unk"``: a phone not in ``phones`` becomes :data:`UNK_ID` (never predicted, so
            always an error) with a warning naming file and line; ``"error"``: raise.

    Returns:
        ``(ids, unseen_counts)``: per utterance its id list, and occurrences per unseen phone.

    Raises:
        InputError: ``unseen == "error"`` and a phone is not in ``phones``.
    """
    if unseen not in UNSEEN_CHOICES:
        raise ValueError(f"unseen must be one of {UNSEEN_CHOICES}, got {unseen!r}")
    index = {p: i + 1 for i, p in enumerate(phones)}
    encoded: List[List[int]] = []
    counts: Dict[str, int] = {}
    first: Dict[str, int] = {}
    for lineno, phs in enumerate(split.transcripts, start=1):
        ids = []
        for p in phs:
            i = index.get(p)
            if i is None:
                counts[p] = counts.get(p, 0) + 1
                first.setdefault(p, lineno)
                i = UNK_ID
            ids.append(i)
        encoded.append(ids)
    if counts:
        problems = Problems()
        for p in sorted(first, key=first.get):
            problems.add(split.phn_path, f"{where(split.phn_path, first[p])}: phone {p!r} does not occur in the "
                                         f"training transcripts ({counts[p]} occurrence(s) in this file)")
        if unseen == "error":
            problems.raise_if_any()
        for m in problems.kept:
            logger.warning(m + f"; scored as {UNK}, always an error")
        for m in problems.lines()[len(problems.kept):]:
            logger.warning(m)
    return encoded, counts


def load_splits(data: str, splits: Sequence[str]) -> Dict[str, PhoneSplit]:
    """Check and read the manifests and transcripts of ``splits`` (every problem at once).

    Raises:
        InputError: all problems of all splits.
    """
    problems: List[str] = []
    out: Dict[str, PhoneSplit] = {}
    for split in dict.fromkeys(splits):
        try:
            out[split] = load_split(data, split)
        except InputError as e:
            problems.extend(e.problems)
    if problems:
        raise InputError(problems)
    return out
