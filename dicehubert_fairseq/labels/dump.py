"""Label dumping: features -> nearest centroid (hard) and softmax over centroids (soft).

Outputs, for ``split`` (or ``{split}_{rank}_{nshard}`` for a shard, as fairseq names shards),
in ``label_dir``:

* ``{split}.{name}`` -- fairseq's hard-label format, one line of cluster ids per manifest row;
* with ``soft``: the soft-label files of :mod:`dicehubert_fairseq.data.files` (top-k ids, most
  likely first, and their probabilities ``softmax(-d^2 / T)`` renormalised over the kept ids);
  the hard file is then their argmax;
* ``dict.{name}.txt`` -- cluster ids ``0..K-1``.

Resumable: rows are processed in blocks (``block_size`` manifest rows, length-sorted inside a
block for batched inference) and every finished block is written atomically under
``{split}.{name}.parts/`` beside a fingerprint of the command.  A killed run restarted with the
same command skips the finished blocks (a different command starts over); final files are
assembled from the blocks and renamed into place at the end, so no final name ever holds a
truncated file.  Blocks do not depend on where a previous run stopped, so a resumed run writes
the same bytes as an uninterrupted one.

Shards write the same bytes as one process: blocks lie on one grid of the whole manifest (block
``g`` is rows ``[g * block_size, (g + 1) * block_size)``), a shard takes its rows of each block,
and a block's inference batches are planned over the whole block, whichever shard runs it (a
shard computes the at most two batches it shares with a neighbour whole; MFCC, computed one
utterance at a time, needs no such thing and reads the shard's rows only). Batched float
arithmetic changes in the last bits with the other rows of a batch, so this keeps every soft
probability identical; the soft files' kept-mass statistic is summed exactly (integer units), so
merged shards also agree with one process to the byte. Same bytes need the same ``block_size``,
batch size, device, dtype and thread count.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from ..data.files import (SoftLabels, SoftLabelWriter, atomic_write, read_manifest, soft_label_paths,
                          write_dictionary)
from ..data.preflight import check_audio, require_valid
from ..errors import InputError
from .features import FeatureConfig, iter_features, make_reader
from .fit import fitted_normalized, load_kmeans
from .kmeans import SOFT_TOP_K, Assigner

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


def _file_id(path: str, content: bool = True) -> str:
    st = os.stat(path)
    if content:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"


def _write_block(path: str, lengths: List[int], hard: np.ndarray, soft: Optional[Tuple[np.ndarray, np.ndarray]],
                 kept_units: int) -> None:
    arrays = {"lengths": np.asarray(lengths, dtype=np.int64), "hard": hard,
              "kept_mass_units": np.asarray(kept_units, dtype=np.int64)}
    if soft is not None:
        arrays["ids"], arrays["probs"] = soft
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _read_block(path: str) -> Dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@dataclass
class DumpConfig:
    """What ``dicehubert-labels dump`` writes; each field is an option."""

    km: str = field(default=MISSING, metadata={"help": "k-means model (from fit, or fairseq's learn_kmeans)"})
    label_dir: str = field(default=MISSING, metadata={"help": "output directory"})
    name: str = field(default="km", metadata={"help": "label name: {split}.{name}, dict.{name}.txt"})
    soft: bool = field(default=False, metadata={"help": "also write soft labels (top-k ids + probabilities)"})
    temperature: float = field(default=1.0, metadata={"help": "T of softmax(-d^2/T)"})
    temperature_gap: Optional[float] = field(default=None, metadata={
        "help": "T as a multiple of the model's median gap between the nearest and second-nearest squared "
                "distance (fit reports it and stores it in the model); overrides --temperature"})
    top_k: int = field(default=SOFT_TOP_K, metadata={"help": "clusters kept per frame for --soft"})
    normalize: Optional[bool] = field(default=None, metadata={
        "help": "require a model fitted on L2-normalised features (fit --normalize); the features are "
                "normalised whenever the model was (its stored mode), so this only checks"})
    nshard: int = field(default=1, metadata={"help": "number of shards"})
    rank: int = field(default=0, metadata={"help": "0-based shard to write"})
    block_size: int = field(default=200, metadata={
        "help": "utterances per resumable block; keep it equal when resuming"})


def dump_labels(manifest_path: str, split: str, features: FeatureConfig, cfg: DumpConfig,
                check_headers: bool = True, progress: bool = True) -> Dict[str, object]:
    """Write hard (and optionally soft) labels of a manifest (or one shard of it).

    Everything cheap (options, manifest, shard, k-means model) is checked before the teacher is
    loaded; with ``check_headers``, the shard's audio headers too, before any feature is read.

    Args:
        manifest_path: ``{split}.tsv``.
        split: split name used in the output file names.
        features: the features to assign (teacher layer or MFCC, as the model was fitted on).
        cfg: model, output, soft-label and shard settings (see :class:`DumpConfig`).
        check_headers: check every file's header (rate, channels, length) before starting.
        progress: tqdm bar (frames/s).

    Returns:
        dict with ``label_path``, ``utterances``, ``frames``, ``blocks``, ``resumed_blocks``,
        ``mean_kept_mass`` (soft only), ``seconds``, ``temperature`` (the T used, soft only).

    Features are L2-normalised when the model was fitted on normalised features (its stored
    mode, :func:`~.fit.fitted_normalized`); ``cfg.normalize`` True (or False) requires that
    mode (or the other).

    Raises:
        InputError: bad options / manifest / shard / model / audio / teacher, feature dimension
            != the model's, ``cfg.normalize`` set and different from the model's mode.
    """
    t0 = time.time()
    km_path, label_dir, name, soft, temperature, top_k, nshard, rank, block_size = (
        cfg.km, cfg.label_dir, cfg.name, cfg.soft, cfg.temperature, cfg.top_k, cfg.nshard, cfg.rank, cfg.block_size)
    if soft and not temperature > 0:
        raise InputError([f"--temperature must be > 0, found {temperature}"])
    if cfg.temperature_gap is not None and not (soft and cfg.temperature_gap > 0):
        raise InputError([f"--temperature-gap needs --soft and a value > 0, found {cfg.temperature_gap}"
                          + ("" if soft else " without --soft")])
    if soft and top_k < 1:
        raise InputError([f"--top-k must be >= 1, found {top_k}"])
    manifest = read_manifest(manifest_path)
    start, end = shard_range(len(manifest), nshard, rank, manifest.path)
    km, meta = load_kmeans(km_path)
    centers = np.asarray(km.cluster_centers_, dtype=np.float32)
    normalize = fitted_normalized(meta)
    if cfg.normalize is not None and bool(cfg.normalize) != normalize:
        raise InputError([
            f"{km_path}: fitted on raw features "
            f"(no 'fit --normalize'{'' if meta else '; fairseq learn_kmeans model'}), "
            f"but --normalize asks for L2-normalised ones: fit a model with 'dicehubert-labels fit --normalize'"
            if cfg.normalize else
            f"{km_path}: fitted on L2-normalised features (fit --normalize), but raw features were asked for"])
    K, D = centers.shape
    if cfg.temperature_gap is not None:
        gap = ((meta.get("distances") or {}).get("gap") or {}).get("p50")
        if not gap or not gap > 0:
            raise InputError([f"{km_path}: no median gap stored (a model not written by this version's "
                              f"'dicehubert-labels fit', or K = 1): give --temperature instead of --temperature-gap"])
        temperature = float(cfg.temperature_gap) * float(gap)
        logger.info(f"--temperature-gap {cfg.temperature_gap:g} x median gap {gap:.6g}: T = {temperature:.6g}")
    if soft and top_k > K:
        raise InputError([f"--top-k {top_k} is larger than the number of clusters K={K} in {km_path}"])
    reader = make_reader(features)
    if D != reader.dim:
        raise InputError([f"{km_path}: centroids have dimension {D}, but the features have {reader.dim} "
                          f"({reader.description.get('type')}); was the model fitted on other features?"])
    feats_meta = meta.get("features") or {}
    for key in ("type", "layer"):
        if key in feats_meta and feats_meta[key] != reader.description.get(key):
            logger.warning(f"{km_path}: fitted on {key}={feats_meta[key]}, dumping {key}={reader.description.get(key)}")
    rows = list(range(start, end))
    if check_headers:
        require_valid(check_audio(manifest, reader.sample_rate, headers=True, rows=rows), manifest.path)
    max_batch_samples = int(features.max_batch_seconds * reader.sample_rate)

    tag = split_tag(split, nshard, rank)
    os.makedirs(label_dir, exist_ok=True)
    label_path = os.path.join(label_dir, f"{tag}.{name}")
    parts = label_path + ".parts"
    fingerprint = {
        "version": 3, "manifest": _file_id(manifest.path), "km": _file_id(km_path),
        "features": {k: v for k, v in reader.description.items()},
        "soft": bool(soft), "temperature": float(temperature) if soft else None,
        "top_k": int(top_k) if soft else None, "normalize": bool(normalize),
        "nshard": nshard, "rank": rank, "block_size": block_size, "max_batch_samples": max_batch_samples,
    }
    if fingerprint["features"].get("checkpoint"):
        fingerprint["checkpoint_file"] = _file_id(fingerprint["features"]["checkpoint"], content=False)
    if "dtype" in reader.description:
        fingerprint["dtype"] = reader.description["dtype"]
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

    # blocks on the whole manifest's grid (see the module docstring): the shard's rows of each
    grid = [list(range(g * block_size, min((g + 1) * block_size, len(manifest))))
            for g in range(start // block_size, (end - 1) // block_size + 1)]
    blocks = [[r for r in cell if start <= r < end] for cell in grid]
    block_path = [os.path.join(parts, f"block_{cell[0] // block_size:06d}.npz") for cell in grid]
    done = [os.path.isfile(p) for p in block_path]
    n_frames = [reader.num_frames(manifest.sizes[i]) for i in rows]
    frames_of_block = []
    pos = 0
    for blk in blocks:
        frames_of_block.append(sum(n_frames[pos : pos + len(blk)]))
        pos += len(blk)
    resumed = sum(done)
    if resumed:
        logger.info(f"resuming {label_path}: {resumed} of {len(blocks)} blocks already done")

    assigner = Assigner(centers, normalize=normalize, device=str(reader.device))
    bar = tqdm(total=sum(frames_of_block), initial=sum(f for f, d in zip(frames_of_block, done) if d),
               unit="frame", unit_scale=True, desc=f"dump {tag}", disable=not progress, smoothing=0.1)
    for b, blk in enumerate(blocks):
        if done[b]:
            continue
        hard: Dict[int, np.ndarray] = {}
        soft_out: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        kept_units = 0
        # batches planned over the whole block, unless the features are computed one at a time
        cell = blk if reader.batch_invariant else grid[b]
        for row, feats in iter_features(reader, manifest, cell, max_batch_samples, as_torch=True, keep=set(blk)):
            if soft:
                ids, probs, kept = assigner.soft(feats, temperature, top_k)
                hard[row] = ids[:, 0].numpy()
                soft_out[row] = (ids.numpy(), probs.numpy())
                kept_units += kept_mass_units(kept.numpy())
            else:
                hard[row] = assigner.hard(feats).numpy()
            bar.update(len(hard[row]))
        lengths = [len(hard[r]) for r in blk]
        id_dtype = np.int16 if K <= np.iinfo(np.int16).max else np.int32
        cat_hard = np.concatenate([hard[r] for r in blk]).astype(id_dtype)
        cat_soft = None
        if soft:
            cat_soft = (np.concatenate([soft_out[r][0] for r in blk]).astype(id_dtype),
                        np.concatenate([soft_out[r][1] for r in blk]).astype(np.float32))
        _write_block(block_path[b], lengths, cat_hard, cat_soft, kept_units)
    bar.close()

    total_frames, kept_units = _assemble(block_path, label_dir, tag, name, label_path, K, soft,
                                         dict(temperature=float(temperature), temperature_gap=cfg.temperature_gap,
                                              normalize=bool(normalize), features=reader.description,
                                              km=os.path.abspath(km_path)) if soft else None,
                                         top_k)
    write_dictionary(os.path.join(label_dir, f"dict.{name}.txt"), K)
    shutil.rmtree(parts)
    summary = {"label_path": label_path, "utterances": len(rows), "frames": total_frames, "blocks": len(blocks),
               "resumed_blocks": resumed, "seconds": time.time() - t0,
               "temperature": float(temperature) if soft else None}
    if soft:
        summary["mean_kept_mass"] = kept_units / KEPT_MASS_UNITS / max(total_frames, 1)
    logger.info(f"wrote {label_path}: {len(rows)} utterances, {total_frames} frames"
                + (f", soft top-{top_k} (mean kept mass {summary['mean_kept_mass']:.4f})" if soft else ""))
    return summary


def _assemble(block_paths: Sequence[str], label_dir: str, tag: str, name: str, label_path: str, K: int,
              soft: bool, soft_meta: Optional[dict], top_k: int) -> Tuple[int, int]:
    """Final files from the finished blocks: soft files first, then the hard file (each atomic).

    Returns:
        frames written, and the kept probability mass in units of ``1 / KEPT_MASS_UNITS``.
    """
    total, kept = 0, 0
    if soft:
        k_eff = min(top_k, K)
        writer = SoftLabelWriter(label_dir, tag, name, K, k_eff, meta=soft_meta)
        try:
            n_soft = 0
            for p in block_paths:
                blk = _read_block(p)
                offs = np.concatenate([[0], np.cumsum(blk["lengths"])])
                for i in range(len(blk["lengths"])):
                    writer.add(blk["ids"][offs[i] : offs[i + 1]], blk["probs"][offs[i] : offs[i + 1]])
                kept += int(blk["kept_mass_units"])
                n_soft += int(offs[-1])
            _set_kept_mass(writer.meta, kept, n_soft)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    with atomic_write(label_path) as f:
        for p in block_paths:
            blk = _read_block(p)
            offs = np.concatenate([[0], np.cumsum(blk["lengths"])])
            hard = blk["hard"]
            for i in range(len(blk["lengths"])):
                f.write(" ".join(map(str, hard[offs[i] : offs[i + 1]].tolist())) + "\n")
            total += int(offs[-1])
    return total, kept


def _set_kept_mass(meta: dict, units: int, frames: int) -> None:
    """Soft-file statistics: mean probability mass of the kept ids before renormalisation (1.0
    when top_k == K), and its exact sum (what :func:`merge_shards` adds up)."""
    meta["kept_mass_units"] = int(units)
    meta["mean_kept_mass"] = units / KEPT_MASS_UNITS / max(frames, 1)


# ------------------------------------------------------------------------------------ merge


def merge_shards(label_dir: str, split: str, name: str, nshard: int, manifest_path: Optional[str] = None,
                 out_dir: Optional[str] = None) -> Dict[str, object]:
    """Join ``{split}_{r}_{nshard}.{name}`` (and their soft files, if any) into ``{split}.{name}``.

    Args:
        label_dir: where the shards are.
        split / name / nshard: which shards.
        manifest_path: if given, the merged file must have one line per row of this manifest.
        out_dir: where to write (default ``label_dir``).

    Returns:
        dict with ``label_path``, ``utterances``, ``frames``, ``soft``.

    Raises:
        InputError: a missing shard (all are named), soft files on some shards only, different
            K / top-k across shards, line count != manifest.
    """
    if nshard < 1:
        raise InputError([f"--nshard must be at least 1, found {nshard}"])
    out_dir = out_dir or label_dir
    tags = [split_tag(split, nshard, r) for r in range(nshard)] if nshard > 1 else [split]
    hard_paths = [os.path.join(label_dir, f"{t}.{name}") for t in tags]
    missing = [p for p in hard_paths if not os.path.isfile(p)]
    if missing:
        raise InputError([f"{p}: shard not found (run 'dicehubert-labels dump ... --nshard {nshard} --rank {r}')"
                          for r, p in enumerate(hard_paths) if p in missing])
    soft_present = [os.path.isfile(soft_label_paths(label_dir, t, name)["meta"]) for t in tags]
    if any(soft_present) and not all(soft_present):
        raise InputError([f"{soft_label_paths(label_dir, t, name)['meta']}: soft labels missing for this shard "
                          f"(other shards have them)" for t, s in zip(tags, soft_present) if not s])
    soft = all(soft_present)
    lines = 0
    for p in hard_paths:
        with open(p, "rb") as f:
            lines += sum(1 for _ in f)
    if manifest_path is not None:
        m = read_manifest(manifest_path, check_root=False)
        if lines != len(m):
            raise InputError([f"{label_dir}: the {nshard} shards of {split}.{name} have {lines} lines, "
                              f"but {manifest_path} lists {len(m)} utterances"])
    label_path = os.path.join(out_dir, f"{split}.{name}")
    frames = 0
    if soft:
        shards = [SoftLabels(label_dir, t, name) for t in tags]
        Ks = {s.n_clusters for s in shards}
        ks = {s.top_k for s in shards}
        if len(Ks) != 1 or len(ks) != 1:
            raise InputError([f"{label_dir}: shards of {split}.{name} differ in K {sorted(Ks)} or top-k {sorted(ks)}"])
        meta = {k: v for k, v in shards[0].meta.items() if k not in ("n_clusters", "top_k", "n_utterances", "n_frames")}
        if all("kept_mass_units" in s.meta for s in shards):  # the whole split's statistic, not shard 0's
            _set_kept_mass(meta, sum(int(s.meta["kept_mass_units"]) for s in shards), sum(int(s.offsets[-1]) for s in shards))
        else:  # shards written before the exact sum: the frame-weighted mean
            meta.pop("kept_mass_units", None)
            meta["mean_kept_mass"] = (sum(float(s.meta.get("mean_kept_mass", 0.0)) * int(s.offsets[-1]) for s in shards)
                                      / max(sum(int(s.offsets[-1]) for s in shards), 1))
        writer = SoftLabelWriter(out_dir, split, name, Ks.pop(), ks.pop(), meta=meta)
        try:
            for s in shards:
                for i in range(len(s)):
                    a, b = s.frame_range(i)
                    writer.add(np.asarray(s.ids[a:b]), np.asarray(s.probs[a:b]))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    with atomic_write(label_path, "wb") as out:
        for p in hard_paths:
            with open(p, "rb") as f:
                for line in f:
                    out.write(line)
                    frames += len(line.split())
    dict_src = os.path.join(label_dir, f"dict.{name}.txt")
    dict_dst = os.path.join(out_dir, f"dict.{name}.txt")
    if os.path.abspath(dict_src) != os.path.abspath(dict_dst) and os.path.isfile(dict_src):
        with open(dict_src, "rb") as f, atomic_write(dict_dst, "wb") as g:
            g.write(f.read())
    logger.info(f"merged {nshard} shard(s) into {label_path}: {lines} utterances, {frames} frames"
                + (" (+ soft labels)" if soft else ""))
    return {"label_path": label_path, "utterances": lines, "frames": frames, "soft": soft}
