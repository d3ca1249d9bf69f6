"""dicehubert-probe: PER maths, CTC decoding, all-layer features, the probe learning tones, the CLI."""

import json
import logging
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.probe.cli import main
from dicehubert_fairseq.probe.probe import (
    UNK_ID,
    ProbeConfig,
    ctc_feasible,
    ctc_greedy_decode,
    edit_distance,
    extract_hidden_states,
    extract_split,
    phone_error_rate,
    read_audio,
    run_probe,
)
from dicehubert_fairseq.probe.synthetic import write_tone_corpus
from dicehubert_fairseq.testing import write_checkpoint, write_random_labels

JSON_KEYS = {"per", "valid_per", "layer_weights", "epochs", "best_epoch", "checkpoint", "num_phones", "phones",
             "num_layers", "utterances", "frames", "unseen_phones", "history", "seconds", "config"}
FAST = ["--epochs", "2", "--max-train-utterances", "8", "--threads", "1", "-q"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two OpenMP threads on two shared cores were measured 10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_process_state():
    """main() configures logging and torch threads, as a CLI does; undo it for the other tests."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    fairseq_level = logging.getLogger("fairseq").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("fairseq").setLevel(fairseq_level)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """Tone corpus (60/15/15 utterances, 4 tones) and a random tiny hubert checkpoint (2 x 32)."""
    root = tmp_path_factory.mktemp("tones")
    data = str(root / "data")
    write_tone_corpus(data, splits={"train": 60, "valid": 15, "test": 15}, seed=0)
    sizes = {s: read_manifest(os.path.join(data, f"{s}.tsv")).sizes for s in ("train", "valid")}
    write_random_labels(str(root / "labels"), sizes)
    ckpt = str(root / "hubert.pt")
    write_checkpoint(ckpt, data, str(root / "labels"), seed=0)
    return {"data": data, "labels": str(root / "labels"), "ckpt": ckpt, "root": root}


def copy_data(tones, tmp_path):
    """A private copy of the tone corpus's manifests and transcripts (the wavs are shared)."""
    d = str(tmp_path / "data")
    os.makedirs(d)
    for name in os.listdir(tones["data"]):
        if name.endswith((".tsv", ".phn")):
            shutil.copy(os.path.join(tones["data"], name), d)
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err, [line for line in err.splitlines() if ": error: " in line]


# --------------------------------------------------------------------------------------------- maths


@pytest.mark.parametrize("ref,hyp,expected", [
    ("kitten", "sitting", 3),             # 2 substitutions + 1 insertion
    ([1, 2, 3], [1, 2, 3], 0),
    ([], [1, 2], 2),                      # 2 insertions
    ([1, 2], [], 2),                      # 2 deletions
    ([1, 2, 3], [3, 2, 1], 2),            # 2 substitutions
    ([1, 2, 3, 4], [1, 3, 4, 5], 2),      # delete 2, insert 5
    ([5, 5, 5], [5], 2),
])
def test_edit_distance_hand_computed(ref, hyp, expected):
    assert edit_distance(ref, hyp) == expected
    assert edit_distance(hyp, ref) == expected


def test_phone_error_rate_is_corpus_level():
    # (1 deletion) + (1 insertion) over 4 + 2 reference phones
    assert phone_error_rate([[1, 2, 3, 4], [5, 6]], [[1, 3, 4], [5, 6, 7]]) == pytest.approx(2 / 6)
    assert phone_error_rate([[1, 2]], [[1, 2]]) == 0.0
    assert phone_error_rate([[1, 2]], [[]]) == 1.0
    assert phone_error_rate([[1]], [[2, 3, 4]]) == 3.0  # insertions can push PER above 1
    # a phone unseen in training (UNK_ID) can never be produced: always an error
    assert phone_error_rate([[1, UNK_ID, 2]], [[1, 2]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no phones"):
        phone_error_rate([[], []], [[1], []])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        phone_error_rate([[1], [2]], [[1]])


@pytest.mark.parametrize("frames,expected", [
    ([0, 3, 3, 0, 3, 5, 5], [3, 3, 5]),   # a blank separates a repeated phone; repeats collapse
    ([1, 1, 1], [1]),
    ([0, 0, 0], []),
    ([], []),
    ([2, 0, 0, 2, 2, 1, 0, 1], [2, 2, 1, 1]),
])
def test_ctc_greedy_decode_collapses_then_drops_blanks(frames, expected):
    assert ctc_greedy_decode(frames) == expected
    assert ctc_greedy_decode(torch.tensor(frames, dtype=torch.long)) == expected
    assert ctc_greedy_decode(np.asarray(frames, dtype=np.int64)) == expected


def test_ctc_feasible_counts_blanks_between_repeats():
    assert ctc_feasible(3, [1, 2, 3])
    assert not ctc_feasible(3, [1, 1, 2])   # needs 1 0 1 2
    assert ctc_feasible(4, [1, 1, 2])
    assert ctc_feasible(0, [])


# --------------------------------------------------------------------------------------------- features


def test_hidden_states_equal_fairseq_per_layer_features(tones):
    from dicehubert_fairseq.checkpoint import load_model

    model, _ = load_model(tones["ckpt"])
    wav = read_audio(read_manifest(os.path.join(tones["data"], "valid.tsv")).audio_path(0))
    states = extract_hidden_states(model, wav)
    n_layers = len(model.encoder.layers)
    assert states.shape[0] == n_layers + 1 and states.shape[2] == 32
    with torch.no_grad():
        proj, _ = model.extract_features(wav[None], None, mask=False, ret_conv=True)
        torch.testing.assert_close(states[0], proj[0], rtol=0, atol=0)
        for layer in range(1, n_layers + 1):
            x, _ = model.extract_features(wav[None], None, mask=False, output_layer=layer)
            torch.testing.assert_close(states[layer], x[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- the probe


def test_probe_learns_tones_and_writes_json(tones, tmp_path, capsys):
    """A random 2-layer upstream still carries part of a tone's identity (measured: seeds 0-5 gave
    test PER 0.46-0.53 with these settings, 0.71-0.90 with shuffled training transcripts); the
    thresholds leave a margin of about 0.15 either way."""
    out = tmp_path / "out" / "probe.json"
    code, stdout, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", tones["data"], "--json", out,
                                    "--epochs", "60", "--batch-size", "4", "--threads", "1")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert os.listdir(out.parent) == ["probe.json"]  # written atomically: no temporary left behind
    assert JSON_KEYS <= set(result)
    assert f"PER {result['per']:.4f}" in stdout
    assert result["per"] < 0.65, result["per"]
    assert result["num_phones"] == 4 and result["phones"] == ["a", "b", "c", "d"]
    assert len(result["layer_weights"]) == result["num_layers"] == 2 + 1
    assert sum(result["layer_weights"]) == pytest.approx(1.0, abs=1e-6)
    assert all(w > 0 for w in result["layer_weights"])
    assert result["utterances"] == {"train": 60, "valid": 15, "test": 15}
    assert 1 <= result["best_epoch"] <= result["epochs"] <= 60
    assert result["valid_per"] == min(h["valid_per"] for h in result["history"])
    assert result["checkpoint"] == os.path.abspath(tones["ckpt"])

    # control: the same probe on transcripts shuffled across training utterances learns only the
    # phone statistics, not the audio
    shuffled = copy_data(tones, tmp_path)
    with open(os.path.join(shuffled, "train.phn")) as f:
        lines = f.read().splitlines()
    random.Random(0).shuffle(lines)
    with open(os.path.join(shuffled, "train.phn"), "w") as f:
        f.write("\n".join(lines) + "\n")
    control = run_probe(tones["ckpt"], shuffled, cfg=ProbeConfig(epochs=60, batch_size=4))
    assert control["per"] > result["per"] + 0.1, (control["per"], result["per"])


def test_probe_is_deterministic(tones):
    cfg = ProbeConfig(epochs=3, max_train_utterances=12)
    a, b = (run_probe(tones["ckpt"], tones["data"], cfg=cfg) for _ in range(2))
    for r in (a, b):
        r.pop("seconds")
    assert a == b


def test_probe_on_dicehubert_student_has_one_weight_per_hidden_state(tones, tmp_path):
    ckpt = str(tmp_path / "student.pt")
    write_checkpoint(ckpt, tones["data"], tones["labels"], model="dicehubert_student", task="dicehubert",
                     model_overrides={"encoder_layers": 3})
    result = run_probe(ckpt, tones["data"], cfg=ProbeConfig(epochs=1, max_train_utterances=8))
    assert len(result["layer_weights"]) == result["num_layers"] == 3 + 1
    assert sum(result["layer_weights"]) == pytest.approx(1.0, abs=1e-6)


def test_probe_of_chosen_layers_caches_and_weighs_only_them(tones, capsys):
    """``--layers``: the cache holds exactly the chosen hidden states, in the order given, and the
    probe weighs only them (one index: that layer alone)."""
    from dicehubert_fairseq.checkpoint import load_model

    model, _ = load_model(tones["ckpt"], "cpu")
    manifest = read_manifest(os.path.join(tones["data"], "valid.tsv"))
    full = extract_split(model, manifest, limit=3)
    some = extract_split(model, manifest, limit=3, layers=[2, 0])
    assert some.feats.shape == (2,) + full.feats.shape[1:]
    torch.testing.assert_close(some.feats, full.feats[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(some.offsets, full.offsets)

    code, stdout, err, _ = run(capsys, "--checkpoint", tones["ckpt"], "--data", tones["data"], "--layers", "1",
                               "--json", os.path.join(tones["root"], "layer1.json"), *FAST)
    assert code == 0, err
    with open(os.path.join(tones["root"], "layer1.json")) as f:
        one = json.load(f)
    assert one["layers"] == [1] and one["layer_weights"] == [1.0] and one["num_layers"] == 1
    assert "layer weights [1:1.000]" in stdout
    both = run_probe(tones["ckpt"], tones["data"], cfg=ProbeConfig(epochs=2, max_train_utterances=8, layers=[0, 2]))
    assert both["layers"] == [0, 2] and len(both["layer_weights"]) == 2
    assert run_probe(tones["ckpt"], tones["data"], cfg=ProbeConfig(epochs=2, max_train_utterances=8))["layers"] \
        == [0, 1, 2]


def test_probe_layer_out_of_range_is_one_line_error(tones, capsys):
    code, _, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", tones["data"], "--layers", "0,3",
                               *FAST)
    assert code == 1 and "Traceback" not in err
    assert errors == [f"dicehubert-probe: error: {tones['ckpt']}: layers [0, 3]: expected distinct hidden-state "
                      f"indices in 0..2 (0 = transformer input, k = layer k; the model has 2 layers)"], err


# --------------------------------------------------------------------------------------------- bad input


def _missing_phn(d):
    os.remove(os.path.join(d, "valid.phn"))
    return "valid.phn: phone transcripts not found"


def _short_phn(d):
    path = os.path.join(d, "test.phn")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:-2])
    return "test.phn: 13 lines, but"


def _long_phn(d):
    with open(os.path.join(d, "train.phn"), "a") as f:
        f.write("a b\n")
    return "train.phn: 61 lines, but"


def _empty_split(d):
    path = os.path.join(d, "valid.tsv")
    with open(path) as f:
        root = f.readline()
    with open(path, "w") as f:
        f.write(root)
    return "valid.tsv: manifest lists no audio"


def _empty_line(d):
    path = os.path.join(d, "test.phn")
    with open(path) as f:
        lines = f.readlines()
    lines[4] = "\n"
    with open(path, "w") as f:
        f.writelines(lines)
    return "test.phn:5: empty transcript"


def _missing_manifest(d):
    os.remove(os.path.join(d, "test.tsv"))
    return "test.tsv: manifest not found"


def _missing_audio(d):
    path = os.path.join(d, "valid.tsv")
    with open(path) as f:
        lines = f.readlines()
    lines[3] = "nowhere.wav\t16000\n"
    with open(path, "w") as f:
        f.writelines(lines)
    return "valid.tsv:4: audio file"


@pytest.mark.parametrize("corrupt", [_missing_phn, _short_phn, _long_phn, _empty_split, _empty_line,
                                     _missing_manifest, _missing_audio])
def test_bad_data_one_line_error_exit_1(tones, tmp_path, capsys, corrupt):
    d = copy_data(tones, tmp_path)
    expected = corrupt(d)
    out = tmp_path / "out.json"
    code, _, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", d, "--json", out, *FAST)
    assert code == 1
    assert any(expected in e for e in errors), err
    assert all(e.startswith("dicehubert-probe: error: ") for e in errors)
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_data_raises_with_debug(tones, tmp_path):
    d = copy_data(tones, tmp_path)
    _missing_phn(d)
    with pytest.raises(InputError, match="valid.phn: phone transcripts not found"):
        main(["--checkpoint", tones["ckpt"], "--data", d, "--debug", *FAST])


def _add_unseen_phone(d):
    path = os.path.join(d, "test.phn")
    with open(path) as f:
        lines = f.readlines()
    lines[6] = lines[6].rstrip("\n") + " zz\n"
    with open(path, "w") as f:
        f.writelines(lines)


def test_unseen_phone_is_an_error_when_asked(tones, tmp_path, capsys):
    d = copy_data(tones, tmp_path)
    _add_unseen_phone(d)
    code, _, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", d, "--unseen-phones", "error", *FAST)
    assert code == 1
    assert any("test.phn:7: phone 'zz' does not occur in the training transcripts" in e for e in errors), err
    assert "Traceback" not in err


def test_unseen_phone_scored_as_unk_by_default(tones, tmp_path, capsys):
    d = copy_data(tones, tmp_path)
    _add_unseen_phone(d)
    out = tmp_path / "out.json"
    code, _, err, _ = run(capsys, "--checkpoint", tones["ckpt"], "--data", d, "--json", out, *FAST)
    assert code == 0, err
    assert "test.phn:7: phone 'zz' does not occur in the training transcripts" in err  # a warning
    result = json.loads(out.read_text())
    assert result["unseen_phones"] == {"valid": {}, "test": {"zz": 1}}
    assert "zz" not in result["phones"]


def test_transcript_too_long_for_ctc_is_warned_with_its_line(tones, tmp_path, capsys):
    d = copy_data(tones, tmp_path)
    path = os.path.join(d, "train.phn")
    with open(path) as f:
        lines = f.readlines()
    lines[2] = " ".join(["a", "b"] * 300) + "\n"  # 600 phones for a second or two of audio (50 Hz)
    with open(path, "w") as f:
        f.writelines(lines)
    code, _, err, _ = run(capsys, "--checkpoint", tones["ckpt"], "--data", d, *FAST)
    assert code == 0, err
    assert "train.phn:3: 600 phones for train_0002.wav, more than CTC can align" in err


@pytest.mark.parametrize("write,expected", [
    (None, "checkpoint not found"),
    (lambda p: open(p, "wb").write(b"not a checkpoint"), "checkpoint"),
])
def test_bad_checkpoint_one_line_error(tones, tmp_path, capsys, write, expected):
    ckpt = str(tmp_path / "model.pt")
    if write:
        write(ckpt)
    code, _, err, errors = run(capsys, "--checkpoint", ckpt, "--data", tones["data"], *FAST)
    assert code == 1
    assert any(ckpt in e and expected in e for e in errors), err
    assert "Traceback" not in err


def test_cache_too_large_refused_before_extraction(tones, capsys):
    code, _, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", tones["data"],
                               "--max-cache-gb", "0.0001", *FAST)
    assert code == 1
    assert any("caches the hidden states of every utterance in memory" in e and "--max-cache-gb" in e
               for e in errors), err
    assert "Traceback" not in err


def test_bad_options_are_usage_errors(tones, capsys):
    for bad in (["--epochs", "0"], ["--lr", "-1"], ["--unseen-phones", "skip"], ["--layers", "1,a"],
                ["--layers", "-1"], ["--layers", "2,2"]):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", tones["ckpt"], "--data", tones["data"], *bad])
        assert e.value.code == 2
    capsys.readouterr()


def test_console_script_exit_status_and_message(tones, tmp_path):
    """The installed entry point (a separate process): bad input -> status 1, no traceback."""
    d = copy_data(tones, tmp_path)
    _short_phn(d)
    exe = shutil.which("dicehubert-probe") or os.path.join(os.path.dirname(sys.executable), "dicehubert-probe")
    proc = subprocess.run([exe, "--checkpoint", tones["ckpt"], "--data", d, *FAST],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"dicehubert-probe: error: {os.path.join(d, 'test.phn')}: 13 lines, but" in proc.stderr
    assert "Traceback" not in proc.stderr
