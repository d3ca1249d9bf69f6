"""dicehubert-labels bad input: one clear line per problem, exit status 1, no traceback (unless --debug)."""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.labels.cli import main
from tests.helpers.data import write_corpus, write_random_labels

pytestmark = pytest.mark.usefixtures("one_openmp_thread")


@pytest.fixture(scope="module")
def mfcc_km(tiny_corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("km") / "km.joblib")
    assert main(["fit", "--manifest-dir", tiny_corpus["data"], "--mfcc", "--n-clusters", "5", "--out", path,
                 "--n-init", "2", "--no-progress"]) == 0
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if ": error: " in line]
    return code, errors, err


def corpus_with(tmp_path, bad_name, write_bad):
    """3 good utterances, then one bad file (row 4, line 5 of the manifest)."""
    d = str(tmp_path / "data")
    sizes = write_corpus(d, {"train": 3})
    path = os.path.join(d, "wav", bad_name)
    size = write_bad(path)
    with open(os.path.join(d, "train.tsv"), "a") as f:
        f.write(f"{bad_name}\t{size}\n")
    return d, sizes


def _corrupt(path):
    with open(path, "wb") as f:
        f.write(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    return 16000


def _rate_8k(path):
    sf.write(path, np.zeros(8000, np.float32), 8000, subtype="PCM_16")
    return 8000


def _stereo(path):
    sf.write(path, np.zeros((16000, 2), np.float32), 16000, subtype="PCM_16")
    return 16000


@pytest.mark.parametrize("writer,expected", [
    (_corrupt, "bad.wav is not readable audio"),
    (_rate_8k, "bad.wav has sample rate 8000 Hz, expected 16000 Hz"),
    (_stereo, "bad.wav has 2 channels, expected mono"),
])
@pytest.mark.parametrize("command", ["fit", "dump"])
def test_bad_audio_named_with_manifest_line(tmp_path, capsys, mfcc_km, writer, expected, command):
    data, _ = corpus_with(tmp_path, "bad.wav", writer)
    extra = (["--n-clusters", "3", "--out", str(tmp_path / "km.joblib")] if command == "fit"
             else ["--km", mfcc_km, "--label-dir", str(tmp_path / "lab")])
    code, errors, err = run(capsys, command, "--manifest-dir", data, "--split", "train", "--mfcc", *extra, "--no-progress")
    assert code == 1
    assert any("train.tsv:5: " in e and expected in e for e in errors), err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "km.joblib") and not os.path.exists(tmp_path / "lab" / "train.km")


@pytest.mark.parametrize("writer,expected", [
    (_corrupt, "train.tsv:5: cannot read audio"),
    (_rate_8k, "train.tsv:5: "),
    (_stereo, "has 2 channels, expected mono"),
])
def test_bad_audio_caught_while_reading_without_header_check(tmp_path, capsys, mfcc_km, writer, expected):
    data, _ = corpus_with(tmp_path, "bad.wav", writer)
    code, errors, err = run(capsys, "dump", "--manifest-dir", data, "--split", "train", "--mfcc", "--km", mfcc_km,
                            "--label-dir", str(tmp_path / "lab"), "--no-header-check", "--no-progress")
    assert code == 1 and len(errors) == 1 and expected in errors[0], err
    assert "bad.wav" in errors[0]


def test_checkpoint_not_hubert(tmp_path, capsys, tiny_corpus, tiny_teacher):
    ckpt = tmp_path / "w2v.pt"
    state = torch.load(tiny_teacher, weights_only=False)
    state["cfg"]["model"]["_name"] = "wav2vec2"  # a fairseq checkpoint of another model family
    torch.save(state, ckpt)
    code, errors, _ = run(capsys, "fit", "--manifest-dir", tiny_corpus["data"], "--checkpoint", str(ckpt), "--layer",
                          "1", "--n-clusters", "4", "--out", str(tmp_path / "km.joblib"))
    assert code == 1 and errors == [f"dicehubert-labels fit: error: {ckpt}: model 'wav2vec2' is not a HuBERT-family "
                                    f"model (expected one of ['hubert', 'dicehubert_student'])"]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    code, errors, _ = run(capsys, "fit", "--manifest-dir", tiny_corpus["data"], "--checkpoint", str(junk), "--layer",
                          "1", "--n-clusters", "4", "--out", str(tmp_path / "km.joblib"))
    assert code == 1 and len(errors) == 1 and "junk.pt: cannot be loaded safely as a fairseq checkpoint" in errors[0]


