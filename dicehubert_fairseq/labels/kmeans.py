"""k-means on a stream of frame features, in memory bounded independently of corpus size.

fairseq's ``learn_kmeans.py`` loads its whole sample into RAM and calls
``MiniBatchKMeans.fit`` (k-means++, batch 10000, ``max_iter`` 100, ``max_no_improvement`` 100,
``n_init`` 20, ``reassignment_ratio`` 0, ``tol`` 0).  :class:`StreamingKMeans` uses the same
estimator with the same settings, fed from a stream:

1. ``pool_size`` frames (default ``3 * batch_size``, sklearn's ``init_size``) are ``fit`` on
   exactly as fairseq does (``n_init`` k-means++ trials, best kept, then mini-batch steps with
   early stopping) -- for a sample of at most ``pool_size`` frames this *is* fairseq's
   learn_kmeans on that sample.  :func:`fit_kmeans` gives it a uniform random sample of the whole
   stream (:class:`ReservoirSample`, an extra pass over the features) when the sample is larger
   than the pool; :meth:`StreamingKMeans.add` alone uses the first ``pool_size`` frames;
2. every later frame goes through a shuffle pool of ``pool_size`` frames from which random
   mini-batches of ``batch_size`` frames are drawn and passed to ``partial_fit``; the pool is
   drained at the end.  sklearn keeps per-centre counts and moves a centre by
   ``n_batch / (count + n_batch)`` towards the mean of its new frames; after step 1 the counts are
   rescaled to the number of frames actually fitted on (``fit`` counts each frame once per epoch),
   so every centre stays the running mean of all frames ever assigned to it (MacQueen's online
   k-means, in mini-batches) and the stream after the pool weighs as much as its size.

Peak memory is ``O((pool_size + batch_size) * D)`` whatever the number of frames.

The model is saved with ``joblib`` as a plain ``MiniBatchKMeans`` (fairseq's ``dump_km_label.py``
loads it unchanged), carrying a ``dicehubert_meta_`` dict (features, seed, frames seen).
"""

import logging
import math
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.files import Manifest, atomic_write
from ..errors import InputError

logger = logging.getLogger(__name__)

#: fairseq examples/hubert/simple_kmeans/learn_kmeans.py defaults.
LEARN_KMEANS_SETTINGS = dict(
    init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100,
    n_init=20, reassignment_ratio=0.0,
)


def new_kmeans(n_clusters: int, seed: int = 0, **overrides):
    """A ``MiniBatchKMeans`` configured like fairseq's ``learn_kmeans.get_km_model``.

    Args:
        n_clusters: K.
        seed: ``random_state`` (fairseq seeds numpy globally instead; we pass it explicitly).
        **overrides: any of :data:`LEARN_KMEANS_SETTINGS`.
    """
    from sklearn.cluster import MiniBatchKMeans

    settings = dict(LEARN_KMEANS_SETTINGS, **overrides)
    return MiniBatchKMeans(n_clusters=n_clusters, compute_labels=False, init_size=None, verbose=0,
                           random_state=seed, **settings)


