"""Documented options, each tested for the effect the docs give it.

* task ``preflight``, ``preflight_audio_headers``, ``label_length_tolerance`` (README, "Bad input");
* ``dicehubert-labels check --no-audio-headers`` and ``--tolerance``; ``merge --out-dir``;
  ``dump --max-chunk`` (long utterances cut into chunks: fewer frames) and
  ``--max-batch-seconds`` (inference batches; the labels do not depend on them);
* ``dicehubert-probe --train-split/--valid-split/--test-split``;
* the Conformer student's parameter count as docs/ablations.md states it;
* ``model.init_from_teacher`` leaves ``final_proj`` (and the label embeddings) uncopied even
  when their shapes match the teacher's.
"""

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.config import build, compose
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.testing import num_frames, tiny_model_overrides, write_checkpoint, write_corpus, write_random_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def restore_process_state():
    """The CLIs' main() configure logging and torch threads; undo it for the other tests."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in ("fairseq", "fairseq.tasks", "fairseq.models")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- preflight options


@pytest.fixture
def flawed(tmp_path):
    """Train split with two flaws: utterance 2 is 8 kHz audio (header), utterance 3's label line
    is 10 labels (0.2 s) too long."""
    data, labels = tmp_path / "data", tmp_path / "labels"
    sizes = write_corpus(str(data), {"train": 5, "valid": 2}, seconds=(0.8, 1.2), seed=71)
    write_random_labels(str(labels), sizes, "km", 12, 50, seed=71)
    wav = data / "wav" / "train_0002.wav"
    audio, _ = sf.read(str(wav), dtype="float32")
    sf.write(str(wav), audio, 8000, subtype="PCM_16")  # same samples, wrong rate in the header
    lines = (labels / "train.km").read_text().splitlines()
    lines[3] += " 1" * 10
    (labels / "train.km").write_text("\n".join(lines) + "\n")
    return {"data": str(data), "labels": str(labels), "wav": str(wav), "km": str(labels / "train.km")}


def _load(w, *extra):
    cfg = compose("dicehubert_narrow", [f"task.data={w['data']}", f"task.label_dir={w['labels']}", "run=cpu",
                                        "task.min_sample_size=8000"] + tiny_model_overrides() + list(extra))
    task, _, _ = build(cfg)
    task.load_dataset("train")
    return task.datasets["train"]


def test_task_preflight_options(flawed):
    w = flawed
    with pytest.raises(InputError) as e:
        _load(w)
    msg = str(e.value)
    assert f"{w['wav']} has sample rate 8000 Hz" in msg and f"{w['km']}:4:" in msg
    # headers off: only the label problem is left
    with pytest.raises(InputError) as e:
        _load(w, "task.preflight_audio_headers=false")
    assert "8000" not in str(e.value) and f"{w['km']}:4:" in str(e.value)
    # a tolerance above the 0.2 s mismatch: only the header problem is left
    with pytest.raises(InputError) as e:
        _load(w, "task.label_length_tolerance=0.3")
    assert "8000 Hz" in str(e.value) and f"{w['km']}:4:" not in str(e.value)
    with pytest.raises(InputError, match=re.escape(f"{w['km']}:4:")):
        _load(w, "task.preflight_audio_headers=false", "task.label_length_tolerance=0.15")
    ds = _load(w, "task.preflight_audio_headers=false", "task.label_length_tolerance=0.3")
    assert len(ds) == 5
    # no preflight at all: the split loads, and the bad file fails only when fairseq reads it
    ds = _load(w, "task.preflight=false")
    assert len(ds) == 5
    with pytest.raises(Exception, match="8000"):
        ds[2]


def test_labels_check_options(flawed, capsys):
    from dicehubert_fairseq.labels.cli import main

    w = flawed
    base = ["check", "--manifest-dir", w["data"], "--label-dir", w["labels"], "--split", "train"]

    def check(*extra):
        code = main(base + list(extra))
        return code, capsys.readouterr().err

    code, err = check()
    assert code == 1 and "8000 Hz" in err and f"{w['km']}:4:" in err
    code, err = check("--no-audio-headers")
    assert code == 1 and "8000" not in err and f"{w['km']}:4:" in err
    code, err = check("--tolerance", "0.3")
    assert code == 1 and "8000 Hz" in err and f"{w['km']}:4:" not in err
    code, err = check("--no-audio-headers", "--tolerance", "0.3")
    assert code == 0, err


# ----------------------------------------------------------------------------- dicehubert-labels dump / merge


@pytest.fixture(scope="module")
def label_world(tmp_path_factory, tiny_corpus, tiny_teacher):
    """k-means (K=4) of layer 1 of the tiny teacher, on the tiny corpus."""
    from dicehubert_fairseq.labels.cli import main

    root = tmp_path_factory.mktemp("labelflags")
    km = str(root / "km.joblib")
    assert main(["fit", "--manifest-dir", tiny_corpus["data"], "--checkpoint", tiny_teacher, "--layer", "1",
                 "--n-clusters", "4", "--n-init", "1", "--threads", "1", "--no-progress", "--out", km]) == 0
    return {"root": root, "km": km, "data": tiny_corpus["data"], "sizes": tiny_corpus["sizes"],
            "teacher": tiny_teacher}


def _dump(w, label_dir, *extra):
    from dicehubert_fairseq.labels.cli import main

    assert main(["dump", "--manifest-dir", w["data"], "--split", "train", "--checkpoint", w["teacher"], "--layer", "1",
                 "--km", w["km"], "--label-dir", str(label_dir), "--threads", "1", "--no-progress"]
                + list(extra)) == 0
    with open(os.path.join(label_dir, "train.km")) as f:
        return [line.split() for line in f.read().splitlines()]


def test_dump_max_batch_seconds_and_max_chunk(label_world, tmp_path, monkeypatch):
    from dicehubert_fairseq.labels.features import TeacherFeatureReader

    w = label_world
    batches = []
    real = TeacherFeatureReader.features_torch

    def counting(self, wavs):
        batches.append(len(wavs))
        return real(self, wavs)

    monkeypatch.setattr(TeacherFeatureReader, "features_torch", counting)
    default = _dump(w, tmp_path / "default")
    n_default = list(batches)
    batches.clear()
    one_by_one = _dump(w, tmp_path / "small_batches", "--max-batch-seconds", "0.01")
    sizes = w["sizes"]["train"]
    assert batches == [1] * len(sizes) and len(n_default) < len(sizes)  # the flag sets the batches
    assert one_by_one == default  # and the labels do not depend on them
    assert [len(x) for x in default] == [num_frames(s, 50) for s in sizes]
    # --max-chunk: utterances longer than it are cut into independent chunks (as fairseq's
    # dump_hubert_feature max_chunk): each chunk loses its own edge frames
    chunk = 12000
    chunked = _dump(w, tmp_path / "chunked", "--max-chunk", str(chunk))
    want = [sum(num_frames(min(chunk, s - a), 50) for a in range(0, s, chunk)) for s in sizes]
    assert [len(x) for x in chunked] == want
    assert any(s > chunk for s in sizes) and want != [len(x) for x in default]


def test_merge_out_dir(label_world, tmp_path):
    from dicehubert_fairseq.labels.cli import main

    w = label_world
    shards = tmp_path / "shards"
    for rank in (0, 1):
        assert main(["dump", "--manifest-dir", w["data"], "--split", "train", "--checkpoint", w["teacher"],
                     "--layer", "1", "--km", w["km"], "--label-dir", str(shards), "--nshard", "2", "--rank", str(rank),
                     "--threads", "1", "--no-progress"]) == 0
    out = tmp_path / "merged"
    assert main(["merge", "--label-dir", str(shards), "--split", "train", "--nshard", "2", "--name", "km",
                 "--manifest-dir", w["data"], "--out-dir", str(out)]) == 0
    assert (out / "train.km").is_file() and not (shards / "train.km").exists()
    whole = _dump(w, tmp_path / "whole")
    assert [line.split() for line in (out / "train.km").read_text().splitlines()] == whole


# ----------------------------------------------------------------------------- dicehubert-probe split flags


def test_probe_split_flags(tmp_path, tiny_teacher, capsys):
    from dicehubert_fairseq.probe.cli import main
    from dicehubert_fairseq.probe.synthetic import write_tone_corpus

    data = str(tmp_path / "tones")
    write_tone_corpus(data, splits={"tr": 12, "dev": 5, "ev": 3}, seed=4)
    out = tmp_path / "probe.json"
    opts = ["--checkpoint", tiny_teacher, "--data", data, "--epochs", "1", "--threads", "1", "-q"]
    assert main(opts + ["--train-split", "tr", "--valid-split", "dev", "--test-split", "ev", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["splits"] == {"train": "tr", "valid": "dev", "test": "ev"}
    assert result["utterances"] == {"train": 12, "valid": 5, "test": 3}
    assert "on ev (3 utterances" in capsys.readouterr().out
    # without the flags the default names are looked for
    assert main(opts) == 1
    assert os.path.join(data, "train.tsv") in capsys.readouterr().err


# ----------------------------------------------------------------------------- model facts in the docs


def _doc_millions(pattern):
    with open(os.path.join(REPO, "docs", "ablations.md"), encoding="utf-8") as f:
        m = re.search(pattern, f.read())
    assert m, pattern
    return float(m.group(1)) * 1e6


def test_conformer_parameter_count_as_documented(tmp_path):
    sizes = write_corpus(str(tmp_path / "data"), {"train": 2, "valid": 2})
    write_random_labels(str(tmp_path / "labels"), sizes, "km", 500, 50)
    base = [f"task.data={tmp_path / 'data'}", f"task.label_dir={tmp_path / 'labels'}", "run=cpu"]
    heads = ("label_embs_concat", "final_proj")
    counts = {}
    for name in ("dicehubert_conformer", "dicehubert_narrow"):
        _, model, _ = build(compose(name, base))
        counts[name] = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(heads))
    conformer = _doc_millions(r"conformer layers x 384 \(([\d.]+)M parameters")
    narrow = _doc_millions(r"\(\d+\.\dM parameters, narrow: ([\d.]+)M\)")
    assert abs(counts["dicehubert_conformer"] - conformer) <= 0.05e6, counts
    assert abs(counts["dicehubert_narrow"] - narrow) <= 0.05e6, counts


def test_init_from_teacher_leaves_final_proj_even_when_shapes_match(tmp_path):
    sizes = write_corpus(str(tmp_path / "data"), {"train": 2, "valid": 2})
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    write_random_labels(labels, sizes, "km", 20, 50)
    teacher = str(tmp_path / "teacher.pt")
    write_checkpoint(teacher, data, labels, model="dicehubert_student", task="dicehubert",
                     model_overrides={"untie_final_proj": True})
    state = torch.load(teacher, weights_only=True)["model"]
    cfg = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu",
                                        f"model.init_from_teacher={teacher}"] + tiny_model_overrides())
    _, model, _ = build(cfg)
    student = model.state_dict()
    assert set(student) == set(state)  # the same architecture: every tensor could be copied
    for key in ("final_proj.weight", "final_proj.bias", "label_embs_concat"):
        assert student[key].shape == state[key].shape and not torch.equal(student[key], state[key]), key
    copied = [k for k in student if torch.equal(student[k], state[k])]
    assert "feature_extractor.conv_layers.0.0.weight" in copied and "encoder.layers.1.fc1.weight" in copied
    assert not any(k.startswith(("final_proj", "label_embs_concat")) for k in copied)
