"""Streaming k-means of dicehubert-labels: fairseq learn_kmeans' estimator on a pool, our own online step past it."""

import tracemalloc

import numpy as np
import pytest
import torch

from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.labels.kmeans import (
    LEARN_KMEANS_SETTINGS, Assigner, ReservoirSample, StreamingKMeans, new_kmeans, objective_of,
)
from dicehubert_fairseq.labels.fit import distance_report

pytestmark = pytest.mark.usefixtures("one_openmp_thread")


def mixture(n, dim=16, k=20, seed=0):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(0, 4, size=(k, dim))
    return (means[rng.integers(0, k, n)] + rng.normal(0, 1, size=(n, dim))).astype(np.float32)


def test_settings_are_fairseq_learn_kmeans():
    km = new_kmeans(7, seed=3)
    for key, value in dict(init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100,
                           n_init=20, reassignment_ratio=0.0).items():
        assert getattr(km, key) == value == LEARN_KMEANS_SETTINGS[key]
    assert km.init_size is None and km.compute_labels is False and km.random_state == 3


def test_sample_that_fits_the_pool_is_fairseqs_fit_exactly():
    X = mixture(2500)
    skm = StreamingKMeans(20, 16, seed=5, batch_size=1000)
    for s in range(0, len(X), 333):
        skm.add(X[s : s + 333])
    ours = skm.finish()
    ref = new_kmeans(20, seed=5, batch_size=1000).fit(X)
    np.testing.assert_array_equal(ours.cluster_centers_, ref.cluster_centers_)
    assert skm.steps == 0 and skm.frames_seen == 2500


def test_stream_objective_close_to_in_memory_fit():
    X = mixture(40000, seed=1)
    skm = StreamingKMeans(20, 16, seed=0, batch_size=1000, pool_size=3000)
    for s in range(0, len(X), 777):
        skm.add(X[s : s + 777])
    ours = skm.finish()
    assert skm.steps > 30  # most of the stream went through partial_fit
    full = new_kmeans(20, seed=0, batch_size=1000).fit(X)
    o_ours, o_full = objective_of(ours.cluster_centers_, X), objective_of(full.cluster_centers_, X)
    assert o_ours <= 1.05 * o_full, (o_ours, o_full)


def _peak_bytes(n_frames, chunk=500):
    skm = StreamingKMeans(20, 16, seed=0, batch_size=1000, pool_size=3000)
    tracemalloc.start()
    rng = np.random.default_rng(0)
    for _ in range(n_frames // chunk):
        skm.add(rng.normal(size=(chunk, 16)).astype(np.float32))
    skm.finish()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_peak_memory_flat_in_stream_length():
    one, four = _peak_bytes(15000), _peak_bytes(60000)
    assert four < 1.25 * one, (one, four)


def test_same_seed_same_model_other_seed_other_model():
    X = mixture(12000, seed=2)

    def fit(seed):
        skm = StreamingKMeans(20, 16, seed=seed, batch_size=1000, pool_size=3000, n_init=3)
        for s in range(0, len(X), 1000):
            skm.add(X[s : s + 1000])
        return skm.finish().cluster_centers_

    np.testing.assert_array_equal(fit(0), fit(0))
    assert not np.array_equal(fit(0), fit(1))


def test_too_few_frames_for_k():
    skm = StreamingKMeans(50, 4, batch_size=100)
    skm.add(np.zeros((30, 4), np.float32))
    with pytest.raises(InputError, match="K=50 clusters but only 30 frames"):
        skm.finish()


def test_assigner_hard_and_soft_by_hand():
    centers = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]], np.float32)
    x = torch.tensor([[1.0, 0.0], [0.1, 2.9]])
    a = Assigner(centers)
    assert a.hard(x).tolist() == [0, 2]  # (1,0) ties 0 and 1 at d^2 = 1: argmin keeps the first
    ids, probs, kept = a.soft(x[:1], temperature=2.0, top_k=3)
    d2 = np.array([1.0, 1.0, 10.0])
    p = np.exp(-d2 / 2) / np.exp(-d2 / 2).sum()
    np.testing.assert_allclose(np.sort(probs[0].numpy())[::-1], np.sort(p)[::-1], atol=1e-6)
    assert ids[0, 2].item() == 2 and kept[0].item() == pytest.approx(1.0)
    ids, probs, kept = a.soft(x[:1], temperature=2.0, top_k=2)  # renormalised over the kept two
    np.testing.assert_allclose(probs[0].numpy(), [0.5, 0.5], atol=1e-6)
    assert kept[0].item() == pytest.approx(p[0] + p[1], rel=1e-5)
    # normalised mode: the frame is scaled to unit norm, the centroids (fitted on unit vectors) are used as
    # they are: (10, 10) -> (r, r), r = 1/sqrt(2), at 45 degrees from both centroids
    unit_fitted = np.array([[0.6, 0.0], [0.0, 1.0]], np.float32)
    an = Assigner(unit_fitted, normalize=True)
    ids, probs, _ = an.soft(torch.tensor([[10.0, 10.0]]), temperature=1.0, top_k=2)
    r = 1 / np.sqrt(2)
    d2 = np.array([(r - 0.6) ** 2 + r ** 2, r ** 2 + (r - 1.0) ** 2])  # 0.5115; 0.5858 = 2 - 2 cos 45deg
    p = np.exp(-d2) / np.exp(-d2).sum()
    assert ids[0].tolist() == [0, 1] and an.hard(torch.tensor([[10.0, 10.0]])).tolist() == [0]
    np.testing.assert_allclose(probs[0].numpy(), p, atol=1e-6)
    # not the centroids' directions alone: normalising them too would tie (0.6, 0) with (1, 0)
    assert Assigner(np.array([[0.6, 0.0], [1.0, 0.0]], np.float32), normalize=True).hard(
        torch.tensor([[3.0, 0.0]])).tolist() == [1]



