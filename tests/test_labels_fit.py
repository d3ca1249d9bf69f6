"""Fitting k-means on a manifest (labels/fit.py): fairseq's sample, streaming past the pool, the model files."""

import numpy as np
import pytest

from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.labels.cli import main
from dicehubert_fairseq.labels.config import Corpus, FeatureConfig
from dicehubert_fairseq.labels.dump import DumpConfig
from dicehubert_fairseq.labels.fit import FitConfig, load_kmeans, sample_rows, save_kmeans
from dicehubert_fairseq.labels.mfcc import MfccFeatureReader
from dicehubert_fairseq.labels.plan import make_plan
from dicehubert_fairseq.labels.kmeans import new_kmeans, objective_of
from tests.test_labels_dump import _features
from tests.test_labels_kmeans import mixture

pytestmark = pytest.mark.usefixtures("one_openmp_thread")


def test_sample_rows_fairseq_percent():
    rows = sample_rows(10, 0.25, seed=0)
    assert len(rows) == 3 and len(set(rows.tolist())) == 3  # ceil(10 * 0.25)
    np.random.seed(0)  # what fairseq's learn_kmeans does with --seed 0 --percent 0.25
    np.testing.assert_array_equal(rows, np.random.choice(10, 3, replace=False))
    np.testing.assert_array_equal(rows, sample_rows(10, 0.25, seed=0))
    assert sorted(sample_rows(10, -1, seed=0).tolist()) == list(range(10))
    assert sorted(sample_rows(10, 1.0, seed=4).tolist()) == list(range(10))


def test_save_load_roundtrip_and_bad_files(tmp_path):
    km = new_kmeans(3, seed=0, batch_size=100).fit(mixture(300, dim=4, k=3))
    path = str(tmp_path / "km.joblib")
    save_kmeans(km, path, {"features": {"type": "mfcc"}})
    back, meta = load_kmeans(path)
    np.testing.assert_array_equal(back.cluster_centers_, km.cluster_centers_)
    assert meta["features"]["type"] == "mfcc"
    with pytest.raises(InputError, match="k-means model not found"):
        load_kmeans(str(tmp_path / "nope.joblib"))
    (tmp_path / "junk.joblib").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not a readable joblib k-means model"):
        load_kmeans(str(tmp_path / "junk.joblib"))
    import joblib

    joblib.dump({"a": 1}, tmp_path / "dict.joblib")
    with pytest.raises(InputError, match="not a fitted k-means model"):
        load_kmeans(str(tmp_path / "dict.joblib"))


def test_fit_streams_past_the_pool(tiny_corpus, tmp_path, capsys):
    """A sample larger than the pool: initial fit on the pool, then partial_fit on the rest of the stream."""
    data, km_path = tiny_corpus["data"], str(tmp_path / "km.joblib")
    assert main(["fit", "--manifest-dir", data, "--mfcc", "--n-clusters", "12", "--out", km_path, "--batch-size", "100",
                 "--pool-size", "300", "--n-init", "3", "--block-size", "3", "--threads", "1", "--no-progress"]) == 0
    assert "held-out on" in capsys.readouterr().out
    km, meta = load_kmeans(km_path)
    assert meta["pool_size"] == 300 and meta["passes"] == 2 and meta["init_frames"] == 300
    assert meta["partial_fit_steps"] >= 10 and meta["frames"] == sum(
        1 + (s - 400) // 160 for s in tiny_corpus["sizes"]["train"])
    X = np.concatenate(_features(data, "train", MfccFeatureReader()))
    full = new_kmeans(12, seed=0, batch_size=100, n_init=3).fit(X)
    assert objective_of(km.cluster_centers_, X) <= 1.15 * objective_of(full.cluster_centers_, X)


def test_fit_warns_when_the_pool_holds_few_frames_per_cluster(tiny_corpus, tmp_path, capsys):
    """Past the pool, fewer than POOL_FRAMES_PER_CLUSTER pool frames per cluster measured a worse objective: warned,
    with the --pool-size that avoids it; at 25 per cluster (and when the sample fits the pool) nothing is said."""
    data = tiny_corpus["data"]

    def fit(k, pool):  # the CLI logs to stderr (its basicConfig replaces the root handlers)
        capsys.readouterr()
        assert main(["fit", "--manifest-dir", data, "--mfcc", "--n-clusters", str(k), "--out", str(tmp_path / "km.joblib"),
                     "--batch-size", "100", "--pool-size", str(pool), "--n-init", "1", "--threads", "1",
                     "--no-progress"]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if "| WARNING |" in line]

    warned = fit(40, 300)
    assert len(warned) == 1 and "7.5 frames per cluster for K=40" in warned[0] and "--pool-size 1000" in warned[0]
    assert fit(12, 300) == []  # 25 per cluster
    assert fit(40, 5000) == []  # the sample fits the pool: in-memory fit


def test_fit_reports_typical_distances_and_soft_label_entropies(tiny_corpus, tmp_path, capsys):
    """The distances a user chooses the soft labels' temperature by, measured on the fitted frames with the final
    centroids (here every frame: fewer than --report-frames), and the entropy at each reported temperature with
    dump's default top-k."""
    data, km_path = tiny_corpus["data"], str(tmp_path / "km.joblib")
    assert main(["fit", "--manifest-dir", data, "--mfcc", "--n-clusters", "12", "--out", km_path, "--n-init", "2",
                 "--report-temperatures", "100", "1000", "--no-progress"]) == 0
    out = capsys.readouterr().out
    km, meta = load_kmeans(km_path)
    d = meta["distances"]
    X = np.concatenate(_features(data, "train", MfccFeatureReader())).astype(np.float64)
    d2 = ((X[:, None, :] - km.cluster_centers_[None].astype(np.float64)) ** 2).sum(-1)
    srt = np.sort(d2, 1)
    assert d["frames"] == len(X) == meta["frames"]
    assert d["nearest"]["p50"] == pytest.approx(np.percentile(srt[:, 0], 50), rel=1e-3)
    assert d["gap"]["p90"] == pytest.approx(np.percentile(srt[:, 1] - srt[:, 0], 90), rel=1e-3)
    assert d["top_k"] == DumpConfig().top_k == 10  # one soft-label top-k default: dump's
    assert set(d["entropy_bits"]) == {"100", "1000"} and 0 < d["entropy_bits"]["100"] < d["entropy_bits"]["1000"]
    assert f"gap to the second nearest: {d['gap']['p10']:.4g} / {d['gap']['p50']:.4g}" in out
    assert "--soft --temperature 1000: " in out and "--soft --temperature-gap 1 (T = " in out


def test_fit_refuses_bad_report_options(tiny_corpus, tmp_path):
    cfg = FitConfig(n_clusters=4, out=str(tmp_path / "km.joblib"), report_temperatures=[0.0])
    with pytest.raises(InputError, match="--report-temperatures must be > 0"):
        make_plan("fit", Corpus(str(tmp_path), "none"), FeatureConfig(mfcc=True), fit=cfg)
