"""Fitting the k-means model of ``dicehubert-labels fit`` on (a sample of) a manifest, and its file.

Features (:mod:`.features`) are streamed into :class:`~.kmeans.StreamingKMeans` in length-sorted
blocks; nothing but the model is written.  The model is saved with ``joblib`` as a plain
``MiniBatchKMeans`` (fairseq's ``dump_km_label.py`` loads it unchanged), carrying a
``dicehubert_meta_`` dict (features, seed, frames seen, the mode, typical distances).

Modes: k-means on the features as they are (fairseq's), or with ``normalize`` on the features
scaled to unit L2 norm (k-means on unit vectors); the mode is stored in the model file
(``meta["normalize"]``) and ``dump`` assigns in the mode the model was fitted in.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import joblib
import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from ..data.files import atomic_write, read_manifest
from ..data.preflight import check_audio, require_valid
from ..errors import InputError
from .features import FeatureConfig, iter_features, make_reader
from .kmeans import SOFT_TOP_K, ReservoirSample, StreamingKMeans, distance_report, l2_normalize_np

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


def fit_kmeans(manifest_path: str, features: FeatureConfig, cfg: FitConfig, check_headers: bool = True,
               progress: bool = True) -> Tuple[object, Dict[str, object]]:
    """Fit k-means on features of (a sample of) a manifest, streamed, and save it to ``cfg.out``.

    The settings and the manifest are checked before the teacher is loaded; with
    ``check_headers``, the audio headers of the sampled rows too, before any feature is read.

    Args:
        manifest_path: ``{split}.tsv``.
        features: the features to fit on (teacher layer or MFCC).
        cfg: K, sample, k-means settings and the output path.
        check_headers: read every sampled file's header (rate, channels, length) first.
        progress: show a tqdm bar (frames/s).

    Returns:
        ``(model, meta)``: the fitted ``MiniBatchKMeans`` and the metadata saved with it
        (features, mode ``normalize``, frames, utterances, objectives, steps, and ``distances``:
        :func:`~.kmeans.distance_report` of the final centroids on a uniform sample of
        ``report_frames`` fitted frames, ``None`` for K = 1).

    Raises:
        InputError: bad settings, manifest, audio or teacher; K larger than the frames sampled.
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
    manifest = read_manifest(manifest_path)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    reader = make_reader(features)
    rows = sample_rows(len(manifest), cfg.percent, cfg.seed)
    if check_headers:
        require_valid(check_audio(manifest, reader.sample_rate, headers=True, rows=sorted(int(r) for r in rows)),
                      manifest.path)
    max_batch_samples = int(features.max_batch_seconds * reader.sample_rate)
    frames = sum(reader.num_frames(manifest.sizes[i]) for i in rows)
    K = cfg.n_clusters
    if frames < K:
        raise InputError([f"{manifest.path}: K={K} clusters but the {len(rows)} utterance(s) sampled "
                          f"({cfg.percent:g} of {len(manifest)}) have only {frames} frames at "
                          f"{reader.frame_rate:g} Hz (use fewer clusters or a larger --percent)"])
    logger.info(f"fitting K={K} on {len(rows)} of {len(manifest)} utterances ({frames} frames)")
    skm = StreamingKMeans(K, reader.dim, seed=cfg.seed, batch_size=cfg.batch_size, pool_size=cfg.pool_size,
                          n_init=cfg.n_init, max_iter=cfg.max_iter)
    two_pass = frames > skm.pool_size
    # a uniform sample of the fitted frames, for the typical distances reported at the end
    sample = ReservoirSample(max(1, min(int(cfg.report_frames), frames)), reader.dim, seed=cfg.seed + 1)

    def stream(consumers, desc):
        bar = tqdm(total=frames, unit="frame", unit_scale=True, desc=desc, disable=not progress, smoothing=0.1)
        for s in range(0, len(rows), cfg.block_size):
            block = [int(r) for r in rows[s : s + cfg.block_size]]
            for _row, feats in iter_features(reader, manifest, block, max_batch_samples):
                if cfg.normalize:
                    feats = l2_normalize_np(feats)
                for consume in consumers:
                    consume(feats)
                bar.update(len(feats))
        bar.close()

    if two_pass:
        # pass 1: a uniform sample of the whole stream for the initial fit (the first frames of a
        # stream need not be representative); pass 2: every frame through partial_fit
        logger.info(f"{frames} frames > pool of {skm.pool_size}: pass 1 samples the pool uniformly, pass 2 streams")
        reservoir = ReservoirSample(skm.pool_size, reader.dim, seed=cfg.seed)
        stream([reservoir.add, sample.add], "fit 1/2")
        skm.fit_initial(reservoir.data)
        del reservoir
        stream([skm.add], "fit 2/2")
    else:
        stream([skm.add, sample.add], "fit")
    km = skm.finish()
    distances = (distance_report(km.cluster_centers_, sample.data, normalize=False,
                                 temperatures=cfg.report_temperatures, top_k=SOFT_TOP_K)
                 if K >= 2 else None)  # the sample is normalised already
    meta = {"features": reader.description, "manifest": os.path.abspath(manifest.path), "n_clusters": K,
            "normalize": bool(cfg.normalize), "seed": cfg.seed, "percent": cfg.percent, "batch_size": cfg.batch_size,
            "utterances": len(rows), "frames": frames, "init_objective": skm.init_objective,
            "init_frames": skm.init_frames, "stream_objective": skm.stream_objective,
            "partial_fit_steps": skm.steps, "pool_size": skm.pool_size, "passes": 2 if two_pass else 1,
            "distances": distances}
    save_kmeans(km, cfg.out, meta)
    return km, meta
