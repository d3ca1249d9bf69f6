"""``dicehubert-labels run`` (labels/onepass.py): fit + dump in one process, the same files as
``fit`` then ``dump``, the k-means sample's features computed once where memory allows."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import pytest

from dicehubert_fairseq.feature_cache import FeatureCache
from dicehubert_fairseq.labels import features as features_module
from dicehubert_fairseq.labels.cli import build_parser, main
from dicehubert_fairseq.labels.config import FeatureConfig, max_batch_samples
from dicehubert_fairseq.labels.features import FeatureSource
from dicehubert_fairseq.labels.fit import load_kmeans
from dicehubert_fairseq.labels.mfcc import MfccFeatureReader
from dicehubert_fairseq.labels.teacher import TeacherFeatureReader
from tests.helpers.runs import subprocess_env

pytestmark = pytest.mark.usefixtures("one_openmp_thread", "one_torch_thread")

K = "5"


def _files(directory):
    """{name: bytes} of a label directory; the soft sidecar as a dict without its ``km`` path."""
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
        if name.endswith(".json"):
            meta = json.loads(out[name])
            meta.pop("km")
            out[name] = meta
    return out


@pytest.fixture
def computed(monkeypatch):
    """Utterances whose teacher features were computed (not taken from a cache), in order."""
    sizes = []
    real = TeacherFeatureReader.features_torch

    def counting(self, wavs):
        sizes.extend(len(w) for w in wavs)
        return real(self, wavs)

    monkeypatch.setattr(TeacherFeatureReader, "features_torch", counting)
    return sizes


def _both(tiny_corpus, tiny_teacher, tmp_path, computed, fit_opts, dump_opts=(), features=None):
    """``fit`` + ``dump``, then ``run``, with the same options; returns (files, models, computed counts)."""
    src = ["--manifest-dir", tiny_corpus["data"], "--split", "train", "--no-progress"]
    src += features or ["--checkpoint", tiny_teacher, "--layer", "2"]
    fit = ["--n-clusters", K, "--n-init", "2", *fit_opts]
    a, b = tmp_path / "fit_dump", tmp_path / "run"
    assert main(["fit", *src, *fit, "--out", str(a / "km.joblib")]) == 0
    assert main(["dump", *src, *dump_opts, "--km", str(a / "km.joblib"), "--label-dir", str(a / "labels")]) == 0
    n_fit_dump = len(computed)
    computed.clear()
    assert main(["run", *src, *fit, *dump_opts, "--out", str(b / "km.joblib"), "--label-dir", str(b / "labels")]) == 0
    return _files(a / "labels"), _files(b / "labels"), (a / "km.joblib", b / "km.joblib"), n_fit_dump, len(computed)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_run_writes_what_fit_then_dump_write_computing_the_sample_once(tiny_corpus, tiny_teacher, tmp_path, computed,
                                                                      capsys, soft):
    """The sample (4 of 8 utterances) fits the pool: run computes every utterance once, fit + dump
    computes the sample twice; same model file, same label bytes."""
    dump_opts = ["--soft", "--temperature", "3", "--top-k", "3"] if soft else []
    ours, theirs, (km_a, km_b), n_fit_dump, n_run = _both(tiny_corpus, tiny_teacher, tmp_path, computed,
                                                          ["--percent", "0.5"], dump_opts)
    assert ours == theirs and set(ours) >= {"train.km", "dict.km.txt"}
    assert soft == ("train.km.soft_probs.npy" in ours)
    assert km_a.read_bytes() == km_b.read_bytes()
    n = len(tiny_corpus["sizes"]["train"])
    assert (n_fit_dump, n_run) == (n + n // 2, n)
    m = re.search(r"reused the features of (\d+) sampled utterances \((\d+) frames kept, at most 30000\): "
                  r"(\d+) frames not computed again", capsys.readouterr().out)
    assert m and int(m.group(1)) == n // 2 and m.group(2) == m.group(3)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_run_past_the_pool_reuses_what_the_pool_holds(tiny_corpus, tiny_teacher, tmp_path, computed, capsys, soft):
    """Every utterance sampled, a pool of 200 frames for ~700: the fit makes two passes; run keeps
    C utterances (<= 200 frames) and computes the others in both passes and for the labels:
    3N - 2C computations against fit + dump's 3N, the same files."""
    dump_opts = ["--soft", "--top-k", "2"] if soft else []
    ours, theirs, (km_a, km_b), n_fit_dump, n_run = _both(
        tiny_corpus, tiny_teacher, tmp_path, computed, ["--percent", "1", "--pool-size", "200", "--batch-size", "100"],
        dump_opts)
    assert ours == theirs
    assert km_a.read_bytes() == km_b.read_bytes()
    _, meta = load_kmeans(km_b)
    assert meta["passes"] == 2 and meta["frames"] > 3 * 200
    out = capsys.readouterr().out
    m = re.search(r"reused the features of (\d+) sampled utterances \((\d+) frames kept, at most 200\): "
                  r"(\d+) frames not computed again", out)
    assert m, out
    cached = int(m.group(1))
    n = len(tiny_corpus["sizes"]["train"])
    # each kept utterance served twice: in the fit's second pass and for the labels
    assert cached >= 1 and int(m.group(2)) <= 200 and int(m.group(3)) == 2 * int(m.group(2))
    assert (n_fit_dump, n_run) == (3 * n, 3 * n - 2 * cached)


