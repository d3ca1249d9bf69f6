"""dicehubert-labels fit/dump/merge: label values, soft labels, shards, resume, fairseq agreement; the
``--max-batch-seconds``, ``--max-chunk`` and ``merge --out-dir`` options."""

import glob
import importlib.util
import os

import joblib
import numpy as np
import pytest
import torch

from dicehubert_fairseq.data.audio import read_audio
from dicehubert_fairseq.data.files import SoftLabels, read_dictionary_symbols, read_manifest
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.labels.cli import main
from dicehubert_fairseq.labels.config import Corpus, FeatureConfig
from dicehubert_fairseq.labels.dump import DumpConfig
from dicehubert_fairseq.labels.mfcc import MfccFeatureReader
from dicehubert_fairseq.labels.plan import make_plan
from dicehubert_fairseq.labels.teacher import TeacherFeatureReader
from dicehubert_fairseq.labels.fit import load_kmeans
from dicehubert_fairseq.labels.kmeans import new_kmeans, objective_of
from tests.helpers.data import num_frames

pytestmark = pytest.mark.usefixtures("one_openmp_thread")


SIMPLE_KMEANS = os.path.join(os.path.dirname(importlib.util.find_spec("fairseq").origin),
                             "examples", "hubert", "simple_kmeans")


def _lines(path):
    with open(path) as f:
        return [list(map(int, line.split())) for line in f]


def _features(data, split, reader):
    m = read_manifest(os.path.join(data, f"{split}.tsv"))
    return [reader.features([read_audio(m, i)])[0] for i in range(len(m))]


@pytest.fixture(scope="module")
def mfcc_km_unit(tiny_corpus, tmp_path_factory):
    """K=12 k-means fitted on the L2-normalised MFCC of the tiny train split (fit --normalize)."""
    path = str(tmp_path_factory.mktemp("km_unit") / "mfcc_unit.joblib")
    assert main(["fit", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--mfcc", "--n-clusters", "12",
                 "--out", path, "--n-init", "3", "--normalize", "--no-progress"]) == 0
    return path


