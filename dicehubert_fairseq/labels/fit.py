"""Fitting the k-means model of ``dicehubert-labels fit`` on (a sample of) a manifest, and its file.

:func:`fit` runs a plan (:func:`~.plan.make_plan`): the features of the sample (:mod:`.features`)
are streamed into :class:`~.kmeans.StreamingKMeans` in length-sorted blocks; nothing but the
model is written.  The model is saved with ``joblib`` as a plain
``MiniBatchKMeans`` (fairseq's ``dump_km_label.py`` loads it unchanged), carrying a
``dicehubert_meta_`` dict (features, seed, frames seen, the mode, typical distances).

Modes: k-means on the features as they are (fairseq's), or with ``normalize`` on the features
scaled to unit L2 norm (k-means on unit vectors); the mode is stored in the model file
(``meta["normalize"]``) and ``dump`` assigns in the mode the model was fitted in.
"""

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import joblib
import numpy as np
import torch
from omegaconf import MISSING
from tqdm import tqdm

from ..data.files import atomic_write
from ..errors import InputError
from .kmeans import SOFT_TOP_K, Assigner, ReservoirSample, StreamingKMeans, l2_normalize_np

logger = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """k-means settings of ``dicehubert-labels fit`` (fairseq learn_kmeans' defaults); each field is an option."""

    n_clusters: int = field(default=MISSING, metadata={"help": "K"})
    out: str = field(default=MISSING, metadata={
        "help": "k-means model to write (joblib; fairseq's dump_km_label reads it)"})
    percent: float = field(default=1.0, metadata={
        "help": "fraction of utterances to fit on, as fairseq's --percent (1.0 = all; -1 = all)"})
    batch_size: int = field(default=10000, metadata={"help": "k-means mini-batch in frames"})
    seed: int = field(default=0, metadata={"help": "seeds the sample and k-means"})
    pool_size: Optional[int] = field(default=None, metadata={
        "help": "frames of the initial fit and of the shuffle pool (default max(3*batch, 3*K))"})
    n_init: int = field(default=20, metadata={"help": "k-means++ trials (as fairseq)"})
    max_iter: int = field(default=100, metadata={"help": "epochs of the initial fit (as fairseq)"})
    block_size: int = field(default=200, metadata={"help": "utterances length-sorted together"})
    normalize: bool = field(default=False, metadata={
        "help": "k-means on L2-normalised features (unit vectors); stored in the model, dump then assigns "
                "normalised features"})
    report_temperatures: List[float] = field(default_factory=lambda: [1.0, 5.0, 10.0], metadata={
        "help": "soft-label temperatures whose mean entropy fit reports (top-k as dump's default)"})
    report_frames: int = field(default=10000, metadata={
        "help": "frames (a uniform sample) on which fit measures typical distances and entropies"})


#: below this many pool frames per cluster, a sample larger than the pool gets a warning: on the
#: label benchmark's teacher features (sample 21x the pool), the streamed fit's objective was measured
#: 3.6 % above fairseq's in-memory fit at 7 frames per cluster, 2.2-2.4 % at 14 and 1.1-1.3 % at 28
#: (benchmarks/labels/pool_study.py); the default pool (30000 frames) holds 300 per cluster at K = 100
POOL_FRAMES_PER_CLUSTER = 25

#: the mode of a model fitted by fairseq's learn_kmeans (no metadata): raw features
RAW = False


def fitted_normalized(meta: Dict[str, object]) -> bool:
    """The mode stored in a k-means model's metadata: True if fitted on L2-normalised features."""
    return bool(meta.get("normalize", RAW))


# --------------------------------------------------------------------------- model files


def save_kmeans(km, path: str, meta: Dict[str, object]) -> None:
    """``joblib.dump`` the fitted ``MiniBatchKMeans`` atomically, with ``meta`` attached.

    fairseq's ``dump_km_label.ApplyKmeans`` reads it (it only uses ``cluster_centers_``).
    """
    km.dicehubert_meta_ = dict(meta)
    with atomic_write(path, "wb") as f:
        joblib.dump(km, f)


def load_kmeans(path: str):
    """Load a joblib k-means model (ours or fairseq's learn_kmeans).

    Returns:
        ``(model, meta)``: ``meta`` is our ``dicehubert_meta_`` dict (empty for fairseq's models).

    Raises:
        InputError: missing, unreadable, or without ``cluster_centers_``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError([f"{path}: k-means model not found (write it with 'dicehubert-labels fit')"])
    try:
        km = joblib.load(path)
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise InputError([f"{path}: not a readable joblib k-means model ({msg})"]) from None
    centers = getattr(km, "cluster_centers_", None)
    if not isinstance(centers, np.ndarray) or centers.ndim != 2:
        raise InputError([f"{path}: not a fitted k-means model (expected a joblib MiniBatchKMeans with "
                          f"cluster_centers_, found {type(km).__name__})"])
    return km, dict(getattr(km, "dicehubert_meta_", {}) or {})


# --------------------------------------------------------------------------- fitting


def fit_settings(cfg: FitConfig, batch_samples: int) -> Dict[str, object]:
    """Everything the fitted model depends on besides the features and the manifest: the
    :class:`FitConfig` fields but the output path, and the inference batch in samples."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "out"}
    settings["max_batch_samples"] = int(batch_samples)
    return settings


