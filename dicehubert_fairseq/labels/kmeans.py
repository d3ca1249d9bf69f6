"""k-means on a stream of frame features, in memory bounded independently of corpus size.

fairseq's ``learn_kmeans.py`` loads its whole sample into RAM and calls
``MiniBatchKMeans.fit`` (k-means++, batch 10000, ``max_iter`` 100, ``max_no_improvement`` 100,
``n_init`` 20, ``reassignment_ratio`` 0, ``tol`` 0).  :class:`StreamingKMeans` uses the same
estimator with the same settings, fed from a stream:

1. ``pool_size`` frames (default ``3 * batch_size``, sklearn's ``init_size``) are ``fit`` on
   exactly as fairseq does (``n_init`` k-means++ trials, best kept, then mini-batch steps with
   early stopping) -- for a sample of at most ``pool_size`` frames this *is* fairseq's
   learn_kmeans on that sample.  :func:`~dicehubert_fairseq.labels.fit.fit_kmeans` gives it a
   uniform random sample of the whole stream (:class:`ReservoirSample`, an extra pass over the features) when the sample is larger
   than the pool; :meth:`StreamingKMeans.add` alone uses the first ``pool_size`` frames;
2. every later frame goes through a shuffle pool of ``pool_size`` frames from which random
   mini-batches of ``batch_size`` frames are drawn and passed to ``partial_fit``; the pool is
   drained at the end.  sklearn keeps per-centre counts and moves a centre by
   ``n_batch / (count + n_batch)`` towards the mean of its new frames; after step 1 the counts are
   rescaled to the number of frames actually fitted on (``fit`` counts each frame once per epoch),
   so every centre stays the running mean of all frames ever assigned to it (MacQueen's online
   k-means, in mini-batches) and the stream after the pool weighs as much as its size.

Peak memory is ``O((pool_size + batch_size) * D)`` whatever the number of frames.

This module is the algorithm only: fitting on a manifest and the model files are
:mod:`dicehubert_fairseq.labels.fit`.
"""

import logging
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from ..errors import InputError

logger = logging.getLogger(__name__)

#: The one private scikit-learn attribute used: ``MiniBatchKMeans._counts``, the per-centre sample
#: weights that ``partial_fit`` moves each centre by (``n_batch / (count + n_batch)``). setup.py
#: bounds scikit-learn to the versions where it means that, and
#: ``tests/test_labels_kmeans.py::test_sklearn_private_counts_still_mean_what_we_rescale`` fails
#: if a version changes it.
SKLEARN_COUNTS = "_counts"

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
        counts = getattr(self.km, SKLEARN_COUNTS)  # private: see SKLEARN_COUNTS
        if counts.sum() > 0:
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
        two = torch.topk(a._dist(c).clamp_min(0), min(2, a.n_clusters), dim=1, largest=False).values
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
