"""Label dumping: features -> nearest centroid (hard) and softmax over centroids (soft).

:func:`dump` runs a plan (:func:`~.plan.make_plan`): the rows of the plan's block grid
(:class:`~.blocks.BlockGrid`) are labelled block by block, every finished block written
atomically (a killed run restarted with the same command skips them: :func:`~.blocks.resume`),
and the final files are assembled from the blocks at the end (:func:`~.blocks.assemble`, file
formats there): ``{split}.{name}`` (or a shard's ``{split}_{rank}_{nshard}.{name}``), the soft
files with ``soft``, and ``dict.{name}.txt`` (cluster ids ``0..K-1``).

``dicehubert-labels run`` (:mod:`.onepass`) dumps with the plan of its fit, whose features
source keeps the k-means sample's features: the same files.
"""

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from ..data.files import write_dictionary
from ..errors import InputError
from .blocks import KEPT_MASS_UNITS, Block, assemble, kept_mass_units, resume, write_block
from .kmeans import SOFT_TOP_K, Assigner

logger = logging.getLogger(__name__)


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


def check_dump_config(cfg: DumpConfig, n_clusters: Optional[int] = None, km_path: Optional[str] = None) -> None:
    """Refuse bad soft-label settings (one line each) before anything is loaded.

    Args:
        cfg: the dump settings.
        n_clusters: K of the model, if known (``--top-k`` may not exceed it).
        km_path: the model file, to name in the message.

    Raises:
        InputError: ``--temperature`` <= 0, ``--top-k`` < 1 or > K (with ``--soft``), ``--temperature-gap``
            without ``--soft`` or <= 0.
    """
    if cfg.soft and not cfg.temperature > 0:
        raise InputError([f"--temperature must be > 0, found {cfg.temperature}"])
    if cfg.temperature_gap is not None and not (cfg.soft and cfg.temperature_gap > 0):
        raise InputError([f"--temperature-gap needs --soft and a value > 0, found {cfg.temperature_gap}"
                          + ("" if cfg.soft else " without --soft")])
    if cfg.soft and cfg.top_k < 1:
        raise InputError([f"--top-k must be >= 1, found {cfg.top_k}"])
    if cfg.soft and n_clusters is not None and cfg.top_k > n_clusters:
        raise InputError([f"--top-k {cfg.top_k} is larger than the number of clusters K={n_clusters}"
                          + (f" in {km_path}" if km_path else "")])


def dump(plan) -> Dict[str, object]:
    """Write hard (and optionally soft) labels of a manifest (or one shard of it).

    Args:
        plan: a ``dump`` :class:`~.plan.LabelPlan`, or ``run``'s once its model is known
            (:meth:`~.plan.LabelPlan.with_model`).

    Returns:
        dict with ``label_path``, ``utterances``, ``frames``, ``blocks``, ``resumed_blocks``,
        ``mean_kept_mass`` (soft only), ``seconds``, ``temperature`` (the T used, soft only).
    """
    t0 = time.time()
    d, source = plan.dump, plan.source
    blocks = d.grid.blocks()
    paths = {b.index: d.block_path(b) for b in blocks}
    done = resume(d.parts, d.fingerprint, paths)
    if done:
        logger.info(f"resuming {d.label_path}: {len(done)} of {len(blocks)} blocks already done")
    frames = {b.index: sum(source.num_frames(r) for r in b.rows) for b in blocks}
    assigner = Assigner(d.model.centers, normalize=d.model.normalize, device=str(source.reader.device))
    bar = tqdm(total=sum(frames.values()), initial=sum(frames[g] for g in done), unit="frame", unit_scale=True,
               desc=f"dump {d.tag}", disable=not plan.progress, smoothing=0.1)
    for b in blocks:
        if b.index not in done:
            write_block(paths[b.index], b.rows, *_labels(plan, assigner, b, bar), d.model.n_clusters)
    bar.close()
    total_frames, kept_units = assemble(plan, [paths[b.index] for b in blocks])
    write_dictionary(os.path.join(d.cfg.label_dir, f"dict.{d.cfg.name}.txt"), d.model.n_clusters)
    shutil.rmtree(d.parts)
    soft = d.cfg.soft
    summary = {"label_path": d.label_path, "utterances": sum(len(b.rows) for b in blocks), "frames": total_frames,
               "blocks": len(blocks), "resumed_blocks": len(done), "seconds": time.time() - t0,
               "temperature": d.temperature if soft else None}
    if soft:
        summary["mean_kept_mass"] = kept_units / KEPT_MASS_UNITS / max(total_frames, 1)
    logger.info(f"wrote {d.label_path}: {summary['utterances']} utterances, {total_frames} frames"
                + (f", soft top-{d.cfg.top_k} (mean kept mass {summary['mean_kept_mass']:.4f})" if soft else ""))
    return summary


def _labels(plan, assigner: Assigner, block: Block, bar) -> Tuple[Dict[int, np.ndarray], Optional[dict], int]:
    """Labels of a block's rows: ``{row: (T,) hard ids}``, with ``soft`` ``{row: ((T, k) ids, (T, k)
    probabilities)}`` (else None), and the kept probability mass in units (:func:`~.blocks.kept_mass_units`)."""
    d = plan.dump
    hard: Dict[int, np.ndarray] = {}
    soft: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    kept = 0
    # batches planned over the block's batch rows: the promise of the block grid
    for row, feats in plan.source.read(block.batch_rows, keep=set(block.rows), as_torch=True):
        if d.cfg.soft:
            ids, probs, kept_mass = assigner.soft(feats, d.temperature, d.cfg.top_k)
            hard[row] = ids[:, 0].numpy()
            soft[row] = (ids.numpy(), probs.numpy())
            kept += kept_mass_units(kept_mass.numpy())
        else:
            hard[row] = assigner.hard(feats).numpy()
        bar.update(len(hard[row]))
    return hard, soft if d.cfg.soft else None, kept