def sample_rows(n: int, percent: float, seed: int) -> np.ndarray:
    """Rows to fit on, in a seeded random order.

    Args:
        n: number of utterances.
        percent: fraction in (0, 1] (fairseq's ``--percent``; ``<= 0`` or ``>= 1`` means all).
        seed: RNG seed.

    Returns:
        ``ceil(n * percent)`` distinct row indices (all ``n`` when ``percent`` is out of (0, 1)):
        the utterances fairseq's ``learn_kmeans.py --seed seed --percent percent`` samples from a
        single shard (``np.random.seed(seed); np.random.choice(n, ceil(n * percent), replace=False)``).
    """
    rng = np.random.RandomState(seed)
    if 0 < percent < 1:
        return rng.choice(n, int(math.ceil(n * percent)), replace=False)
    return rng.permutation(n)


def check_fit_config(cfg: FitConfig) -> None:
    """Refuse bad k-means settings (one line each) before anything is loaded.

    Raises:
        InputError: K or the mini-batch < 1, ``percent`` outside (0, 1] (and not -1), a report
            temperature <= 0, ``report_frames`` < 1.
    """
    if cfg.n_clusters < 1:
        raise InputError([f"--n-clusters must be at least 1, found {cfg.n_clusters}"])
    if cfg.batch_size < 1:
        raise InputError([f"--batch-size must be at least 1, found {cfg.batch_size}"])
    if cfg.percent == 0 or cfg.percent > 1:
        raise InputError([f"--percent is a fraction in (0, 1] (or -1 for all), found {cfg.percent}"])
    if any(not t > 0 for t in cfg.report_temperatures):
        raise InputError([f"--report-temperatures must be > 0, found {cfg.report_temperatures}"])
    if cfg.report_frames < 1:
        raise InputError([f"--report-frames must be at least 1, found {cfg.report_frames}"])