def _nearest(feats, centers, normalize=False):
    """float64 brute force; also the gap between the best and second best squared distance.  ``normalize``:
    the frames scaled to unit norm, the centroids (fitted on unit vectors) as they are."""
    x, c = feats.astype(np.float64), centers.astype(np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    srt = np.sort(d2, 1)
    return d2.argmin(1), srt[:, 1] - srt[:, 0], d2


def test_teacher_fit_dump_labels_are_nearest_centroids(tiny_corpus, tiny_teacher, tmp_path):
    data = tiny_corpus["data"]
    km_path, out = str(tmp_path / "km.joblib"), str(tmp_path / "labels")
    common = ["--manifest-dir", data, "--checkpoint", tiny_teacher, "--layer", "2", "--no-progress"]
    assert main(["fit", *common, "--split", "train", "--n-clusters", "8", "--out", km_path, "--n-init", "3"]) == 0
    assert main(["dump", *common, "--split", "valid", "--km", km_path, "--label-dir", out]) == 0
    km, meta = load_kmeans(km_path)
    assert meta["features"]["layer"] == 2 and meta["n_clusters"] == 8 and meta["frames"] > 0
    labels = _lines(os.path.join(out, "valid.km"))
    assert read_dictionary_symbols(os.path.join(out, "dict.km.txt")) == [str(i) for i in range(8)]
    # independent features: fairseq's own extract_features, one utterance at a time
    model = TeacherFeatureReader(tiny_teacher, 2).model
    m = read_manifest(os.path.join(data, "valid.tsv"))
    assert len(labels) == len(m)
    for i, got in enumerate(labels):
        with torch.no_grad():
            f, _ = model.extract_features(source=torch.from_numpy(read_audio(m, i))[None], padding_mask=None,
                                          mask=False, output_layer=2)
        ref, gap, _ = _nearest(f[0].numpy(), km.cluster_centers_)
        assert len(got) == len(ref) == (m.sizes[i] - 400) // 320 + 1  # 50 Hz
        clear = gap > 1e-3
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(np.asarray(got)[clear], ref[clear])
    assert not glob.glob(os.path.join(out, "*.parts")) and not glob.glob(os.path.join(out, "*.tmp"))



def test_concatenated_layers_fit_and_dump(tiny_corpus, tiny_teacher, tmp_path, capsys, one_torch_thread):
    """--layer 1,2 in fit and dump: k-means on both layers' outputs side by side; the labels are the nearest
    centroids of those concatenated frames; dumping other layers than the model's is refused."""
    data = tiny_corpus["data"]
    km_path, out = str(tmp_path / "km.joblib"), str(tmp_path / "labels")
    common = ["--manifest-dir", data, "--checkpoint", tiny_teacher, "--layer", "1,2", "--no-progress"]
    assert main(["fit", *common, "--split", "train", "--n-clusters", "6", "--out", km_path, "--n-init", "2"]) == 0
    km, meta = load_kmeans(km_path)
    assert meta["features"]["layer"] == [1, 2] and km.cluster_centers_.shape == (6, 64)
    assert main(["dump", *common, "--split", "valid", "--km", km_path, "--label-dir", out, "--name", "cat"]) == 0
    model = TeacherFeatureReader(tiny_teacher, 2).model
    m = read_manifest(os.path.join(data, "valid.tsv"))
    for i, got in enumerate(_lines(os.path.join(out, "valid.cat"))):
        with torch.no_grad():
            src = torch.from_numpy(read_audio(m, i))[None]
            f = torch.cat([model.extract_features(source=src, padding_mask=None, mask=False, output_layer=layer)[0][0]
                           for layer in (1, 2)], dim=1)
        ref, gap, _ = _nearest(f.numpy(), km.cluster_centers_)
        np.testing.assert_array_equal(np.asarray(got)[gap > 1e-3], ref[gap > 1e-3])
    capsys.readouterr()
    assert main(["dump", "--manifest-dir", data, "--checkpoint", tiny_teacher, "--layer", "2", "--split", "valid",
                 "--km", km_path, "--label-dir", out, "--no-progress"]) == 1
    assert "centroids have dimension 64, but the features have 32" in capsys.readouterr().err

def test_mfcc_dump_hard_labels_and_100hz(tiny_corpus, mfcc_km, tmp_path):
    out = str(tmp_path / "labels")
    assert main(["dump", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--mfcc", "--km", mfcc_km,
                 "--label-dir", out, "--name", "mfcc", "--no-progress", "--block-size", "3"]) == 0
    km, _ = load_kmeans(mfcc_km)
    feats = _features(tiny_corpus["data"], "train", MfccFeatureReader())
    labels = _lines(os.path.join(out, "train.mfcc"))
    for got, f, size in zip(labels, feats, tiny_corpus["sizes"]["train"]):
        ref, gap, _ = _nearest(f, km.cluster_centers_)
        assert len(got) == 1 + (size - 400) // 160
        np.testing.assert_array_equal(np.asarray(got)[gap > 1e-3], ref[gap > 1e-3])
    assert main(["check", "--manifest-dir", tiny_corpus["data"], "--label-dir", out, "--labels", "mfcc",
                 "--label-rate", "100", "--split", "train"]) == 0


@pytest.mark.parametrize("normalize,temperature", [(False, 5.0), (True, 1.0)])
def test_soft_labels_are_softmax_of_negative_sq_distances(tiny_corpus, mfcc_km, mfcc_km_unit, tmp_path, normalize,
                                                          temperature):
    """Normalised: the model's stored mode is used (no --normalize needed)."""
    data, out = tiny_corpus["data"], str(tmp_path / "soft")
    km_path = mfcc_km_unit if normalize else mfcc_km
    args = ["dump", "--manifest-dir", data, "--split", "valid", "--mfcc", "--km", km_path, "--label-dir", out,
            "--soft", "--temperature", str(temperature), "--top-k", "12", "--no-progress"]
    assert main(args) == 0
    soft = SoftLabels(out, "valid", "km")
    assert soft.top_k == 12 and soft.n_clusters == 12 and soft.meta["temperature"] == temperature
    assert soft.meta["normalize"] is normalize and soft.meta["mean_kept_mass"] == pytest.approx(1.0)
    assert soft.validate(num_utterances=4) == []
    probs = np.asarray(soft.probs, dtype=np.float64)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (np.diff(probs, axis=1) <= 1e-7).all()  # most likely first
    hard = _lines(os.path.join(out, "valid.km"))
    assert np.concatenate(hard).tolist() == np.asarray(soft.ids[:, 0]).tolist()  # hard file = argmax
    # one frame checked by hand: p = softmax(-d^2 / T) over all 12 centroids
    km, _ = load_kmeans(km_path)
    feats = _features(data, "valid", MfccFeatureReader())
    utt, frame = 2, 17
    _, _, d2 = _nearest(feats[utt][frame : frame + 1], km.cluster_centers_, normalize)
    logits = -d2[0] / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    a, _ = soft.frame_range(utt)
    ids, got = np.asarray(soft.ids[a + frame]), probs[a + frame]
    np.testing.assert_allclose(got, p[ids], atol=1e-5)
    assert sorted(ids.tolist()) == list(range(12))
    if normalize:
        assert got[0] < 0.9  # normalised distances at T=1 give a real distribution
    # check accepts it (soft files detected)
    assert main(["check", "--manifest-dir", data, "--label-dir", out, "--labels", "km", "--label-rate", "100",
                 "--split", "valid"]) == 0



def test_fit_normalize_is_kmeans_on_unit_vectors_and_dump_uses_the_stored_mode(tiny_corpus, mfcc_km, mfcc_km_unit,
                                                                               tmp_path, capsys):
    data = tiny_corpus["data"]
    km, meta = load_kmeans(mfcc_km_unit)
    assert meta["normalize"] is True and load_kmeans(mfcc_km)[1]["normalize"] is False
    # centroids of unit vectors (means of them: norm <= 1), as good as an in-memory fit on the unit vectors
    X = np.concatenate(_features(data, "train", MfccFeatureReader()))
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert np.linalg.norm(km.cluster_centers_, axis=1).max() <= 1 + 1e-5
    assert np.linalg.norm(load_kmeans(mfcc_km)[0].cluster_centers_, axis=1).min() > 10  # raw MFCC centroids
    direct = new_kmeans(12, seed=0, n_init=3).fit(U)
    assert objective_of(km.cluster_centers_, U) <= 1.05 * objective_of(direct.cluster_centers_, U)
    # dump without --normalize: the stored mode; labels = the nearest fitted centroid of the unit frame
    out = str(tmp_path / "unit")
    assert main(["dump", "--manifest-dir", data, "--split", "valid", "--mfcc", "--km", mfcc_km_unit, "--label-dir", out,
                 "--no-progress"]) == 0
    feats = _features(data, "valid", MfccFeatureReader())
    for got, f in zip(_lines(os.path.join(out, "valid.km")), feats):
        ref, gap, _ = _nearest(f, km.cluster_centers_, normalize=True)
        np.testing.assert_array_equal(np.asarray(got)[gap > 1e-4], ref[gap > 1e-4])
    # a mismatch is an error, before any feature is read
    capsys.readouterr()
    assert main(["dump", "--manifest-dir", data, "--split", "valid", "--mfcc", "--km", mfcc_km, "--label-dir",
                 str(tmp_path / "x"), "--normalize", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{mfcc_km}: fitted on raw features" in err and "fit --normalize" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(InputError, match="fitted on L2-normalised features"):
        make_plan("dump", Corpus(data, "valid"), FeatureConfig(mfcc=True),
                  dump=DumpConfig(km=mfcc_km_unit, label_dir=str(tmp_path / "y"), normalize=False))


def test_temperature_as_a_multiple_of_the_stored_median_gap(tiny_corpus, mfcc_km_unit, tmp_path, capsys):
    data = tiny_corpus["data"]
    km, meta = load_kmeans(mfcc_km_unit)
    gap = meta["distances"]["gap"]["p50"]
    out = str(tmp_path / "gap")
    base = ["dump", "--manifest-dir", data, "--split", "valid", "--mfcc", "--label-dir", out, "--soft", "--no-progress"]
    assert main(base + ["--km", mfcc_km_unit, "--temperature-gap", "2", "--name", "g2"]) == 0
    soft = SoftLabels(out, "valid", "g2")
    assert soft.meta["temperature"] == pytest.approx(2 * gap) and soft.meta["temperature_gap"] == 2.0
    assert f"at T={2 * gap:.4g}" in capsys.readouterr().out
    assert main(base + ["--km", mfcc_km_unit, "--temperature", str(2 * gap), "--name", "abs"]) == 0
    np.testing.assert_allclose(np.asarray(SoftLabels(out, "valid", "abs").probs), np.asarray(soft.probs), atol=1e-6)
    # a model without the stored gap (fairseq's learn_kmeans writes none), or no --soft: refused
    plain = str(tmp_path / "plain.joblib")
    joblib.dump(new_kmeans(12, seed=0).fit(np.random.default_rng(0).normal(size=(200, 39)).astype(np.float32)), plain)
    capsys.readouterr()
    assert main(base + ["--km", plain, "--temperature-gap", "1"]) == 1
    assert f"{plain}: no median gap stored" in capsys.readouterr().err
    assert main(base[:-2] + ["--no-progress", "--km", mfcc_km_unit, "--temperature-gap", "1"]) == 1
    assert "--temperature-gap needs --soft" in capsys.readouterr().err

def test_soft_top_k_renormalised(tiny_corpus, mfcc_km_unit, tmp_path):
    out = str(tmp_path / "soft3")
    assert main(["dump", "--manifest-dir", tiny_corpus["data"], "--split", "valid", "--mfcc", "--km", mfcc_km_unit,
                 "--label-dir", out, "--soft", "--normalize", "--temperature", "0.5", "--top-k", "3",
                 "--no-progress"]) == 0
    soft = SoftLabels(out, "valid", "km")
    assert soft.ids.shape[1] == 3 and soft.ids.dtype == np.int16
    np.testing.assert_allclose(np.asarray(soft.probs).sum(1), 1.0, atol=1e-5)
    assert 0.0 < soft.meta["mean_kept_mass"] < 1.0


def test_shards_merged_equal_unsharded(tiny_corpus, mfcc_km_unit, tmp_path):
    data = tiny_corpus["data"]
    base = ["dump", "--manifest-dir", data, "--split", "train", "--mfcc", "--km", mfcc_km_unit, "--soft", "--top-k", "4",
            "--normalize", "--no-progress"]
    whole, shards = str(tmp_path / "whole"), str(tmp_path / "shards")
    assert main(base + ["--label-dir", whole]) == 0
    for r in range(3):
        assert main(base + ["--label-dir", shards, "--nshard", "3", "--rank", str(r)]) == 0
    # fairseq's 0-based ranges over 8 rows: [0,3) [3,5) [5,8)
    assert [len(_lines(os.path.join(shards, f"train_{r}_3.km"))) for r in range(3)] == [3, 2, 3]
    assert main(["merge", "--label-dir", shards, "--split", "train", "--nshard", "3", "--manifest-dir", data]) == 0
    with open(os.path.join(whole, "train.km"), "rb") as a, open(os.path.join(shards, "train.km"), "rb") as b:
        assert a.read() == b.read()
    sw, ss = SoftLabels(whole, "train", "km"), SoftLabels(shards, "train", "km")
    np.testing.assert_array_equal(sw.offsets, ss.offsets)
    np.testing.assert_array_equal(np.asarray(sw.ids), np.asarray(ss.ids))
    np.testing.assert_array_equal(np.asarray(sw.probs), np.asarray(ss.probs))
    assert main(["check", "--manifest-dir", data, "--label-dir", shards, "--labels", "km", "--label-rate", "100",
                 "--split", "train"]) == 0


def test_same_seed_same_labels(tiny_corpus, tmp_path):
    data = tiny_corpus["data"]
    outs = []
    for run, seed in enumerate([7, 7, 8]):
        km = str(tmp_path / f"km{run}.joblib")
        assert main(["fit", "--manifest-dir", data, "--mfcc", "--n-clusters", "10", "--out", km, "--seed", str(seed),
                     "--percent", "0.5", "--n-init", "2", "--no-progress"]) == 0
        out = str(tmp_path / f"lab{run}")
        assert main(["dump", "--manifest-dir", data, "--split", "valid", "--mfcc", "--km", km, "--label-dir", out,
                     "--no-progress"]) == 0
        outs.append((load_kmeans(km)[0].cluster_centers_, open(os.path.join(out, "valid.km"), "rb").read()))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]
    assert not np.array_equal(outs[0][0], outs[2][0])


def test_changed_options_do_not_reuse_parts(tiny_corpus, mfcc_km, tmp_path, capsys):
    data, out = tiny_corpus["data"], str(tmp_path / "out")
    parts = os.path.join(out, "valid.km.parts")
    os.makedirs(parts)
    with open(os.path.join(parts, "state.json"), "w") as f:
        f.write('{"version": 1, "normalize": true}')
    np.savez(os.path.join(parts, "block_000000.npz"), lengths=np.array([1]), hard=np.array([0]),
             kept_mass_sum=np.array(0.0))
    assert main(["dump", "--manifest-dir", data, "--split", "valid", "--mfcc", "--km", mfcc_km, "--label-dir", out,
                 "--block-size", "2", "--no-progress"]) == 0
    assert "different inputs or options; starting over" in capsys.readouterr().err
    assert len(_lines(os.path.join(out, "valid.km"))) == 4


@pytest.fixture(scope="module")
def teacher_km(tmp_path_factory, tiny_teacher, tiny_corpus):
    """k-means (K=4) of layer 1 of the tiny teacher, fitted on the tiny corpus."""
    km = str(tmp_path_factory.mktemp("teacher_km") / "km.joblib")
    assert main(["fit", "--manifest-dir", tiny_corpus["data"], "--checkpoint", tiny_teacher, "--layer", "1",
                 "--n-clusters", "4", "--n-init", "1", "--no-progress", "--out", km]) == 0
    return km


def _teacher_dump(tiny_corpus, tiny_teacher, km, label_dir, *extra):
    assert main(["dump", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--checkpoint", tiny_teacher,
                 "--layer", "1", "--km", km, "--label-dir", str(label_dir), "--no-progress"] + list(extra)) == 0
    with open(os.path.join(label_dir, "train.km")) as f:
        return [line.split() for line in f.read().splitlines()]


def test_dump_max_batch_seconds_and_max_chunk(tiny_corpus, tiny_teacher, teacher_km, tmp_path, monkeypatch,
                                              one_torch_thread):
    batches = []
    real = TeacherFeatureReader.features_torch

    def counting(self, wavs):
        batches.append(len(wavs))
        return real(self, wavs)

    monkeypatch.setattr(TeacherFeatureReader, "features_torch", counting)
    default = _teacher_dump(tiny_corpus, tiny_teacher, teacher_km, tmp_path / "default")
    sizes = tiny_corpus["sizes"]["train"]
    assert batches == [1] * len(sizes)  # on CPU, one utterance at a time unless told otherwise
    batches.clear()
    batched = _teacher_dump(tiny_corpus, tiny_teacher, teacher_km, tmp_path / "batches", "--max-batch-seconds", "50")
    assert len(batches) < len(sizes) and sum(batches) == len(sizes)  # the flag sets the batches
    batches.clear()
    one_by_one = _teacher_dump(tiny_corpus, tiny_teacher, teacher_km, tmp_path / "small_batches",
                               "--max-batch-seconds", "0.01")
    assert batches == [1] * len(sizes)
    assert one_by_one == default == batched  # and the labels do not depend on them
    assert [len(x) for x in default] == [num_frames(s, 50) for s in sizes]
    # --max-chunk: utterances longer than it are cut into independent chunks (as fairseq's
    # dump_hubert_feature max_chunk): each chunk loses its own edge frames
    chunk = 12000
    chunked = _teacher_dump(tiny_corpus, tiny_teacher, teacher_km, tmp_path / "chunked", "--max-chunk", str(chunk))
    want = [sum(num_frames(min(chunk, s - a), 50) for a in range(0, s, chunk)) for s in sizes]
    assert [len(x) for x in chunked] == want
    assert any(s > chunk for s in sizes) and want != [len(x) for x in default]


def test_merge_out_dir(tiny_corpus, tiny_teacher, teacher_km, tmp_path, one_torch_thread):
    shards = tmp_path / "shards"
    for rank in (0, 1):
        assert main(["dump", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--checkpoint", tiny_teacher,
                     "--layer", "1", "--km", teacher_km, "--label-dir", str(shards), "--nshard", "2", "--rank",
                     str(rank), "--no-progress"]) == 0
    out = tmp_path / "merged"
    assert main(["merge", "--label-dir", str(shards), "--split", "train", "--nshard", "2", "--name", "km",
                 "--manifest-dir", tiny_corpus["data"], "--out-dir", str(out)]) == 0
    assert (out / "train.km").is_file() and not (shards / "train.km").exists()
    whole = _teacher_dump(tiny_corpus, tiny_teacher, teacher_km, tmp_path / "whole")
    assert [line.split() for line in (out / "train.km").read_text().splitlines()] == whole