def test_layer_out_of_range(tmp_path, capsys, tiny_corpus, tiny_teacher):
    code, errors, _ = run(capsys, "fit", "--manifest-dir", tiny_corpus["data"], "--checkpoint", tiny_teacher,
                          "--layer", "5", "--n-clusters", "4", "--out", str(tmp_path / "km.joblib"))
    assert code == 1 and len(errors) == 1
    assert "layer 5 out of range (the model has transformer layers 1..2)" in errors[0]
    code, errors, _ = run(capsys, "fit", "--manifest-dir", tiny_corpus["data"], "--checkpoint", tiny_teacher,
                          "--n-clusters", "4", "--out", str(tmp_path / "km.joblib"))
    assert code == 1 and "--checkpoint needs --layer" in errors[0]


def test_k_larger_than_frames(tmp_path, capsys, tiny_corpus):
    code, errors, _ = run(capsys, "fit", "--manifest-dir", tiny_corpus["data"], "--mfcc", "--n-clusters", "100000",
                          "--percent", "0.25", "--out", str(tmp_path / "km.joblib"), "--no-progress")
    assert code == 1 and len(errors) == 1
    assert "train.tsv: K=100000 clusters but the 2 utterance(s) sampled (0.25 of 8) have only" in errors[0]
    assert "frames at 100 Hz" in errors[0]
    assert not os.path.exists(tmp_path / "km.joblib")


def test_manifest_root_missing(tmp_path, capsys, mfcc_km):
    (tmp_path / "train.tsv").write_text("/no/such/dir\na.wav\t16000\n")
    code, errors, _ = run(capsys, "dump", "--manifest-dir", str(tmp_path), "--split", "train", "--mfcc", "--km",
                          mfcc_km, "--label-dir", str(tmp_path / "lab"))
    assert code == 1 and errors == [f"dicehubert-labels dump: error: {tmp_path}/train.tsv:1: audio root directory "
                                    f"'/no/such/dir' does not exist"]
    code, errors, _ = run(capsys, "dump", "--manifest-dir", str(tmp_path), "--split", "nope", "--mfcc", "--km",
                          mfcc_km, "--label-dir", str(tmp_path / "lab"))
    assert code == 1 and "nope.tsv: manifest not found" in errors[0]


def test_shard_rank_out_of_range(tmp_path, capsys, tiny_corpus, mfcc_km):
    base = ["dump", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--mfcc", "--km", mfcc_km,
            "--label-dir", str(tmp_path / "lab")]
    code, errors, _ = run(capsys, *base, "--nshard", "2", "--rank", "2")
    assert code == 1 and errors == ["dicehubert-labels dump: error: --rank 2 out of range: ranks are 0-based, "
                                    "expected 0..1 for --nshard 2"]
    code, errors, _ = run(capsys, *base, "--nshard", "9", "--rank", "4")  # fairseq's range: [4, 4)
    assert code == 1 and "shard 4 of 9 would be empty (8 utterances)" in errors[0]


def test_km_model_problems(tmp_path, capsys, tiny_corpus, tiny_teacher, mfcc_km):
    base = ["dump", "--manifest-dir", tiny_corpus["data"], "--split", "valid", "--label-dir", str(tmp_path / "lab")]
    code, errors, _ = run(capsys, *base, "--mfcc", "--km", str(tmp_path / "missing.joblib"))
    assert code == 1 and "missing.joblib: k-means model not found" in errors[0]
    code, errors, _ = run(capsys, *base, "--checkpoint", tiny_teacher, "--layer", "1", "--km", mfcc_km)
    assert code == 1 and "centroids have dimension 39, but the features have 32" in errors[0]
    code, errors, _ = run(capsys, *base, "--mfcc", "--km", mfcc_km, "--soft", "--top-k", "6")
    assert code == 1 and "--top-k 6 is larger than the number of clusters K=5" in errors[0]