def distance_report(centers: np.ndarray, X: np.ndarray, normalize: bool = False,
                    temperatures: Sequence[float] = (), top_k: int = SOFT_TOP_K,
                    gap_multiples: Sequence[float] = (0.5, 1.0, 2.0)) -> Dict[str, object]:
    """Typical squared distances of frames to their centroids, and the soft labels' entropy per temperature.

    What a user needs to choose the soft labels' temperature ``T`` of ``softmax(-d^2 / T)``: on a
    frame whose nearest and second-nearest centroids lie ``d1 < d2`` away (squared), the
    runner-up gets ``exp(-(d2 - d1) / T)`` times the winner's probability, so ``T`` equal to the
    median gap gives it ``1/e`` (0.37) on the median frame; ``T`` well below the gaps gives
    one-hot targets, well above them uniform ones over the kept clusters.

    Args:
        centers: ``(K, D)`` centroids (``K >= 2``).
        X: ``(N, D)`` frames (raw: normalised here when ``normalize``).
        normalize: the model's mode (see :class:`Assigner`).
        temperatures: ``T`` values whose soft labels' entropy to measure.
        top_k: clusters kept per frame, as ``dump --soft --top-k``.
        gap_multiples: also measure at ``T = m x`` the median gap (``dump --temperature-gap m``).

    Returns:
        dict: ``frames``; ``nearest`` and ``gap``: the 10th, 50th and 90th percentiles of ``d1``
        and of ``d2 - d1`` (keys ``p10``, ``p50``, ``p90``); ``entropy_bits``: per ``T`` (str),
        the mean entropy in bits of the top-k renormalised soft label (0: one-hot,
        ``log2(top_k)``: uniform); ``top1``: per ``T``, the mean probability of the nearest
        centroid; ``entropy_bits_gap`` and ``top1_gap``: the same per gap multiple ``m`` (str);
        ``top_k``; ``max_entropy_bits`` (``log2(top_k)``).
    """
    a = Assigner(centers, normalize=normalize)
    k = min(int(top_k), a.n_clusters)
    x = torch.from_numpy(np.asarray(X, dtype=np.float32))
    chunks = [x[s : s + 8192] for s in range(0, len(x), 8192)]
    nearest, gaps = [], []
    for c in chunks:
        two = torch.topk(a.distances(c).clamp_min(0), min(2, a.n_clusters), dim=1, largest=False).values
        nearest.append(two[:, 0])
        gaps.append(two[:, -1] - two[:, 0])

    def pct(v):
        q = torch.quantile(torch.cat(v).double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        return {"p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])}

    gap = pct(gaps)

    def soft_stats(t: float):
        h = top1 = 0.0
        for c in chunks:
            _, probs, _ = a.soft(c, t, k)
            p = probs.double()
            h += float(-(p * torch.log2(p.clamp_min(1e-300))).sum())
            top1 += float(p[:, 0].sum())
        n = max(len(x), 1)
        return h / n, top1 / n

    by_t = {f"{float(t):g}": soft_stats(float(t)) for t in temperatures}
    by_gap = {f"{float(m):g}": soft_stats(float(m) * gap["p50"]) for m in gap_multiples if gap["p50"] > 0}
    return {"frames": len(x), "nearest": pct(nearest), "gap": gap, "top_k": k, "max_entropy_bits": math.log2(k),
            "entropy_bits": {t: v[0] for t, v in by_t.items()}, "top1": {t: v[1] for t, v in by_t.items()},
            "entropy_bits_gap": {m: v[0] for m, v in by_gap.items()}, "top1_gap": {m: v[1] for m, v in by_gap.items()}}


def fit(plan) -> Tuple[object, Dict[str, object]]:
    """Fit k-means on the plan's sample, streamed, and save it to ``cfg.out``.

    Args:
        plan: a ``fit`` or ``run`` :class:`~.plan.LabelPlan`: its sample rows, settings and
            features (with ``run``'s cache, which keeps the sample's features that fit in it and
            serves them in the second pass of a sample larger than the pool; the model does not
            depend on it).

    Returns:
        ``(model, meta)``: the fitted ``MiniBatchKMeans`` and the metadata saved with it
        (features, mode ``normalize``, frames, utterances, objectives, steps, and ``distances``:
        :func:`distance_report` of the final centroids on a uniform sample of ``report_frames``
        fitted frames, ``None`` for K = 1).
    """
    f, dim = plan.fit, plan.source.reader.dim
    cfg, K = f.cfg, f.cfg.n_clusters
    logger.info(f"fitting K={K} on {len(f.rows)} of {len(plan.source.manifest)} utterances ({f.frames} frames)")
    skm = StreamingKMeans(K, dim, seed=cfg.seed, batch_size=cfg.batch_size, pool_size=cfg.pool_size,
                          n_init=cfg.n_init, max_iter=cfg.max_iter)
    # a uniform sample of the fitted frames, for the typical distances reported at the end
    sample = ReservoirSample(max(1, min(int(cfg.report_frames), f.frames)), dim, seed=cfg.seed + 1)
    if f.two_pass:
        # pass 1: a uniform sample of the whole stream for the initial fit (the first frames of a
        # stream need not be representative); pass 2: every frame streamed
        logger.info(f"{f.frames} frames > pool of {skm.pool_size}: pass 1 samples the pool uniformly, pass 2 streams")
        reservoir = ReservoirSample(skm.pool_size, dim, seed=cfg.seed)
        _stream(plan, [reservoir.add, sample.add], "fit 1/2")
        skm.fit_initial(reservoir.data)
        del reservoir
        _stream(plan, [skm.add], "fit 2/2")
    else:
        _stream(plan, [skm.add, sample.add], "fit")
    km = skm.finish()
    distances = (distance_report(km.cluster_centers_, sample.data, normalize=False,
                                 temperatures=cfg.report_temperatures, top_k=SOFT_TOP_K)
                 if K >= 2 else None)  # the sample is normalised already
    meta = {"features": plan.source.reader.description, "manifest": os.path.abspath(plan.source.manifest.path),
            "n_clusters": K, "normalize": bool(cfg.normalize), "seed": cfg.seed, "percent": cfg.percent,
            "batch_size": cfg.batch_size, "utterances": len(f.rows), "frames": f.frames,
            "init_objective": skm.init_objective, "init_frames": skm.init_frames,
            "stream_objective": skm.stream_objective, "partial_fit_steps": skm.steps, "pool_size": skm.pool_size,
            "passes": 2 if f.two_pass else 1, "distances": distances, "settings": f.settings}
    save_kmeans(km, cfg.out, meta)
    return km, meta


def _stream(plan, consumers, desc: str) -> None:
    """Every frame of the sample, block by block (``block_size`` sample rows length-sorted together),
    L2-normalised in ``normalize`` mode, to each of ``consumers``."""
    f = plan.fit
    bar = tqdm(total=f.frames, unit="frame", unit_scale=True, desc=desc, disable=not plan.progress, smoothing=0.1)
    for s in range(0, len(f.rows), f.cfg.block_size):
        for _row, feats in plan.source.read(list(f.rows[s : s + f.cfg.block_size])):
            if f.cfg.normalize:
                feats = l2_normalize_np(feats)
            for consume in consumers:
                consume(feats)
            bar.update(len(feats))
    bar.close()
