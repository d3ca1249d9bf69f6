"""k-means on a stream of frame features, in memory bounded independently of corpus size.

fairseq's ``learn_kmeans.py`` loads its whole sample into RAM and calls
``MiniBatchKMeans.fit`` (k-means++, batch 10000, ``max_iter`` 100, ``max_no_improvement`` 100,
``n_init`` 20, ``reassignment_ratio`` 0, ``tol`` 0).  :class:`StreamingKMeans` fits the same
estimator with the same settings on a pool of frames, then streams the rest:

1. ``pool_size`` frames (default ``3 * batch_size``, sklearn's ``init_size``) are ``fit`` on
   exactly as fairseq does (``n_init`` k-means++ trials, best kept, then mini-batch steps with
   early stopping) -- for a sample of at most ``pool_size`` frames this *is* fairseq's
   learn_kmeans on that sample, and its centroids are the model's.
   :func:`~dicehubert_fairseq.labels.fit.fit` gives it a uniform random sample of the whole
   stream (:class:`ReservoirSample`, an extra pass over the features) when the sample is larger
   than the pool; :meth:`StreamingKMeans.add` alone uses the first ``pool_size`` frames;
2. every later frame goes through a shuffle pool of ``pool_size`` frames from which random
   mini-batches of ``batch_size`` frames are drawn, and the pool is drained at the end. Each
   mini-batch is assigned to the nearest centroids (:func:`sq_distances`, as the labels are) and
   each centre becomes the running mean of every frame ever assigned to it: a centre that had
   ``n`` frames (those of the pool nearest to it after step 1, then the stream's) and receives
   ``m`` more with sum ``s`` moves to ``c + (s - m c) / (n + m)`` (MacQueen's online k-means, in
   mini-batches), so the stream after the pool weighs as much as its size.

scikit-learn is used through its public API only: the estimator, ``fit`` and
``cluster_centers_`` (the streamed centroids are written back there, so the model file stays a
plain ``MiniBatchKMeans``, which fairseq's ``dump_km_label.py`` reads).
Peak memory is ``O((pool_size + batch_size) * D)`` whatever the number of frames.

This module is the algorithm only: fitting on a manifest and the model files are
:mod:`dicehubert_fairseq.labels.fit`.
"""

import logging
from typing import Optional, Tuple

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from ..errors import InputError

logger = logging.getLogger(__name__)

#: Clusters kept per frame in soft labels, unless told otherwise (``dump --top-k``, and the
#: entropies ``fit`` reports).
SOFT_TOP_K = 10

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
    settings = dict(LEARN_KMEANS_SETTINGS, **overrides)
    return MiniBatchKMeans(n_clusters=n_clusters, compute_labels=False, init_size=None, verbose=0,
                           random_state=seed, **settings)