def test_merge_names_every_missing_shard(tmp_path, capsys):
    code, errors, _ = run(capsys, "merge", "--label-dir", str(tmp_path), "--split", "train", "--nshard", "2")
    assert code == 1 and len(errors) == 2
    assert "train_0_2.km: shard not found" in errors[0] and "train_1_2.km: shard not found" in errors[1]


def test_check_reports_every_problem(tmp_path, capsys):
    data = str(tmp_path / "data")
    sizes = write_corpus(data, {"train": 4})
    write_random_labels(data, sizes, n_clusters=5)
    lab = os.path.join(data, "train.km")
    lines = open(lab).read().splitlines()
    lines[0] = lines[0] + " 7"  # unknown symbol
    lines[1] = " ".join(lines[1].split()[:3])  # far too short
    open(lab, "w").write("\n".join(lines[:3]) + "\n")  # and one line missing
    os.remove(os.path.join(data, "wav", "train_0003.wav"))
    code = main(["check", "--manifest-dir", data, "--labels", "km"])
    err = capsys.readouterr().err
    assert code == 1
    assert "train.tsv:5: audio file" in err and "train_0003.wav not found" in err
    assert "train.km:1: label(s) ['7'] not in" in err
    assert "train.km:2: 3 labels for train_0001.wav" in err
    assert "train.km: 3 lines, but" in err and "lists 4 utterances" in err
    assert "check: 4 problem(s) in train" in err


def test_check_ok(capsys, tiny_corpus):
    assert main(["check", "--manifest-dir", tiny_corpus["data"], "--label-dir", tiny_corpus["labels"],
                 "--labels", "km"]) == 0
    assert capsys.readouterr().out.startswith("OK: train, valid x labels km")


def test_debug_shows_the_exception(tmp_path, tiny_corpus, mfcc_km):
    with pytest.raises(InputError, match="out of range"):
        main(["dump", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--mfcc", "--km", mfcc_km,
              "--label-dir", str(tmp_path), "--nshard", "2", "--rank", "-1", "--debug"])


def test_bad_audio_in_a_shard_names_the_real_manifest_line(tmp_path, capsys, mfcc_km):
    data, _ = corpus_with(tmp_path, "bad.wav", _stereo)  # rows 0..3, the bad file is row 3 (line 5)
    base = ["dump", "--manifest-dir", data, "--split", "train", "--mfcc", "--km", mfcc_km,
            "--label-dir", str(tmp_path / "lab"), "--nshard", "2", "--no-progress"]
    code, errors, err = run(capsys, *base, "--rank", "1")  # rows [2, 4)
    assert code == 1 and any("train.tsv:5: " in e and "bad.wav has 2 channels" in e for e in errors), err
    assert run(capsys, *base, "--rank", "0")[0] == 0  # rows [0, 2) are fine


def test_check_options(flawed, capsys):
    """``check --no-audio-headers`` skips the header check, ``--tolerance`` widens the label length check."""
    w = flawed
    base = ["check", "--manifest-dir", w["data"], "--label-dir", w["labels"], "--split", "train"]
    code, _, err = run(capsys, *base)
    assert code == 1 and "8000 Hz" in err and f"{w['km']}:4:" in err
    code, _, err = run(capsys, *base, "--no-audio-headers")
    assert code == 1 and "8000" not in err and f"{w['km']}:4:" in err
    code, _, err = run(capsys, *base, "--tolerance", "0.3")
    assert code == 1 and "8000 Hz" in err and f"{w['km']}:4:" not in err
    code, _, err = run(capsys, *base, "--no-audio-headers", "--tolerance", "0.3")
    assert code == 0, err