class StreamingKMeans:
    """Mini-batch k-means fed chunk by chunk (see the module docstring).

    Args:
        n_clusters: K.
        dim: feature dimension D.
        seed: seeds sklearn and the shuffle pool (same seed and stream -> same model).
        batch_size: mini-batch size (fairseq: 10000).
        pool_size: frames of the initial fit / the shuffle pool (default ``max(3 * batch_size,
            3 * K)``, sklearn's ``init_size``).
        **settings: other ``MiniBatchKMeans`` settings (default :data:`LEARN_KMEANS_SETTINGS`).

    Attributes:
        frames_seen: frames passed to :meth:`add`.
        steps: ``partial_fit`` steps taken after the initial fit.
        init_objective: mean squared distance on the initial pool after its fit.
        stream_objective: mean squared distance of streamed mini-batches, measured before each
            update (a held-out estimate; ``nan`` if the stream fit in the pool).
    """

    def __init__(self, n_clusters: int, dim: int, seed: int = 0, batch_size: int = 10000,
                 pool_size: Optional[int] = None, **settings):
        self.n_clusters = int(n_clusters)
        self.dim = int(dim)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.pool_size = int(pool_size or max(3 * self.batch_size, 3 * self.n_clusters))
        if self.pool_size < self.batch_size:
            raise ValueError(f"pool_size {self.pool_size} < batch_size {self.batch_size}")
        self.km = new_kmeans(self.n_clusters, seed=self.seed, batch_size=self.batch_size, **settings)
        self._rng = np.random.default_rng(self.seed)
        self._pool = np.empty((self.pool_size, self.dim), dtype=np.float32)
        self._n = 0
        self._fitted = False
        self.frames_seen = 0
        self.steps = 0
        self.init_objective = float("nan")
        self.init_frames = 0
        self._stream_sse = 0.0
        self._stream_frames = 0

    @property
    def stream_objective(self) -> float:
        return self._stream_sse / self._stream_frames if self._stream_frames else float("nan")

    def add(self, feats: np.ndarray) -> None:
        """Feed ``(T, D)`` frames."""
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected (T, {self.dim}) features, got {feats.shape}")
        self.frames_seen += len(feats)
        pos = 0
        while pos < len(feats):
            take = min(len(feats) - pos, self.pool_size - self._n)
            self._pool[self._n : self._n + take] = feats[pos : pos + take]
            self._n += take
            pos += take
            if self._n == self.pool_size:
                if not self._fitted:
                    self.fit_initial(self._pool[: self._n])
                    self._n = 0  # the pool becomes a shuffle buffer for the rest of the stream
                else:
                    self._step_from_pool()

    def fit_initial(self, X: np.ndarray) -> None:
        """Step 1 on given frames ``(N, D)`` (e.g. a uniform reservoir of the whole stream); every
        frame :meth:`add`-ed afterwards is streamed (step 2)."""
        if self._fitted:
            raise RuntimeError("the initial fit was already done")
        X = np.ascontiguousarray(X, dtype=np.float32)
        logger.info(f"k-means: fitting K={self.n_clusters} on the first {len(X)} frames "
                    f"(n_init={self.km.n_init}, batch {self.batch_size})")
        self.km.fit(X)
        # fit() counted every frame once per epoch (~max_iter times): rescale the per-centre counts to
        # the frames actually seen, so each centre stays the running mean of every frame assigned to it
        # and the rest of the stream weighs as much as its size (else it could barely move the centres)
        counts = getattr(self.km, "_counts", None)
        if counts is not None and counts.sum() > 0:
            counts *= len(X) / counts.sum()
        self.init_objective = objective_of(self.km.cluster_centers_, X)
        self.init_frames = len(X)
        logger.info(f"k-means: objective on those frames {self.init_objective:.5f}")
        self._fitted = True

    def _partial_fit(self, X: np.ndarray) -> None:
        self._stream_sse += objective_of(self.km.cluster_centers_, X, np.float32) * len(X)
        self._stream_frames += len(X)
        self.km.partial_fit(X)
        self.steps += 1

    def _step_from_pool(self) -> None:
        pick = self._rng.choice(self._n, self.batch_size, replace=False)
        keep = np.ones(self._n, dtype=bool)
        keep[pick] = False
        batch = self._pool[pick]
        rest = self._pool[: self._n][keep]
        self._pool[: len(rest)] = rest
        self._n = len(rest)
        self._partial_fit(batch)

    def finish(self):
        """Fit on what is left; returns the fitted ``MiniBatchKMeans``.

        Raises:
            InputError: fewer frames than clusters.
        """
        if not self._fitted:
            if self._n < self.n_clusters:
                raise InputError([f"K={self.n_clusters} clusters but only {self._n} frames to fit them on "
                                  f"(use fewer clusters or a larger --percent)"])
            self.fit_initial(self._pool[: self._n])
            self._n = 0
        else:
            order = self._rng.permutation(self._n)
            for s in range(0, self._n, self.batch_size):
                self._partial_fit(self._pool[order[s : s + self.batch_size]])
            self._n = 0
            logger.info(f"k-means: {self.steps} streamed mini-batches after the initial fit, "
                        f"held-out objective {self.stream_objective:.5f}")
        self._pool = np.empty((0, self.dim), dtype=np.float32)
        return self.km