def test_distance_report_by_hand():
    """Squared distances to the nearest centroid, the gap to the second, and the soft labels' entropy."""
    centers = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]], np.float32)
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    # d^2 rows: (0, 4, 9), (1, 1, 10), (4, 8, 1) -> nearest 0, 1, 1; gaps 4, 0, 3
    r = distance_report(centers, X, temperatures=[2.0, 1e-3, 1e6], top_k=3)
    assert r["frames"] == 3 and r["top_k"] == 3 and r["max_entropy_bits"] == pytest.approx(np.log2(3))
    assert r["nearest"]["p50"] == pytest.approx(1.0) and r["gap"]["p50"] == pytest.approx(3.0)
    assert r["gap"]["p10"] == pytest.approx(0.6) and r["gap"]["p90"] == pytest.approx(3.8)  # linear interpolation
    d2 = np.array([[0, 4, 9], [1, 1, 10], [4, 8, 1]], np.float64)
    p = np.exp(-d2 / 2.0)
    p /= p.sum(1, keepdims=True)
    assert r["entropy_bits"]["2"] == pytest.approx(float((-(p * np.log2(p)).sum(1)).mean()), rel=1e-5)
    assert r["top1"]["2"] == pytest.approx(float(p.max(1).mean()), rel=1e-5)
    # a tiny T: one-hot except the tie of frame 2 (1 bit); a huge T: uniform over the 3 kept
    assert r["entropy_bits"]["0.001"] == pytest.approx(1 / 3, abs=1e-6)
    assert r["entropy_bits"]["1e+06"] == pytest.approx(np.log2(3), abs=1e-4)
    # T relative to the median gap (3): T = 1.5 and 3 for multiples 0.5 and 1
    for m, t in (("0.5", 1.5), ("1", 3.0)):
        q = np.exp(-d2 / t)
        q /= q.sum(1, keepdims=True)
        assert r["entropy_bits_gap"][m] == pytest.approx(float((-(q * np.log2(q)).sum(1)).mean()), rel=1e-5)
    # normalised mode: the frames are scaled to unit norm first
    rn = distance_report(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.array([[5.0, 0.0]], np.float32),
                         normalize=True, temperatures=[1.0], top_k=2)
    assert rn["nearest"]["p50"] == pytest.approx(0.0, abs=1e-6) and rn["gap"]["p50"] == pytest.approx(2.0)