def pool_frames(n_clusters: int, batch_size: int = 10000, pool_size: Optional[int] = None) -> int:
    """Frames of :class:`StreamingKMeans`' pool: ``pool_size``, or ``max(3 * batch_size, 3 * K)``
    (sklearn's ``init_size``) when not given."""
    return int(pool_size or max(3 * int(batch_size), 3 * int(n_clusters)))


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
        steps: mini-batch steps taken after the initial fit.
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
        self.pool_size = pool_frames(self.n_clusters, self.batch_size, pool_size)
        if self.pool_size < self.batch_size:
            raise ValueError(f"pool_size {self.pool_size} < batch_size {self.batch_size}")
        self.km = new_kmeans(self.n_clusters, seed=self.seed, batch_size=self.batch_size, **settings)
        self._rng = np.random.default_rng(self.seed)
        self._pool = np.empty((self.pool_size, self.dim), dtype=np.float32)
        self._n = 0
        self._centers: Optional[torch.Tensor] = None  # (K, D) float64 running means, after the initial fit
        self._counts: Optional[torch.Tensor] = None  # (K,) float64 frames assigned to each centre so far
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
                if self._centers is None:
                    self.fit_initial(self._pool[: self._n])
                    self._n = 0  # the pool becomes a shuffle buffer for the rest of the stream
                else:
                    self._step_from_pool()

    def fit_initial(self, X: np.ndarray) -> None:
        """Step 1 on given frames ``(N, D)`` (e.g. a uniform reservoir of the whole stream); every
        frame :meth:`add`-ed afterwards is streamed (step 2)."""
        if self._centers is not None:
            raise RuntimeError("the initial fit was already done")
        X = np.ascontiguousarray(X, dtype=np.float32)
        logger.info(f"k-means: fitting K={self.n_clusters} on the first {len(X)} frames "
                    f"(n_init={self.km.n_init}, batch {self.batch_size})")
        self.km.fit(X)
        self.init_objective = objective_of(self.km.cluster_centers_, X)
        self.init_frames = len(X)
        logger.info(f"k-means: objective on those frames {self.init_objective:.5f}")
        # every centre starts as the mean of the pool frames nearest to it (their number weighs it)
        self._centers = torch.from_numpy(np.asarray(self.km.cluster_centers_, dtype=np.float64))
        self._counts = torch.zeros(self.n_clusters, dtype=torch.float64)
        for s in range(0, len(X), 65536):
            _, nearest = self._nearest(X[s : s + 65536])
            self._counts += torch.bincount(nearest, minlength=self.n_clusters)

    def _nearest(self, X: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N,)`` squared distance of each frame to its nearest centre and that centre's index (float32, as dump)."""
        c = self._centers.float()
        d = sq_distances(torch.from_numpy(X), c).clamp_min_(0)
        return d.min(1)

    def _step(self, X: np.ndarray) -> None:
        """One mini-batch ``(n, D)``: each centre becomes the mean of every frame assigned to it so far."""
        dist, nearest = self._nearest(X)
        self._stream_sse += float(dist.double().sum())
        self._stream_frames += len(X)
        m = torch.bincount(nearest, minlength=self.n_clusters).double()
        sums = torch.zeros_like(self._centers).index_add_(0, nearest, torch.from_numpy(X).double())
        self._counts += m
        moved = m > 0
        self._centers[moved] += (sums[moved] - m[moved, None] * self._centers[moved]) / self._counts[moved, None]
        self.steps += 1

    def _step_from_pool(self) -> None:
        pick = self._rng.choice(self._n, self.batch_size, replace=False)
        keep = np.ones(self._n, dtype=bool)
        keep[pick] = False
        batch = self._pool[pick]
        rest = self._pool[: self._n][keep]
        self._pool[: len(rest)] = rest
        self._n = len(rest)
        self._step(batch)

    def finish(self):
        """Fit on what is left; returns the fitted ``MiniBatchKMeans`` (its ``cluster_centers_`` the
        streamed centroids when frames were streamed).

        Raises:
            InputError: fewer frames than clusters.
        """
        if self._centers is None:
            if self._n < self.n_clusters:
                raise InputError([f"K={self.n_clusters} clusters but only {self._n} frames to fit them on "
                                  f"(use fewer clusters or a larger --percent)"])
            self.fit_initial(self._pool[: self._n])
            self._n = 0
        else:
            order = self._rng.permutation(self._n)
            for s in range(0, self._n, self.batch_size):
                self._step(self._pool[order[s : s + self.batch_size]])
            self._n = 0
            logger.info(f"k-means: {self.steps} streamed mini-batches after the initial fit, "
                        f"held-out objective {self.stream_objective:.5f}")
        if self.steps:
            self.km.cluster_centers_ = self._centers.numpy().astype(self.km.cluster_centers_.dtype)
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


def l2_normalize_np(x: np.ndarray) -> np.ndarray:
    """``(N, D)`` float32 rows scaled to unit L2 norm (zero rows stay zero), as :func:`l2_normalize`."""
    return l2_normalize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


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
        normalize: L2-normalise the features first: the mode of a k-means model fitted on unit
            vectors (``fit --normalize``), whose centroids are used as fitted, so the hard
            labels are that k-means' own assignment; ``d^2 = |x/|x| - c|^2`` lies in
            ``[0, (1 + |c|)^2]`` (``2 - 2 cos`` for a centroid of unit norm).
        device: where to compute.
    """

    def __init__(self, centers: np.ndarray, normalize: bool = False, device: str = "cpu"):
        c = torch.from_numpy(np.asarray(centers, dtype=np.float32)).to(device)
        self.normalize = bool(normalize)
        self.centers = c
        self.c_sq = self.centers.pow(2).sum(1)
        self.n_clusters, self.dim = self.centers.shape

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, K)`` squared distances of ``(T, D)`` frames (L2-normalised first in ``normalize`` mode) to the centroids."""
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
        return self.distances(x).argmin(1).cpu()

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
        logits = -self.distances(x).clamp_min(0) / float(temperature)
        k = min(int(top_k), self.n_clusters)
        top, ids = torch.topk(logits, k, dim=1, largest=True, sorted=True)
        probs = torch.softmax(top, dim=1)
        kept = torch.exp(torch.logsumexp(top, 1) - torch.logsumexp(logits, 1))
        return ids.cpu(), probs.float().cpu(), kept.float().cpu()
