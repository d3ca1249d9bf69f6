"""Label files in blocks: the block grid, block writing, resume, assembly, and the merge of shards.

A dump labels its rows block by block (:class:`BlockGrid`); every finished block is written
atomically under ``{label}.parts/`` beside the fingerprint of the plan (:func:`resume`), and the
final files are assembled from the blocks and renamed into place at the end (:func:`assemble`),
so no final name ever holds a truncated file. ``merge`` joins the files of the shards of a split
(:func:`merge`).

Outputs, for ``split`` (or ``{split}_{rank}_{nshard}`` for a shard, as fairseq names shards):

* ``{split}.{name}`` -- fairseq's hard-label format, one line of cluster ids per manifest row;
* with ``soft``: the soft-label files of :mod:`dicehubert_fairseq.data.files` (top-k ids, most
  likely first, and their probabilities ``softmax(-d^2 / T)`` renormalised over the kept ids);
  the hard file is then their argmax. Their kept-mass statistic is summed exactly (integer
  units, :func:`kept_mass_units`), so blocks, shards and their merge all give the same bytes.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
from omegaconf import MISSING

from ..data.files import SoftLabels, SoftLabelWriter, atomic_write, read_manifest, soft_label_paths
from ..errors import InputError

logger = logging.getLogger(__name__)

#: The soft files' kept probability mass is summed in integer units of 2**-32 per frame: an exact,
#: order-free sum, so blocks, shards and their merge all give the same statistic.
KEPT_MASS_UNITS = 2 ** 32


def kept_mass_units(kept) -> int:
    """``sum(kept)`` in integer units of ``1 / KEPT_MASS_UNITS`` (exact and order-free).

    Args:
        kept: ``(T,)`` probability mass of the kept clusters of each frame (tensor or array).

    Returns:
        the sum of the per-frame masses, each rounded to a unit, as a Python int.
    """
    return int(np.rint(np.asarray(kept, dtype=np.float64) * KEPT_MASS_UNITS).astype(np.int64).sum())


def shard_range(total: int, nshard: int, rank: int, what: str = "") -> Tuple[int, int]:
    """Rows ``[start, end)`` of shard ``rank`` (0-based) of ``nshard``: fairseq's ``get_shard_range``.

    Raises:
        InputError: ``rank`` not in ``0..nshard-1``, or an empty shard (more shards than rows).
    """
    if nshard < 1:
        raise InputError([f"--nshard must be at least 1, found {nshard}"])
    if not 0 <= rank < nshard:
        raise InputError([f"--rank {rank} out of range: ranks are 0-based, expected 0..{nshard - 1} for --nshard {nshard}"])
    start = round(total / nshard * rank)
    end = round(total / nshard * (rank + 1))
    if start >= end:
        raise InputError([f"{what}: shard {rank} of {nshard} would be empty ({total} utterances); use fewer shards"])
    return start, end


def split_tag(split: str, nshard: int = 1, rank: int = 0) -> str:
    """``split`` or, for a shard, fairseq's ``{split}_{rank}_{nshard}``."""
    return split if nshard == 1 else f"{split}_{rank}_{nshard}"


# ------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Block:
    """One block of a shard: ``rows`` are labelled, the batches are planned over ``batch_rows``."""

    index: int
    rows: Tuple[int, ...]
    batch_rows: Tuple[int, ...]