def test_run_with_batches_recomputes_the_sample_and_writes_the_same(tiny_corpus, tiny_teacher, tmp_path, computed,
                                                                    capsys):
    """Batched features depend on their batch mates in the last bits: nothing is reused, and the
    soft labels are still the bytes of fit + dump."""
    dump_opts = ["--soft", "--top-k", "3", "--max-batch-seconds", "50"]
    ours, theirs, _, n_fit_dump, n_run = _both(tiny_corpus, tiny_teacher, tmp_path, computed,
                                               ["--percent", "0.5", "--max-batch-seconds", "50"], dump_opts)
    assert ours == theirs
    assert n_run == n_fit_dump > len(tiny_corpus["sizes"]["train"]) and "computed again" in capsys.readouterr().out


def test_run_normalized_mode_and_gap_temperature(tiny_corpus, tiny_teacher, tmp_path, computed):
    """fit --normalize stores the mode, run's labels follow it; --temperature-gap reads the gap run's
    fit just stored: the files of fit --normalize + dump --soft --temperature-gap."""
    ours, theirs, (km_a, km_b), n_fit_dump, n_run = _both(
        tiny_corpus, tiny_teacher, tmp_path, computed, ["--percent", "0.5", "--normalize"],
        ["--soft", "--temperature-gap", "1", "--top-k", "3"])
    assert ours == theirs and "train.km.soft_probs.npy" in ours
    assert km_a.read_bytes() == km_b.read_bytes()
    meta = load_kmeans(km_b)[1]
    assert meta["normalize"] is True
    side = next(v for k, v in ours.items() if k.endswith(".json"))
    assert side["normalize"] is True and side["temperature_gap"] == 1.0
    assert side["temperature"] == pytest.approx(meta["distances"]["gap"]["p50"])
    assert n_run < n_fit_dump


def test_run_concatenated_layers(tiny_corpus, tiny_teacher, tmp_path, computed):
    ours, theirs, (km_a, km_b), n_fit_dump, n_run = _both(
        tiny_corpus, tiny_teacher, tmp_path, computed, ["--percent", "0.5"],
        features=["--checkpoint", tiny_teacher, "--layer", "2,1"])
    assert ours == theirs and km_a.read_bytes() == km_b.read_bytes()
    meta = load_kmeans(km_b)[1]
    assert meta["features"]["layer"] == [2, 1] and load_kmeans(km_b)[0].cluster_centers_.shape[1] == \
        meta["features"]["dim"] == 2 * TeacherFeatureReader(tiny_teacher, 2).dim
    assert n_run < n_fit_dump


def test_run_mfcc(tiny_corpus, tmp_path, computed):
    ours, theirs, (km_a, km_b), _, _ = _both(tiny_corpus, None, tmp_path, computed, ["--percent", "0.5"],
                                             features=["--mfcc"])
    assert ours == theirs and km_a.read_bytes() == km_b.read_bytes()