class ReservoirSample:
    """A uniform random sample of ``capacity`` frames of a stream (Vitter's algorithm R), seeded.

    Args:
        capacity: frames kept.
        dim: feature dimension.
        seed: RNG seed.
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        self.capacity = int(capacity)
        self._data = np.empty((self.capacity, int(dim)), dtype=np.float32)
        self._rng = np.random.default_rng(seed)
        self.seen = 0

    def add(self, feats: np.ndarray) -> None:
        """Offer ``(T, D)`` frames; each of the ``seen`` frames so far is kept with equal probability."""
        feats = np.asarray(feats, dtype=np.float32)
        take = max(0, min(len(feats), self.capacity - self.seen))
        self._data[self.seen : self.seen + take] = feats[:take]
        rest = feats[take:]
        if len(rest):
            t = self.seen + take + np.arange(len(rest))  # 0-based stream position of each frame
            slot = self._rng.integers(0, t + 1)  # frame t replaces a random slot with prob capacity/(t+1)
            keep = slot < self.capacity
            for j, x in zip(slot[keep], rest[keep]):  # in order: a later frame overwrites an earlier one
                self._data[j] = x
        self.seen += len(feats)

    @property
    def data(self) -> np.ndarray:
        """``(min(seen, capacity), D)`` frames."""
        return self._data[: min(self.seen, self.capacity)]


# --------------------------------------------------------------------------- distances


def sq_distances(x: torch.Tensor, centers: torch.Tensor, c_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared Euclidean distances, computed as fairseq's ``ApplyKmeans`` does.

    Args:
        x: ``(N, D)`` features.
        centers: ``(K, D)`` centroids.
        c_sq: optional precomputed ``(K,)`` squared norms of ``centers``.

    Returns:
        ``(N, K)``: ``|x|^2 - 2 x.c + |c|^2`` (float rounding can make tiny values negative).
    """
    if c_sq is None:
        c_sq = centers.pow(2).sum(1)
    return x.pow(2).sum(1, keepdim=True) - 2 * x @ centers.T + c_sq[None, :]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=1e-12)


def objective_of(centers: np.ndarray, X: np.ndarray, dtype=np.float64) -> float:
    """Mean squared distance of every row of ``X`` ``(N, D)`` to its nearest of ``centers`` ``(K, D)``.

    This is the k-means objective (sklearn's ``inertia_ / N``, fairseq's "total intertia").
    """
    if len(X) == 0:
        return float("nan")
    total = 0.0
    c = torch.from_numpy(np.asarray(centers, dtype=dtype))
    c_sq = c.pow(2).sum(1)
    for s in range(0, len(X), 65536):
        x = torch.from_numpy(np.asarray(X[s : s + 65536], dtype=dtype))
        d = sq_distances(x, c, c_sq).clamp_min_(0).min(1).values
        total += float(d.sum())
    return total / len(X)


