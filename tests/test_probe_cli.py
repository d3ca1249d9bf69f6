"""dicehubert-probe: it learns tones and writes its JSON; the test PER is the best-valid-epoch head's and
``--patience`` stops early; the split flags; bad data, checkpoints and options give one-line errors."""

import json
import os
import random

import pytest
import torch

from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.probe.cli import main
from dicehubert_fairseq.probe.run import ProbeConfig, run_probe
from tests.helpers.tones import copy_data, write_tone_corpus, write_tone_world

# main() configures logging and torch threads, as a CLI does: restore_process_state undoes it
pytestmark = pytest.mark.usefixtures("one_torch_thread", "restore_process_state")


JSON_KEYS = {"per", "valid_per", "layer_weights", "epochs", "best_epoch", "checkpoint", "num_phones", "phones",
             "num_layers", "layers", "utterances", "frames", "unseen_phones", "history", "seconds", "config"}


FAST = ["--epochs", "2", "--max-train-utterances", "8", "--threads", "1", "-q"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err, [line for line in err.splitlines() if ": error: " in line]


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
    # one history row per epoch run; the kept head is the first epoch with the lowest valid PER
    assert [h["epoch"] for h in result["history"]] == list(range(1, result["epochs"] + 1))
    assert result["epochs"] <= 60
    best = min(result["history"], key=lambda h: h["valid_per"])
    assert (result["best_epoch"], result["valid_per"]) == (best["epoch"], best["valid_per"])
    assert result["checkpoint"] == os.path.abspath(tones["ckpt"])

    # control: the same probe on transcripts shuffled across training utterances learns only the
    # phone statistics, not the audio
    shuffled = copy_data(tones["data"], str(tmp_path))
    with open(os.path.join(shuffled, "train.phn")) as f:
        lines = f.read().splitlines()
    random.Random(0).shuffle(lines)
    with open(os.path.join(shuffled, "train.phn"), "w") as f:
        f.write("\n".join(lines) + "\n")
    control = run_probe(tones["ckpt"], shuffled, cfg=ProbeConfig(epochs=60, batch_size=4))
    assert control["per"] > result["per"] + 0.1, (control["per"], result["per"])


@pytest.fixture(scope="module")
def noisy_tones(tmp_path_factory):
    """Tones (40/15/4 utterances) and a random tiny hubert on which, at ``--lr 0.1``, the valid PER
    goes up and down from epoch to epoch (its last epoch is not its best)."""
    return write_tone_world(str(tmp_path_factory.mktemp("noisy_tones") / "data"),
                            {"train": 40, "valid": 15, "test": 4}, seed=3)


def test_test_per_is_the_best_valid_epochs_and_patience_stops_early(noisy_tones, tmp_path, capsys):
    """Run with the valid split also as the test split, the reported test PER must be the lowest
    valid PER of the history, which a run whose last epoch is not its best tells apart from the
    last head's."""
    epochs = 25

    def probe(*extra):
        out = tmp_path / f"probe{len(list(tmp_path.iterdir()))}.json"
        code, _, err, _ = run(capsys, "--checkpoint", noisy_tones["ckpt"], "--data", noisy_tones["data"], "--json",
                              out, "--epochs", epochs, "--batch-size", 4, "--lr", 0.1, "--threads", 1, "-q",
                              "--valid-split", "valid", "--test-split", "valid", *extra)
        assert code == 0, err
        return json.loads(out.read_text())

    full = probe("--patience", 0)
    history = [h["valid_per"] for h in full["history"]]
    assert full["epochs"] == len(history) == epochs  # patience 0: every epoch
    best = min(history)
    assert history[-1] > best + 0.01, history  # the precondition: the last epoch is not the best
    assert full["best_epoch"] == history.index(best) + 1
    # test split == valid split: the test PER is the best epoch's valid PER, not the last epoch's
    assert full["per"] == pytest.approx(best, abs=1e-12)
    assert full["valid_per"] == best

    patience = 3
    early = probe("--patience", patience)
    assert early["history"] == full["history"][: early["epochs"]]  # same seed: the same epochs so far
    assert early["epochs"] < epochs, "the test needs a run that stops early"
    # stopped after `patience` epochs without a better valid PER (counted once it is below 1)
    assert early["epochs"] == early["best_epoch"] + patience
    tail = [h["valid_per"] for h in early["history"][early["best_epoch"]:]]
    assert len(tail) == patience and all(v >= early["valid_per"] for v in tail)
    assert early["per"] == pytest.approx(early["valid_per"], abs=1e-12)


def test_split_flags(tmp_path, tiny_teacher, capsys):
    """``--train-split/--valid-split/--test-split`` name the splits read; without them the default
    names are looked for."""
    data = str(tmp_path / "tones")
    write_tone_corpus(data, splits={"tr": 12, "dev": 5, "ev": 3}, seed=4)
    out = tmp_path / "probe.json"
    opts = ["--checkpoint", tiny_teacher, "--data", data, "--epochs", 1, "--threads", 1, "-q"]
    code, stdout, err, _ = run(capsys, *opts, "--train-split", "tr", "--valid-split", "dev", "--test-split", "ev",
                               "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["splits"] == {"train": "tr", "valid": "dev", "test": "ev"}
    assert result["utterances"] == {"train": 12, "valid": 5, "test": 3}
    assert "on ev (3 utterances" in stdout
    code, _, err, _ = run(capsys, *opts)
    assert code == 1 and os.path.join(data, "train.tsv") in err


def _missing_phn(d):
    os.remove(os.path.join(d, "valid.phn"))
    return "valid.phn: phone transcripts not found"


def _edit(d, name, change):
    """Rewrite file ``d/name`` with ``change(lines)`` (lines keep their newlines)."""
    path = os.path.join(d, name)
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(change(lines))


def _set(i, text):
    """A ``change`` for :func:`_edit`: line ``i`` (0-based) becomes ``text``."""
    return lambda lines: lines[:i] + [text] + lines[i + 1:]


def _short_phn(d):
    _edit(d, "test.phn", lambda lines: lines[:-2])
    return "test.phn: 13 lines, but"


def _long_phn(d):
    with open(os.path.join(d, "train.phn"), "a") as f:
        f.write("a b\n")
    return "train.phn: 61 lines, but"


def _empty_split(d):
    _edit(d, "valid.tsv", lambda lines: lines[:1])
    return "valid.tsv: manifest lists no audio"


def _empty_line(d):
    _edit(d, "test.phn", _set(4, "\n"))
    return "test.phn:5: empty transcript"


def _missing_manifest(d):
    os.remove(os.path.join(d, "test.tsv"))
    return "test.tsv: manifest not found"


def _missing_audio(d):
    _edit(d, "valid.tsv", _set(3, "nowhere.wav\t16000\n"))
    return "valid.tsv:4: audio file"


@pytest.mark.parametrize("corrupt", [_missing_phn, _short_phn, _long_phn, _empty_split, _empty_line,
                                     _missing_manifest, _missing_audio])
def test_bad_data_one_line_error_exit_1(tones, tmp_path, capsys, corrupt):
    d = copy_data(tones["data"], str(tmp_path))
    expected = corrupt(d)
    out = tmp_path / "out.json"
    code, _, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", d, "--json", out, *FAST)
    assert code == 1
    assert any(expected in e for e in errors), err
    assert all(e.startswith("dicehubert-probe: error: ") for e in errors)
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_data_raises_with_debug(tones, tmp_path):
    d = copy_data(tones["data"], str(tmp_path))
    _missing_phn(d)
    with pytest.raises(InputError, match="valid.phn: phone transcripts not found"):
        main(["--checkpoint", tones["ckpt"], "--data", d, "--debug", *FAST])


def _add_unseen_phone(d):
    _edit(d, "test.phn", lambda lines: _set(6, lines[6].rstrip("\n") + " zz\n")(lines))


def test_unseen_phone_is_an_error_when_asked(tones, tmp_path, capsys):
    d = copy_data(tones["data"], str(tmp_path))
    _add_unseen_phone(d)
    code, _, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", d, "--unseen-phones", "error", *FAST)
    assert code == 1
    assert any("test.phn:7: phone 'zz' does not occur in the training transcripts" in e for e in errors), err
    assert "Traceback" not in err


def test_unseen_phone_scored_as_unk_by_default(tones, tmp_path, capsys):
    d = copy_data(tones["data"], str(tmp_path))
    _add_unseen_phone(d)
    out = tmp_path / "out.json"
    code, _, err, _ = run(capsys, "--checkpoint", tones["ckpt"], "--data", d, "--json", out, *FAST)
    assert code == 0, err
    assert "test.phn:7: phone 'zz' does not occur in the training transcripts" in err  # a warning
    result = json.loads(out.read_text())
    assert result["unseen_phones"] == {"valid": {}, "test": {"zz": 1}}
    assert "zz" not in result["phones"]


def test_transcript_too_long_for_ctc_is_warned_with_its_line(tones, tmp_path, capsys):
    d = copy_data(tones["data"], str(tmp_path))
    _edit(d, "train.phn", _set(2, " ".join(["a", "b"] * 300) + "\n"))  # 600 phones for a second or two (50 Hz)
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


def test_probe_of_chosen_layers_weighs_only_them(tones, tmp_path, capsys):
    """``--layers``: one index probes that hidden state alone; several, only those."""
    out = tmp_path / "layer1.json"
    code, stdout, err, _ = run(capsys, "--checkpoint", tones["ckpt"], "--data", tones["data"], "--layers", "1",
                               "--json", out, *FAST)
    assert code == 0, err
    one = json.loads(out.read_text())
    assert one["layers"] == [1] and one["layer_weights"] == [1.0] and one["num_layers"] == 1
    assert "layer weights [1:1.000]" in stdout
    both = run_probe(tones["ckpt"], tones["data"], cfg=ProbeConfig(epochs=2, max_train_utterances=8, layers=[0, 2]))
    assert both["layers"] == [0, 2] and len(both["layer_weights"]) == 2
    assert both["frames"] == one["frames"]


@pytest.mark.parametrize("layers", ["0,3", "-1"])
def test_probe_layer_out_of_range_is_one_line_error(tones, capsys, layers):
    code, _, err, errors = run(capsys, "--checkpoint", tones["ckpt"], "--data", tones["data"], "--layers", layers,
                               *FAST)
    assert code == 1 and "Traceback" not in err
    probed = [int(k) for k in layers.split(",")]
    assert errors == [f"dicehubert-probe: error: {tones['ckpt']}: layers {probed}: expected distinct hidden-state "
                      f"indices in 0..2 (0 = transformer input, k = layer k; the model has 2 layers)"], err


def test_bad_options_are_usage_errors(tones, capsys):
    for bad in (["--epochs", "0"], ["--lr", "-1"], ["--unseen-phones", "skip"], ["--layers", "1,a"],
                ["--layers", "2,2"]):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", tones["ckpt"], "--data", tones["data"], *bad])
        assert e.value.code == 2
    capsys.readouterr()