def test_rerun_skips_a_finished_fit_and_refits_on_other_settings(tiny_corpus, tiny_teacher, tmp_path, computed,
                                                                 capsys):
    argv = ["run", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--checkpoint", tiny_teacher,
            "--layer", "2", "--n-clusters", K, "--n-init", "2", "--percent", "0.5", "--out", str(tmp_path / "km.joblib"),
            "--label-dir", str(tmp_path / "labels"), "--no-progress"]
    assert main(argv) == 0
    first = _files(tmp_path / "labels")
    computed.clear()
    assert main(argv) == 0
    assert "already fitted with these inputs and settings" in capsys.readouterr().out
    assert len(computed) == len(tiny_corpus["sizes"]["train"])  # the dump ran again (its outputs were final)
    assert _files(tmp_path / "labels") == first
    assert main(argv[:-1] + ["--seed", "1", "--no-progress"]) == 0
    assert "already fitted" not in capsys.readouterr().out
    assert load_kmeans(tmp_path / "km.joblib")[1]["seed"] == 1


def test_run_checks_options_before_loading_the_teacher(tiny_corpus, tmp_path, capsys):
    base = ["run", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--checkpoint", str(tmp_path / "nope.pt"),
            "--layer", "2", "--out", str(tmp_path / "km.joblib"), "--label-dir", str(tmp_path / "labels")]
    assert main(base + ["--n-clusters", "4", "--soft", "--top-k", "5"]) == 1
    assert "--top-k 5 is larger than the number of clusters K=4" in capsys.readouterr().err
    assert main(base + ["--n-clusters", "4", "--percent", "2"]) == 1
    assert "--percent is a fraction" in capsys.readouterr().err
    for option in (["--nshard", "2"], ["--rank", "1"], ["--km", "x"]):  # one process, its own model
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + ["--n-clusters", "4", *option])
    capsys.readouterr()