@dataclass(frozen=True)
class BlockGrid:
    """The blocks of rows ``[start, end)`` of a manifest of ``total`` rows: what makes a dump's bytes
    the same whether it runs whole or in shards, uninterrupted or resumed, alone or after a fit.

    * Block ``g`` is manifest rows ``[g * size, (g + 1) * size)`` whatever the shard: a block is
      the same rows in every process, and a shard labels its rows of each block it meets.
    * A block's inference batches are planned over the whole block (``batch_rows``), whichever
      shard runs it (a shard computes the at most two batches it shares with a neighbour whole):
      batched float arithmetic changes in the last bits with the other rows of a batch. Features
      computed one utterance at a time (``alone``: MFCC, a teacher on CPU by default) need no such
      thing, and a shard reads its rows only.
    * A finished block is kept under its number; a rerun of the same plan (same fingerprint)
      skips it and computes the others exactly as an uninterrupted run does.

    So a row's labels depend on the block size, the batch size, the device, the dtype and the
    thread count only: shards, merged, equal one process's bytes, a resumed run an
    uninterrupted one's, and ``run``'s labels those of ``fit`` + ``dump`` (its cached features
    are computed alone, to the bit what recomputing them gives).
    """

    total: int
    start: int
    end: int
    size: int
    alone: bool

    def blocks(self) -> List[Block]:
        """The blocks of the shard, in row order."""
        out = []
        for g in range(self.start // self.size, (self.end - 1) // self.size + 1):
            cell = tuple(range(g * self.size, min((g + 1) * self.size, self.total)))
            rows = tuple(r for r in cell if self.start <= r < self.end)
            out.append(Block(g, rows, rows if self.alone else cell))
        return out


# ------------------------------------------------------------------------ blocks and resume


def write_block(path: str, rows: Tuple[int, ...], hard: Dict[int, np.ndarray],
                soft: Optional[Dict[int, Tuple[np.ndarray, np.ndarray]]], kept_units: int, n_clusters: int) -> None:
    """Write one finished block atomically: per row ``(T,)`` hard ids, and ``(T, k)`` soft ids and
    probabilities; ids as int16 where K allows it."""
    id_dtype = np.int16 if n_clusters <= np.iinfo(np.int16).max else np.int32
    arrays = {"lengths": np.asarray([len(hard[r]) for r in rows], dtype=np.int64),
              "hard": np.concatenate([hard[r] for r in rows]).astype(id_dtype),
              "kept_mass_units": np.asarray(kept_units, dtype=np.int64)}
    if soft is not None:
        arrays["ids"] = np.concatenate([soft[r][0] for r in rows]).astype(id_dtype)
        arrays["probs"] = np.concatenate([soft[r][1] for r in rows]).astype(np.float32)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def read_block(path: str) -> Dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def resume(parts: str, fingerprint: Dict[str, object], paths: Dict[int, str]) -> Set[int]:
    """Prepare the blocks directory of a dump; returns the blocks finished by an earlier run of the same plan.

    Args:
        parts: the directory (``{label}.parts``).
        fingerprint: the plan's; a directory left by another one is started over.
        paths: block number -> file of each block of the grid.
    """
    state_path = os.path.join(parts, "state.json")
    if os.path.isdir(parts):
        try:
            with open(state_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            old = None
        if old != fingerprint:
            logger.warning(f"{parts}: left by a run with different inputs or options; starting over")
            shutil.rmtree(parts)
    os.makedirs(parts, exist_ok=True)
    if not os.path.isfile(state_path):
        with atomic_write(state_path) as f:
            json.dump(fingerprint, f, indent=1, sort_keys=True)
    return {g for g, p in paths.items() if os.path.isfile(p)}


def assemble(plan, block_paths: List[str]) -> Tuple[int, int]:
    """The final files of a dump from its finished blocks: soft files first, then the hard file (each atomic).

    Returns:
        frames written, and the kept probability mass in units of ``1 / KEPT_MASS_UNITS``.
    """
    d = plan.dump
    total, kept = 0, 0
    if d.cfg.soft:
        meta = dict(temperature=float(d.temperature), temperature_gap=d.cfg.temperature_gap,
                    normalize=bool(d.model.normalize), features=plan.source.reader.description,
                    km=os.path.abspath(d.model.path))
        writer = SoftLabelWriter(d.cfg.label_dir, d.tag, d.cfg.name, d.model.n_clusters,
                                 min(d.cfg.top_k, d.model.n_clusters), meta=meta)
        try:
            for p in block_paths:
                blk = read_block(p)
                offs = np.concatenate([[0], np.cumsum(blk["lengths"])])
                for i in range(len(blk["lengths"])):
                    writer.add(blk["ids"][offs[i] : offs[i + 1]], blk["probs"][offs[i] : offs[i + 1]])
                kept += int(blk["kept_mass_units"])
                total += int(offs[-1])
            set_kept_mass(writer.meta, kept, total)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    total = 0
    with atomic_write(d.label_path) as f:
        for p in block_paths:
            blk = read_block(p)
            offs = np.concatenate([[0], np.cumsum(blk["lengths"])])
            for i in range(len(blk["lengths"])):
                f.write(" ".join(map(str, blk["hard"][offs[i] : offs[i + 1]].tolist())) + "\n")
            total += int(offs[-1])
    return total, kept


def set_kept_mass(meta: dict, units: int, frames: int) -> None:
    """Soft-file statistics: mean probability mass of the kept ids before renormalisation (1.0
    when top_k == K), and its exact sum (what :func:`merge` adds up)."""
    meta["kept_mass_units"] = int(units)
    meta["mean_kept_mass"] = units / KEPT_MASS_UNITS / max(frames, 1)


# ------------------------------------------------------------------------------------ merge


@dataclass
class MergeConfig:
    """Which shards ``dicehubert-labels merge`` joins; each field is an option."""

    label_dir: str = field(default=MISSING, metadata={"help": "directory with {split}_{rank}_{nshard}.{name}"})
    split: str = field(default=MISSING, metadata={"help": "the split whose shards are joined"})
    nshard: int = field(default=MISSING, metadata={"help": "number of shards"})
    name: str = field(default="km", metadata={"help": "label name"})
    manifest_dir: Optional[str] = field(default=None, metadata={
        "help": "if given, check the line count against {split}.tsv"})
    out_dir: Optional[str] = field(default=None, metadata={"help": "where to write (default --label-dir)"})


@dataclass(frozen=True)
class MergePlan:
    """Checked shards of a split: their hard files, their soft labels (empty if hard only), their lines."""

    cfg: MergeConfig
    hard_paths: Tuple[str, ...]
    soft: Tuple[SoftLabels, ...]
    lines: int
    label_path: str


def check_shards(cfg: MergeConfig) -> MergePlan:
    """Find and check every shard of ``cfg`` (see :func:`merge`).

    Raises:
        InputError: a missing shard (all are named), soft files on some shards only, different
            K / top-k across shards, line count != manifest.
    """
    if cfg.nshard < 1:
        raise InputError([f"--nshard must be at least 1, found {cfg.nshard}"])
    tags = [split_tag(cfg.split, cfg.nshard, r) for r in range(cfg.nshard)]
    hard_paths = [os.path.join(cfg.label_dir, f"{t}.{cfg.name}") for t in tags]
    missing = [f"{p}: shard not found (run 'dicehubert-labels dump ... --nshard {cfg.nshard} --rank {r}')"
               for r, p in enumerate(hard_paths) if not os.path.isfile(p)]
    if missing:
        raise InputError(missing)
    metas = [soft_label_paths(cfg.label_dir, t, cfg.name)["meta"] for t in tags]
    if any(map(os.path.isfile, metas)) and not all(map(os.path.isfile, metas)):
        raise InputError([f"{m}: soft labels missing for this shard (other shards have them)"
                          for m in metas if not os.path.isfile(m)])
    lines = 0
    for p in hard_paths:
        with open(p, "rb") as f:
            lines += sum(1 for _ in f)
    if cfg.manifest_dir is not None:
        manifest = read_manifest(os.path.join(cfg.manifest_dir, f"{cfg.split}.tsv"), check_root=False)
        if lines != len(manifest):
            raise InputError([f"{cfg.label_dir}: the {cfg.nshard} shards of {cfg.split}.{cfg.name} have {lines} "
                              f"lines, but {manifest.path} lists {len(manifest)} utterances"])
    soft = tuple(SoftLabels(cfg.label_dir, t, cfg.name) for t in tags) if os.path.isfile(metas[0]) else ()
    if len({s.n_clusters for s in soft}) > 1 or len({s.top_k for s in soft}) > 1:
        raise InputError([f"{cfg.label_dir}: shards of {cfg.split}.{cfg.name} differ in K "
                          f"{sorted({s.n_clusters for s in soft})} or top-k {sorted({s.top_k for s in soft})}"])
    label_path = os.path.join(cfg.out_dir or cfg.label_dir, f"{cfg.split}.{cfg.name}")
    return MergePlan(cfg, tuple(hard_paths), soft, lines, label_path)


def merge(plan) -> Dict[str, object]:
    """Join ``{split}_{r}_{nshard}.{name}`` (and their soft files, if any) into ``{split}.{name}``.

    Args:
        plan: a ``merge`` :class:`~.plan.LabelPlan` (shards checked by :func:`check_shards`).

    Returns:
        dict with ``label_path``, ``utterances``, ``frames``, ``soft``.
    """
    m = plan.merge
    cfg, out_dir = m.cfg, m.cfg.out_dir or m.cfg.label_dir
    if m.soft:
        _merge_soft(m, out_dir)
    frames = 0
    with atomic_write(m.label_path, "wb") as out:
        for p in m.hard_paths:
            with open(p, "rb") as f:
                for line in f:
                    out.write(line)
                    frames += len(line.split())
    dict_src = os.path.join(cfg.label_dir, f"dict.{cfg.name}.txt")
    dict_dst = os.path.join(out_dir, f"dict.{cfg.name}.txt")
    if os.path.abspath(dict_src) != os.path.abspath(dict_dst) and os.path.isfile(dict_src):
        with open(dict_src, "rb") as f, atomic_write(dict_dst, "wb") as g:
            g.write(f.read())
    logger.info(f"merged {cfg.nshard} shard(s) into {m.label_path}: {m.lines} utterances, {frames} frames"
                + (" (+ soft labels)" if m.soft else ""))
    return {"label_path": m.label_path, "utterances": m.lines, "frames": frames, "soft": bool(m.soft)}


def _merge_soft(m: MergePlan, out_dir: str) -> None:
    """The shards' soft files, one after the other, with the whole split's kept-mass statistic."""
    shards = m.soft
    meta = {k: v for k, v in shards[0].meta.items() if k not in ("n_clusters", "top_k", "n_utterances", "n_frames")}
    frames = [int(s.offsets[-1]) for s in shards]
    if all("kept_mass_units" in s.meta for s in shards):  # the whole split's statistic, not shard 0's
        set_kept_mass(meta, sum(int(s.meta["kept_mass_units"]) for s in shards), sum(frames))
    else:  # shards written before the exact sum: the frame-weighted mean
        meta.pop("kept_mass_units", None)
        meta["mean_kept_mass"] = (sum(float(s.meta.get("mean_kept_mass", 0.0)) * n for s, n in zip(shards, frames))
                                  / max(sum(frames), 1))
    writer = SoftLabelWriter(out_dir, m.cfg.split, m.cfg.name, shards[0].n_clusters, shards[0].top_k, meta=meta)
    try:
        for s in shards:
            for i in range(len(s)):
                a, b = s.frame_range(i)
                writer.add(np.asarray(s.ids[a:b]), np.asarray(s.probs[a:b]))
        writer.close()
    except BaseException:
        writer.abort()
        raise
