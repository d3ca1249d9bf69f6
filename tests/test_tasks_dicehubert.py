"""Task ``dicehubert``: soft-label streams from the files to the criterion, and the preflight checks."""

import os
import shutil

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.data.files import SoftLabelWriter
from dicehubert_fairseq.errors import InputError
from tests.helpers.config import FEAT_TINY, build, compose, tiny_student_cfg
from tests.helpers.data import num_frames, write_random_labels


def _write_soft(labels, sizes, name="km", k=3, K=12, seed=0):
    rng = np.random.default_rng(seed)
    for split, lens in sizes.items():
        w = SoftLabelWriter(labels, split, name, n_clusters=K, top_k=k, meta={"temperature": 5.0})
        hard_lines = []
        for size in lens:
            T = num_frames(size, 50)
            ids = np.stack([rng.permutation(K)[:k] for _ in range(T)])
            p = rng.dirichlet(np.ones(k), size=T)
            order = np.argsort(-p, axis=1)
            ids, p = np.take_along_axis(ids, order, 1), np.take_along_axis(p, order, 1)
            w.add(ids, p)
            hard_lines.append(" ".join(map(str, ids[:, 0])))
        w.close()
        with open(os.path.join(labels, f"{split}.{name}"), "w") as f:
            f.write("\n".join(hard_lines) + "\n")


def test_soft_labels_reach_the_criterion(corpus):
    data, labels, sizes = corpus
    _write_soft(labels, sizes)
    cfg = tiny_student_cfg(data, labels, ["task.soft_labels=[km]"])
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(3)])
    hard = batch["target_list"][0]
    ids, probs = batch["soft_target_list"][0]
    d = task.dictionaries[0]
    valid = hard != d.pad()
    assert valid.any()
    assert ids.shape == hard.shape + (3,) and probs.shape == ids.shape
    # hard target = most likely soft class; probabilities sum to one on real frames, 0 on padding
    assert torch.equal(hard[valid], ids[valid][:, 0])
    np.testing.assert_allclose(probs[valid].sum(-1).numpy(), 1.0, atol=1e-5)
    assert (probs[~valid] == 0).all()
    # dictionary indices: cluster c is symbol str(c)
    assert {d[i] for i in ids[valid].flatten().tolist()} <= {str(c) for c in range(12)}
    model.train()
    loss, sample_size, log = criterion(model, batch)
    assert torch.isfinite(loss) and sample_size > 0 and "loss_m_0" in log
    loss.backward()
    assert model.label_embs_concat.grad.abs().sum() > 0


def test_hard_and_soft_streams_together(corpus):
    data, labels, sizes = corpus
    _write_soft(labels, sizes, name="kmsoft")
    shutil.copy(os.path.join(labels, "dict.km.txt"), os.path.join(labels, "dict.kmsoft.txt"))
    cfg = tiny_student_cfg(data, labels, ["task.labels=[km,kmsoft]", "task.soft_labels=[kmsoft]",
                                   "model.untie_final_proj=true", "criterion.label_weights=[1.0,0.5]"])
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(2)])
    assert batch["soft_target_list"][0] is None and batch["soft_target_list"][1] is not None
    loss, _, log = criterion(model, batch)
    assert {"loss_m_0", "loss_m_1", "correct_m_0", "correct_m_1"} <= set(log)
    expected = log["loss_m_0"] + 0.5 * log["loss_m_1"] + log["loss_features_pen"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_labels_must_be_listed_in_labels(corpus):
    data, labels, _ = corpus
    with pytest.raises(InputError, match="soft_labels"):
        build(tiny_student_cfg(data, labels, ["task.soft_labels=[nope]"]))


def _load(data, labels, extra=()):
    task, _, _ = build(tiny_student_cfg(data, labels, extra))
    task.load_dataset("train")


def _expect(data, labels, *fragments, extra=()):
    with pytest.raises(InputError) as e:
        _load(data, labels, extra)
    for frag in fragments:
        assert frag in str(e.value), str(e.value)


def test_preflight_accepts_good_data(corpus):
    data, labels, _ = corpus
    _load(data, labels)


def test_preflight_label_line_count(corpus):
    data, labels, _ = corpus
    path = os.path.join(labels, "train.km")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-1]) + "\n")
    _expect(data, labels, path, "5 lines", "6 utterances")


def test_preflight_label_length(corpus):
    data, labels, _ = corpus
    path = os.path.join(labels, "train.km")
    lines = open(path).read().splitlines()
    lines[2] = lines[2] + " 1" * 40
    open(path, "w").write("\n".join(lines) + "\n")
    _expect(data, labels, f"{path}:3:", "label_rate 50")


def test_preflight_label_not_in_dictionary(corpus):
    data, labels, _ = corpus
    path = os.path.join(labels, "train.km")
    lines = open(path).read().splitlines()
    toks = lines[1].split()
    toks[0] = "12"  # K=12: ids 0..11
    lines[1] = " ".join(toks)
    open(path, "w").write("\n".join(lines) + "\n")
    _expect(data, labels, f"{path}:2:", "'12'", "dict.km.txt")


@pytest.mark.parametrize("content,fragment", [(None, "not found"), ("", "empty"), ("0 1\n0 1\n", "duplicate")])
def test_preflight_dictionary(corpus, content, fragment):
    data, labels, _ = corpus
    path = os.path.join(labels, "dict.km.txt")
    if content is None:
        os.unlink(path)
    else:
        open(path, "w").write(content)
    _expect(data, labels, path, fragment)


def test_preflight_missing_audio(corpus):
    data, labels, _ = corpus
    os.unlink(os.path.join(data, "wav", "train_0003.wav"))
    _expect(data, labels, "train.tsv:5:", "train_0003.wav not found")


def test_preflight_missing_dirs(corpus, tmp_path):
    data, labels, _ = corpus
    _expect(str(tmp_path / "nope"), labels, "task.data=", "not found")
    with pytest.raises(InputError, match="task.label_dir"):
        _load(data, str(tmp_path / "nolabels"))


def test_preflight_reports_every_problem(corpus):
    data, labels, _ = corpus
    os.unlink(os.path.join(data, "wav", "train_0001.wav"))
    os.unlink(os.path.join(data, "wav", "train_0004.wav"))
    with pytest.raises(InputError) as e:
        _load(data, labels)
    assert "train_0001.wav" in str(e.value) and "train_0004.wav" in str(e.value)


def test_soft_labels_whose_k_differs_from_the_dictionary(feat_world):
    w = feat_world
    rng = np.random.default_rng(0)
    write_random_labels(w["labels"], w["sizes"], "kms", 20, 50)  # dict.kms.txt: 20 symbols
    for split, lens in w["sizes"].items():
        writer = SoftLabelWriter(w["labels"], split, "kms", n_clusters=25, top_k=2)
        for size in lens:
            T = num_frames(size, 50)
            writer.add(np.stack([rng.permutation(20)[:2] for _ in range(T)]), np.tile([0.7, 0.3], (T, 1)))
        writer.close()
    task, _, _ = build(compose("dicehubert_narrow_soft", [f"task.data={w['data']}", f"task.label_dir={w['labels']}",
                                                         "task.labels=[kms]", "task.soft_labels=[kms]"] + FEAT_TINY))
    with pytest.raises(InputError) as e:
        task.load_dataset("train")
    msg = str(e.value)
    assert "train.kms.soft.json" in msg and "K=25" in msg and "dict.kms.txt has 20 symbols" in msg, msg