SLOW_RUN = """
import sys, time
from dicehubert_fairseq.labels import cli, dump
write = dump.write_block
def slow(*args, **kwargs):  # a slow machine: every block of labels takes two seconds more
    write(*args, **kwargs)
    time.sleep(2.0)
dump.write_block = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.e2e
def test_sigkilled_run_resumes_to_the_same_files(tiny_corpus, tiny_teacher, tmp_path):
    """SIGKILL once the first block of labels is written: no final label file exists; the same
    command again finds the model fitted, resumes from the finished blocks and writes the bytes of
    an uninterrupted fit + dump (soft labels, blocks of 2 utterances)."""
    src = ["--manifest-dir", tiny_corpus["data"], "--split", "train", "--checkpoint", tiny_teacher, "--layer", "2",
           "--threads", "1", "--no-progress"]
    opts = ["--n-clusters", K, "--n-init", "2", "--percent", "0.5", "--block-size", "2"]
    soft = ["--soft", "--top-k", "3"]
    whole = tmp_path / "whole"
    assert main(["fit", *src, *opts, "--out", str(whole / "km.joblib")]) == 0
    assert main(["dump", *src, *soft, "--block-size", "2", "--km", str(whole / "km.joblib"),
                 "--label-dir", str(whole / "labels")]) == 0

    slow = tmp_path / "slow_run.py"
    slow.write_text(SLOW_RUN)
    out = tmp_path / "run"
    argv = ["run", *src, *opts, *soft, "--out", str(out / "km.joblib"), "--label-dir", str(out / "labels")]
    victim = subprocess.Popen([sys.executable, str(slow), *argv], env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    parts, deadline = out / "labels" / "train.km.parts", time.time() + 300
    finished = re.compile(r"block_\d+\.npz$")
    while not (parts.is_dir() and any(finished.match(f) for f in os.listdir(parts))):
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[0][-3000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert (out / "km.joblib").is_file() and not (out / "labels" / "train.km").exists()

    rerun = subprocess.run([sys.executable, "-m", "dicehubert_fairseq.labels", *argv], env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already fitted with these inputs and settings" in rerun.stdout
    m = re.search(r"resumed: (\d+) of (\d+) blocks were done", rerun.stdout)
    assert m and 1 <= int(m.group(1)) < int(m.group(2)), rerun.stdout
    assert _files(out / "labels") == _files(whole / "labels")
    assert (out / "km.joblib").read_bytes() == (whole / "km.joblib").read_bytes()


# ----------------------------------------------------------------------------- the pieces


def test_feature_cache_keeps_whole_utterances_up_to_its_capacity():
    cache = FeatureCache(10, 2)
    a, b, c = (np.full((n, 2), n, dtype=np.float32) for n in (6, 5, 4))
    assert cache.add(0, a) and not cache.add(1, b) and cache.add(2, c)  # 6 + 5 > 10; 6 + 4 fits
    assert cache.frames == 10 and 0 in cache and 1 not in cache and len(cache) == 2
    a[:] = -1  # a copy was kept
    np.testing.assert_array_equal(cache.get(0).numpy(), np.full((6, 2), 6))
    assert (cache.served_frames, cache.served_rows) == (6, 1)
    assert cache.lengths.tolist() == [6, 4] and cache.offsets.tolist() == [0, 6, 10]
    cache.freeze()
    assert not FeatureCache(10, 2).add(0, np.zeros((11, 2), np.float32))
    assert not cache.add(3, np.zeros((0, 2), np.float32)) and 3 not in cache


def test_source_serves_cached_rows_in_the_same_order(tiny_corpus, monkeypatch):
    from dicehubert_fairseq.data.files import read_manifest

    manifest = read_manifest(os.path.join(tiny_corpus["data"], "train.tsv"))
    reader = MfccFeatureReader()
    rows = [5, 1, 3, 0]
    plain = list(FeatureSource(manifest, reader, 16000).read(rows))
    cache = FeatureCache(10 ** 6, reader.dim)
    cached = FeatureSource(manifest, reader, 16000, cache)
    first = list(cached.read(rows))
    assert len(cache) == 4 and cache.served_rows == 0
    read = []
    real = features_module.read_audio
    monkeypatch.setattr(features_module, "read_audio", lambda m, r, sr: read.append(r) or real(m, r, sr))
    second = list(cached.read(rows))
    assert read == [] and cache.served_rows == 4
    for x, y, z in zip(plain, first, second):
        assert x[0] == y[0] == z[0]
        np.testing.assert_array_equal(x[1], z[1])


def test_cache_refused_for_batched_teacher_features(tiny_corpus, tiny_teacher):
    from dicehubert_fairseq.data.files import read_manifest

    manifest = read_manifest(os.path.join(tiny_corpus["data"], "train.tsv"))
    reader = TeacherFeatureReader(tiny_teacher, 1)
    with pytest.raises(ValueError, match="one utterance at a time"):
        FeatureSource(manifest, reader, 16000 * 50, FeatureCache(100, reader.dim))
    assert next(FeatureSource(manifest, reader, 0, FeatureCache(100, reader.dim)).read([0, 1]))[0] in (0, 1)


def test_max_batch_seconds_default_is_one_utterance_on_cpu(tiny_teacher):
    reader = TeacherFeatureReader(tiny_teacher, 1)
    assert max_batch_samples(FeatureConfig(checkpoint=tiny_teacher, layer=1), reader) == 0
    assert max_batch_samples(FeatureConfig(checkpoint=tiny_teacher, layer=1, max_batch_seconds=2.5), reader) == 40000

    class OnCuda:
        device, sample_rate = __import__("torch").device("cuda"), 16000

    assert max_batch_samples(FeatureConfig(), OnCuda()) == 50 * 16000


def test_feature_cache_select_and_to_for_the_probe():
    """The probe's use: every utterance added in order (key = position), several states per frame."""
    cache = FeatureCache(5, 2, states=3)
    a, b = torch.arange(12.0).view(3, 2, 2), -torch.arange(18.0).view(3, 3, 2)
    assert cache.add(0, a) and cache.add(1, b) and cache.feats.shape == (3, 5, 2)
    some = cache.select([1, 0])
    assert some.offsets.tolist() == [0, 3, 5] and some.frame_index([1]).tolist() == [3, 4]
    torch.testing.assert_close(some.feats, torch.cat([b, a], 1), rtol=0, atol=0)
    torch.testing.assert_close(cache.to("cpu").get(1), b, rtol=0, atol=0)
