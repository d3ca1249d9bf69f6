"""Checks of manifests, audio and label files, run before hours of work start.

Used by the ``dicehubert`` task (before training) and by ``dicehubert-labels check``.
Every check returns *all* the problems it finds as one-line messages naming file and line.
"""

import logging
import os
from typing import List, Optional, Sequence

import soundfile as sf

from ..errors import InputError, Problems, where
from .files import Manifest, SoftLabels, duration_mismatch, read_dictionary_symbols, read_manifest

logger = logging.getLogger(__name__)

#: Samples in the receptive field of HuBERT's conv front end (one 20 ms frame at 16 kHz).
MIN_SAMPLES = 400


def check_audio(manifest: Manifest, sample_rate: int = 16000, headers: bool = False, out: Optional[Problems] = None,
                rows: Optional[Sequence[int]] = None) -> List[str]:
    """Audio files of a manifest: present (and, with ``headers``, readable, mono, at ``sample_rate``,
    as long as the manifest says, at least :data:`MIN_SAMPLES`).

    Args:
        rows: 0-based rows to check (a shard, a k-means sample); None: every row.
    """
    col = out or Problems()
    for i in range(len(manifest)) if rows is None else rows:
        name, size = manifest.names[i], manifest.sizes[i]
        line = i + 2
        loc = where(manifest.path, line)
        path = manifest.audio_path(i)
        if size < MIN_SAMPLES:
            col.add(manifest.path, f"{loc}: {name} has {size} samples, shorter than the model's "
                                   f"receptive field ({MIN_SAMPLES} samples)")
        if not os.path.isfile(path):
            col.add(manifest.path, f"{loc}: audio file {path} not found")
            continue
        if not headers:
            continue
        try:
            info = sf.info(path)
        except Exception as e:  # soundfile raises RuntimeError/LibsndfileError/TypeError
            col.add(manifest.path, f"{loc}: {path} is not readable audio ({str(e).splitlines()[0][:120]})")
            continue
        if info.samplerate != sample_rate:
            col.add(manifest.path, f"{loc}: {path} has sample rate {info.samplerate} Hz, expected {sample_rate} Hz")
        if info.channels != 1:
            col.add(manifest.path, f"{loc}: {path} has {info.channels} channels, expected mono")
        if info.frames != size:
            col.add(manifest.path, f"{loc}: {path} has {info.frames} samples, the manifest says {size}")
    return col.kept if out is not None else col.lines()


def check_labels(
    manifest: Manifest,
    label_dir: str,
    split: str,
    label: str,
    label_rate: float,
    sample_rate: int = 16000,
    soft: bool = False,
    tolerance: float = 0.1,
    out: Optional[Problems] = None,
) -> List[str]:
    """One label stream against its manifest: dictionary, line count, tokens, lengths, soft files."""
    col = out or Problems()
    dict_path = os.path.join(label_dir, f"dict.{label}.txt")
    try:
        symbols = set(read_dictionary_symbols(dict_path))
    except InputError as e:
        for p in e.problems:
            col.add(dict_path, p)
        symbols = None
    path = os.path.join(label_dir, f"{split}.{label}")
    if not os.path.isfile(path):
        col.add(path, f"{path}: label file not found (expected one line per row of {manifest.path})")
        return col.kept if out is not None else col.lines()
    lengths = []
    with open(path, "rb") as f:  # lines end at b"\n" only, as DiceHubertDataset reads them
        for lineno, raw in enumerate(f, start=1):
            body = raw[:-1] if raw.endswith(b"\n") else raw
            body = body[:-1] if body.endswith(b"\r") else body  # CRLF is fine
            try:
                line = body.decode("utf-8")
            except UnicodeDecodeError as e:
                col.add(path, f"{where(path, lineno)}: not UTF-8 text (byte {body[e.start:e.start + 1]!r})")
                lengths.append(len(body.split()))
                continue
            if "\r" in line:  # fairseq's own readers would see a line break there
                col.add(path, f"{where(path, lineno)}: carriage return (\\r) inside the line")
            tokens = line.split()
            lengths.append(len(tokens))
            if lineno > len(manifest):
                continue
            size = manifest.sizes[lineno - 1]
            if label_rate > 0:
                if not tokens:
                    col.add(path, f"{where(path, lineno)}: empty label line for {manifest.names[lineno - 1]} "
                                  f"({size} samples)")
                elif duration_mismatch(size, sample_rate, len(tokens), label_rate) > tolerance:
                    expected = size / sample_rate * label_rate
                    col.add(path, f"{where(path, lineno)}: {len(tokens)} labels for {manifest.names[lineno - 1]} "
                                  f"({size} samples), expected about {expected:.0f} at label_rate {label_rate:g} Hz")
            if symbols is not None:
                unknown = [t for t in set(tokens) if t not in symbols]
                if unknown:
                    col.add(path, f"{where(path, lineno)}: label(s) {sorted(unknown)[:5]} not in {dict_path} "
                                  f"({len(symbols)} symbols)")
    if len(lengths) != len(manifest):
        col.add(path, f"{path}: {len(lengths)} lines, but {manifest.path} lists {len(manifest)} utterances")
    if soft:
        try:
            sl = SoftLabels(label_dir, split, label)
        except InputError as e:
            for p in e.problems:
                col.add(path, p)
        else:
            for p in sl.validate(num_utterances=len(manifest)):
                col.add(sl.paths["ids"], p)
            if symbols is not None and sl.n_clusters != len(symbols):
                col.add(sl.paths["meta"], f"{sl.paths['meta']}: soft labels have K={sl.n_clusters} clusters, "
                                          f"but {dict_path} has {len(symbols)} symbols")
            if len(sl) == len(lengths):
                for i, n in enumerate(lengths):
                    a, b = sl.frame_range(i)
                    if b - a != n:
                        col.add(sl.paths["offsets"], f"{sl.paths['offsets']}: utterance {i + 1} has {b - a} soft "
                                                     f"frames but line {i + 1} of {path} has {n} labels")
    return col.kept if out is not None else col.lines()


def check_split(
    manifest_dir: str,
    split: str,
    label_dir: Optional[str],
    labels: Sequence[str],
    label_rate: float,
    sample_rate: int = 16000,
    soft_labels: Sequence[str] = (),
    audio_headers: bool = False,
    tolerance: float = 0.1,
) -> List[str]:
    """Everything wrong with ``split`` (manifest, audio, every label stream), as messages."""
    path = os.path.join(manifest_dir, f"{split}.tsv")
    try:
        manifest = read_manifest(path)
    except InputError as e:
        return e.problems
    col = Problems()
    check_audio(manifest, sample_rate, headers=audio_headers, out=col)
    label_dir = manifest_dir if label_dir is None else label_dir
    for label in labels:
        check_labels(manifest, label_dir, split, label, label_rate, sample_rate,
                     soft=label in soft_labels, tolerance=tolerance, out=col)
    return col.lines()


def require_valid(problems: List[str], what: str = "") -> None:
    """Raise :class:`InputError` listing ``problems`` if there are any."""
    if problems:
        head = f"{len(problems)} problem(s) found{(' in ' + what) if what else ''}:"
        raise InputError([head] + ["  " + p for p in problems])