class Assigner:
    """Hard and soft cluster assignment against a fixed set of centroids.

    Args:
        centers: ``(K, D)`` centroids.
        normalize: L2-normalise features and centroids first (distances become ``2 - 2 cos``).
        device: where to compute.
    """

    def __init__(self, centers: np.ndarray, normalize: bool = False, device: str = "cpu"):
        c = torch.from_numpy(np.asarray(centers, dtype=np.float32)).to(device)
        self.normalize = bool(normalize)
        self.centers = l2_normalize(c) if self.normalize else c
        self.c_sq = self.centers.pow(2).sum(1)
        self.n_clusters, self.dim = self.centers.shape

    def _dist(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.centers.device, torch.float32)
        if self.normalize:
            x = l2_normalize(x)
        return sq_distances(x, self.centers, self.c_sq)

    def hard(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of each frame.

        Args:
            x: ``(T, D)``.

        Returns:
            ``(T,)`` int64 cluster ids (on CPU).
        """
        return self._dist(x).argmin(1).cpu()

    def soft(self, x: torch.Tensor, temperature: float, top_k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``softmax(-d^2 / T)`` over the centroids, kept to the ``top_k`` most likely.

        Args:
            x: ``(T, D)``.
            temperature: T > 0.
            top_k: clusters kept per frame (probabilities renormalised over them).

        Returns:
            ``(T, k)`` int64 ids (most likely first), ``(T, k)`` float32 probabilities (rows sum
            to 1), ``(T,)`` float32 probability mass the kept ids had before renormalising.
        """
        logits = -self._dist(x).clamp_min(0) / float(temperature)
        k = min(int(top_k), self.n_clusters)
        top, ids = torch.topk(logits, k, dim=1, largest=True, sorted=True)
        probs = torch.softmax(top, dim=1)
        kept = torch.exp(torch.logsumexp(top, 1) - torch.logsumexp(logits, 1))
        return ids.cpu(), probs.float().cpu(), kept.float().cpu()


# --------------------------------------------------------------------------- model files


def save_kmeans(km, path: str, meta: Dict[str, object]) -> None:
    """``joblib.dump`` the fitted ``MiniBatchKMeans`` atomically, with ``meta`` attached.

    fairseq's ``dump_km_label.ApplyKmeans`` reads it (it only uses ``cluster_centers_``).
    """
    import joblib

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
    import joblib

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


def fit_kmeans(reader, manifest: Manifest, n_clusters: int, percent: float = 1.0, seed: int = 0,
               batch_size: int = 10000, pool_size: Optional[int] = None, max_batch_samples: int = 1_600_000,
               block_size: int = 1000, progress: bool = True, **settings):
    """Fit k-means on features of (a sample of) a manifest, streamed.

    Args:
        reader: a :class:`~dicehubert_fairseq.labels.features.FeatureReader`.
        manifest: the utterances.
        n_clusters: K.
        percent: fraction of utterances to fit on (see :func:`sample_rows`).
        seed: seeds the sample, the pool and sklearn.
        batch_size: k-means mini-batch (frames).
        pool_size: see :class:`StreamingKMeans`.
        max_batch_samples: padded audio samples per inference batch.
        block_size: utterances length-sorted together for inference.
        progress: show a tqdm bar (frames/s).

    Returns:
        ``(model, stats)``: the fitted ``MiniBatchKMeans`` and a dict of numbers (frames,
        utterances, objectives, steps).

    Raises:
        InputError: K larger than the number of frames in the sample.
    """
    from tqdm import tqdm

    from .features import iter_features

    rows = sample_rows(len(manifest), percent, seed)
    frames = sum(reader.num_frames(manifest.sizes[i]) for i in rows)
    if frames < n_clusters:
        raise InputError([f"{manifest.path}: K={n_clusters} clusters but the {len(rows)} utterance(s) sampled "
                          f"({percent:g} of {len(manifest)}) have only {frames} frames at "
                          f"{reader.frame_rate:g} Hz (use fewer clusters or a larger --percent)"])
    logger.info(f"fitting K={n_clusters} on {len(rows)} of {len(manifest)} utterances ({frames} frames)")
    skm = StreamingKMeans(n_clusters, reader.dim, seed=seed, batch_size=batch_size, pool_size=pool_size, **settings)
    two_pass = frames > skm.pool_size

    def stream(consume, desc):
        bar = tqdm(total=frames, unit="frame", unit_scale=True, desc=desc, disable=not progress, smoothing=0.1)
        for s in range(0, len(rows), block_size):
            block = [int(r) for r in rows[s : s + block_size]]
            for _row, feats in iter_features(reader, manifest, block, max_batch_samples):
                consume(feats)
                bar.update(len(feats))
        bar.close()

    if two_pass:
        # pass 1: a uniform sample of the whole stream for the initial fit (the first frames of a
        # stream need not be representative); pass 2: every frame through partial_fit
        logger.info(f"{frames} frames > pool of {skm.pool_size}: pass 1 samples the pool uniformly, pass 2 streams")
        reservoir = ReservoirSample(skm.pool_size, reader.dim, seed=seed)
        stream(reservoir.add, "fit 1/2")
        skm.fit_initial(reservoir.data)
        del reservoir
        stream(skm.add, "fit 2/2")
    else:
        stream(skm.add, "fit")
    km = skm.finish()
    stats = {"utterances": len(rows), "frames": frames, "init_objective": skm.init_objective,
             "init_frames": skm.init_frames, "stream_objective": skm.stream_objective,
             "partial_fit_steps": skm.steps, "pool_size": skm.pool_size, "passes": 2 if two_pass else 1}
    return km, stats
