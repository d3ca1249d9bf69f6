"""Label quality against frame-level phone alignments: phone purity, cluster purity, PNMI.

HuBERT's own measures of how well k-means labels match phones (Hsu et al. 2021, "HuBERT:
Self-supervised speech representation learning by masked prediction of hidden units", the
section on cluster quality), computed before any training: with ``y`` a frame's phone, ``z`` its
cluster id and ``p(y, z)`` their joint distribution over all frames,

* phone purity ``= E_{p(z)}[max_y p(y | z)] = sum_z max_y p(y, z)``: how much one cluster is one
  phone (the phone accuracy of mapping every cluster to its most frequent phone);
* cluster purity ``= E_{p(y)}[max_z p(z | y)] = sum_y max_z p(y, z)``: how much one phone is one
  cluster (falls as K grows);
* PNMI ``= I(y; z) / H(y)``: the fraction of the phone's uncertainty a cluster id removes.

fairseq's ``examples/hubert/measure_teacher_quality.py`` computes the same quantities (its "ref
pur", "hyp pur" and "MI/H(ref)"); ``tests/test_labels_quality.py`` checks this module against it.

Input (see :class:`QualityConfig`): the label file ``{label_dir}/{split}.{name}`` (fairseq's
format, one line per manifest row) and an alignment file with the same rows: one line per
utterance, one phone symbol per frame at ``align_rate`` frames per second, separated by spaces
(``examples/tiny/synth_corpus.py --align`` writes ``{split}.align`` at 100 Hz).  The two are
paired on the finer of their two frame grids: each frame ``i`` of the finer stream meets frame
``floor(i * coarse_rate / fine_rate)`` of the coarser one (for 50 Hz labels and 100 Hz phones,
each label covers two phone frames, as fairseq's script's ``--upsample 2``).  Lengths may differ
by up to ``tolerance`` seconds (conv front ends drop edge frames); the longer tail is left out.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import MISSING

from ..data.files import atomic_write
from ..errors import InputError, Problems, where

logger = logging.getLogger(__name__)


def quality_from_counts(counts: np.ndarray) -> Dict[str, float]:
    """Phone purity, cluster purity and PNMI of a phone x cluster count matrix.

    Args:
        counts: ``(P, K)`` frames of phone ``i`` labelled cluster ``j`` (any non-negative numbers,
            not all zero).

    Returns:
        dict with ``phone_purity``, ``cluster_purity``, ``pnmi`` (``I(y; z) / H(y)``; 0 when
        ``H(y) = 0``), ``mi_bits``, ``phone_entropy_bits``, ``cluster_entropy_bits``.
    """
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum()
    py, pz = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / np.outer(py, pz)[nz])).sum())

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log2(q)).sum())

    hy, hz = entropy(py), entropy(pz)
    return {"phone_purity": float(p.max(0).sum()), "cluster_purity": float(p.max(1).sum()),
            "pnmi": max(mi, 0.0) / hy if hy > 0 else 0.0, "mi_bits": max(mi, 0.0),
            "phone_entropy_bits": hy, "cluster_entropy_bits": hz}


def pair_frames(labels: Sequence[str], phones: Sequence[str], label_rate: float,
                align_rate: float) -> Tuple[List[str], List[str], int]:
    """Pair an utterance's labels with its phones on the finer of the two frame grids.

    Args:
        labels: ``(T_l,)`` cluster ids at ``label_rate``.
        phones: ``(T_p,)`` phone symbols at ``align_rate``.

    Returns:
        ``(phones, labels, unpaired)``: equal-length lists, every frame ``i`` of the finer stream
        with frame ``floor(i * coarse / fine)`` of the coarser one while both exist, and how many
        frames of the two streams were left unpaired (the longer one's tail).
    """
    if align_rate >= label_rate:
        fine, coarse, ratio = phones, labels, label_rate / align_rate
    else:
        fine, coarse, ratio = labels, phones, align_rate / label_rate
    idx = np.floor(np.arange(len(fine)) * ratio + 1e-9).astype(np.int64)
    n = int((idx < len(coarse)).sum())
    paired = [coarse[i] for i in idx[:n]]
    unpaired = (len(fine) - n) + (len(coarse) - (int(idx[n - 1]) + 1 if n else 0))
    fine = list(fine[:n])
    return ((fine, paired) if align_rate >= label_rate else (paired, fine)) + (unpaired,)


def _read_rows(path: str, what: str) -> List[List[str]]:
    if not os.path.isfile(path):
        raise InputError([f"{path}: {what} not found"])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.split() for line in lines]


def joint_counts(label_rows: Sequence[Sequence[str]], phone_rows: Sequence[Sequence[str]], label_rate: float,
                 align_rate: float, tolerance: float, label_path: str = "labels", align_path: str = "alignments",
                 exclude: Sequence[str] = ()) -> Tuple[np.ndarray, List[str], List[str], Dict[str, int]]:
    """Phone x cluster counts over every paired frame of every utterance.

    Args:
        label_rows / phone_rows: per utterance, the label tokens and the phone symbols.
        label_rate / align_rate: their frame rates (Hz).
        tolerance: seconds two rows' durations may differ by.
        label_path / align_path: the files, for error messages.
        exclude: phone symbols whose frames are left out (e.g. silence).

    Returns:
        ``(counts (P, K), phones, clusters, stats)`` with ``stats``: ``frames`` paired,
        ``excluded`` frames, ``unpaired`` frames (tails beyond the shorter row).

    Raises:
        InputError: different numbers of rows, or a row whose durations differ by more than
            ``tolerance`` (each named with its line).
    """
    if len(label_rows) != len(phone_rows):
        raise InputError([f"{align_path}: {len(phone_rows)} lines, but {label_path} has {len(label_rows)} "
                          f"(expected one line per manifest row in both)"])
    problems = Problems()
    pairs_p, pairs_l = [], []
    unpaired = 0
    for i, (lab, ph) in enumerate(zip(label_rows, phone_rows)):
        d_lab, d_ph = len(lab) / label_rate, len(ph) / align_rate
        if abs(d_lab - d_ph) > tolerance:
            problems.add(align_path, f"{where(align_path, i + 1)}: {len(ph)} phones at {align_rate:g} Hz "
                         f"({d_ph:.3f} s), but line {i + 1} of {label_path} has {len(lab)} labels at "
                         f"{label_rate:g} Hz ({d_lab:.3f} s): expected durations within {tolerance:g} s")
            continue
        p, lab_paired, left = pair_frames(lab, ph, label_rate, align_rate)
        unpaired += left
        pairs_p.extend(p)
        pairs_l.extend(lab_paired)
    problems.raise_if_any()
    phones_all = np.asarray(pairs_p, dtype=object)
    labels_all = np.asarray(pairs_l, dtype=object)
    keep = ~np.isin(phones_all, list(exclude)) if exclude else np.ones(len(phones_all), dtype=bool)
    if not keep.any():
        raise InputError([f"{align_path}: no frames to compare (after excluding {list(exclude)})"])
    phones, pi = np.unique(phones_all[keep].astype(str), return_inverse=True)
    clusters, ci = np.unique(labels_all[keep].astype(str), return_inverse=True)
    counts = np.zeros((len(phones), len(clusters)), dtype=np.int64)
    np.add.at(counts, (pi, ci), 1)
    stats = {"frames": int(keep.sum()), "excluded": int((~keep).sum()), "unpaired": int(unpaired)}
    return counts, phones.tolist(), clusters.tolist(), stats


@dataclass
class QualityConfig:
    """What ``dicehubert-labels quality`` compares; each field is an option."""

    label_dir: str = field(default=MISSING, metadata={"help": "directory with {split}.{name} label files"})
    labels: List[str] = field(default_factory=lambda: ["km"], metadata={
        "help": "label names to measure, one row each (e.g. it2_l3 it2_l6 it2_l9 it2_l12 to rank layers)"})
    split: str = field(default="valid", metadata={"help": "split whose labels are measured"})
    align: str = field(default=MISSING, metadata={
        "help": "frame-level phone alignments of the split: one line per manifest row, one phone per frame"})
    align_rate: float = field(default=100.0, metadata={"help": "frames per second of --align"})
    label_rate: float = field(default=50.0, metadata={
        "help": "labels per second (50 for HuBERT layers, 100 for MFCC)"})
    tolerance: float = field(default=0.1, metadata={
        "help": "seconds a label line and its alignment line may differ by"})
    exclude: List[str] = field(default_factory=list, metadata={
        "help": "phone symbols left out (e.g. the silence symbol)"})
    json: Optional[str] = field(default=None, metadata={"help": "also write the results to this JSON file"})


def measure_quality(cfg: QualityConfig) -> List[Dict[str, object]]:
    """Phone purity, cluster purity and PNMI of each label stream against the alignments.

    Returns:
        one dict per name of ``cfg.labels``: ``name``, ``label_path``, the metrics of
        :func:`quality_from_counts`, ``frames``, ``excluded``, ``unpaired``, ``phones`` and
        ``clusters`` (how many distinct ones were seen).  Written to ``cfg.json`` if given.

    Raises:
        InputError: missing files, row counts or durations that do not match, bad rates.
    """
    if not cfg.align_rate > 0 or not cfg.label_rate > 0:
        raise InputError([f"--align-rate and --label-rate must be > 0, found {cfg.align_rate:g} and "
                          f"{cfg.label_rate:g}"])
    phone_rows = _read_rows(cfg.align, "phone alignment file")
    results = []
    for name in cfg.labels:
        label_path = os.path.join(cfg.label_dir, f"{cfg.split}.{name}")
        label_rows = _read_rows(label_path, "label file")
        counts, phones, clusters, stats = joint_counts(label_rows, phone_rows, cfg.label_rate, cfg.align_rate,
                                                       cfg.tolerance, label_path, cfg.align, cfg.exclude)
        row = {"name": name, "label_path": label_path, **quality_from_counts(counts), **stats,
               "phones": len(phones), "clusters": len(clusters)}
        logger.info(f"{name}: phone purity {row['phone_purity']:.4f}, cluster purity {row['cluster_purity']:.4f}, "
                    f"PNMI {row['pnmi']:.4f} on {stats['frames']} frames")
        results.append(row)
    if cfg.json:
        with atomic_write(cfg.json) as f:
            json.dump({"split": cfg.split, "align": os.path.abspath(cfg.align), "align_rate": cfg.align_rate,
                       "label_rate": cfg.label_rate, "exclude": list(cfg.exclude), "results": results}, f, indent=1)
    return results


def format_table(results: Sequence[Dict[str, object]]) -> str:
    """The results as a Markdown table (one row per label stream)."""
    lines = ["| labels | frames | phones | clusters | phone purity | cluster purity | PNMI |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['frames']} | {r['phones']} | {r['clusters']} | {r['phone_purity']:.4f} | "
                     f"{r['cluster_purity']:.4f} | {r['pnmi']:.4f} |")
    return "\n".join(lines)


__all__ = ["QualityConfig", "measure_quality", "quality_from_counts", "joint_counts", "pair_frames", "format_table"]