def test_reservoir_is_uniform_and_bounded():
    counts = np.zeros(100)
    for seed in range(300):
        r = ReservoirSample(10, 1, seed=seed)
        for s in range(0, 100, 7):
            r.add(np.arange(s, min(s + 7, 100), dtype=np.float32)[:, None])
        assert r.seen == 100 and r.data.shape == (10, 1) and len(set(r.data[:, 0].tolist())) == 10
        counts[r.data[:, 0].astype(int)] += 1
    # every frame kept with probability 10/100: 30 of 300 runs on average
    assert counts.min() > 12 and counts.max() < 52 and abs(counts[:50].mean() - counts[50:].mean()) < 4
    small = ReservoirSample(10, 2)
    small.add(np.ones((4, 2), np.float32))
    assert small.data.shape == (4, 2)


def test_online_step_keeps_each_centre_the_mean_of_every_frame_assigned_to_it():
    """By hand: two clusters of the pool (3 frames at 0, 2 at 10, in 1-d), then two streamed
    mini-batches; each centre is the mean of all its frames, the pool's and the stream's."""
    pool = np.array([[0.0], [0.0], [0.0], [10.0], [10.0]], np.float32)
    skm = StreamingKMeans(2, 1, seed=0, batch_size=2, pool_size=5, n_init=1)
    skm.add(pool)  # the pool is full: fitted as fairseq does, centres 0 and 10
    low = int(np.argmin(skm.km.cluster_centers_[:, 0]))
    np.testing.assert_allclose(np.sort(skm.km.cluster_centers_[:, 0]), [0.0, 10.0], atol=1e-5)
    skm.add(np.array([[3.0], [12.0]], np.float32))  # 2 frames: in the shuffle pool, not yet a mini-batch
    assert skm.steps == 0
    skm.add(np.array([[1.0], [11.0], [2.0]], np.float32))  # full pool (5): one mini-batch of 2 drawn
    assert skm.steps == 1
    km = skm.finish()  # the 3 frames left: two more mini-batches
    assert skm.steps == 3 and skm.frames_seen == 10
    centers = km.cluster_centers_[:, 0]
    np.testing.assert_allclose(centers[low], np.mean([0, 0, 0, 3, 1, 2]), atol=1e-5)
    np.testing.assert_allclose(centers[1 - low], np.mean([10, 10, 12, 11]), atol=1e-5)
    assert km.cluster_centers_.dtype == np.float32
    # the held-out objective: each batch's squared distances before its own update
    assert skm.stream_objective > 0


def test_online_step_is_the_mini_batch_update_of_sklearns_partial_fit():
    """From the same centres and no frames counted yet, our steps move the centres as
    ``MiniBatchKMeans.partial_fit`` (reassignment off) moves them, batch after batch."""
    X = mixture(3000, dim=4, k=5, seed=3)
    skm = StreamingKMeans(5, 4, seed=1, batch_size=500, pool_size=500, n_init=1)
    skm.fit_initial(X[:500])
    start = np.asarray(skm.km.cluster_centers_).copy()
    skm._counts.zero_()  # as a fresh partial_fit: no frame counted yet
    ref = new_kmeans(5, seed=1, batch_size=500, n_init=1, init=start)
    for s in range(500, 3000, 500):
        batch = np.ascontiguousarray(X[s : s + 500])
        skm._step(batch)
        ref.partial_fit(batch)
        np.testing.assert_allclose(skm._centers.numpy(), ref.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert skm.steps == 5 and not np.allclose(start, ref.cluster_centers_)


def test_kmeans_uses_public_scikit_learn_api_only():
    """No private attribute of a scikit-learn object is read or written (they change between releases)."""
    import ast
    import inspect

    from dicehubert_fairseq.labels import kmeans

    tree = ast.parse(inspect.getsource(kmeans))
    private = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and isinstance(node.value, ast.Attribute) and node.value.attr == "km" and node.attr.startswith("_")]
    assert private == []
