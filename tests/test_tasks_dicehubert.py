"""Task ``dicehubert``: soft-label streams from the files to the criterion (and into the loss), and the
preflight checks with their options."""

import os
import re

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.data.files import SoftLabelWriter
from dicehubert_fairseq.errors import InputError
from tests.helpers.config import FEAT_TINY, build, compose, tiny_student_cfg
from tests.helpers.data import num_frames, write_corpus, write_random_labels, write_soft_labels


def test_soft_labels_reach_the_criterion(corpus):
    data, labels, sizes = corpus
    write_soft_labels(labels, sizes)
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
    write_soft_labels(labels, sizes, name="kmsoft")
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


@pytest.fixture(scope="module")
def soft_world(tmp_path_factory):
    """A tiny student on soft labels ``km`` (K=12, top 3), padded batches, unmasked frames weighed 0.5."""
    root = tmp_path_factory.mktemp("softloss")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(0.8, 1.4), seed=41)
    write_soft_labels(labels, sizes, seed=41)
    task, model, criterion = build(tiny_student_cfg(data, labels, [
        "task.soft_labels=[km]", "task.pad_audio=true", "criterion.pred_nomask_weight=0.5"]))
    task.load_dataset("train")
    return {"model": model, "criterion": criterion, "ds": task.datasets["train"]}


def _forward(world, batch, update=5):
    """The criterion on ``batch`` with the masks of ``update``; also the model's output."""
    model, criterion = world["model"], world["criterion"]
    model.set_num_updates(update + 1000)  # leave the update: the mask counter restarts below
    model.set_num_updates(update)
    seen = []
    hook = model.register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        loss, sample_size, log = criterion(model, batch)
    finally:
        hook.remove()
    assert len(seen) == 1
    return loss, sample_size, log, seen[0]


def _expected_soft_loss(out, batch, tag):
    """``-sum p * log_softmax(logits)[ids]`` over the frames of ``tag`` ('m' or 'u'), from the
    dataset's soft labels, the model's mask and logits."""
    pad, masked = out["padding_mask"], out["mask_indices"]
    selected = ~pad & (masked if tag == "m" else ~masked)
    ids, probs = batch["soft_target_list"][0]
    T = pad.shape[1]  # label rate = frame rate: frame t reads label t
    ids, probs = ids[:, :T][selected], probs[:, :T][selected]
    logits = out[f"logit_{tag}_list"][0]
    assert logits.shape[0] == int(selected.sum()) > 0
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(probs.double() * logp.gather(1, ids)).sum().item()


def test_soft_labels_reach_the_loss(soft_world, one_torch_thread):
    """The logged loss of a soft stream is ``-sum p * log_softmax(logits)[ids]``, recomputed from
    the model's logits and mask and the soft labels *as the dataset delivered them*; changing
    only the non-top probabilities changes it (training on the arg-max would not)."""
    ds = soft_world["ds"]
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["soft_target_list"][0] is not None
    soft_world["model"].train()
    loss, sample_size, log, out = _forward(soft_world, batch)
    for tag in ("m", "u"):
        assert log[f"loss_{tag}_0"] == pytest.approx(_expected_soft_loss(out, batch, tag), rel=1e-5), tag
    # not the arg-max: the hard cross-entropy with the top class is another number
    hard = torch.nn.functional.cross_entropy(out["logit_m_list"][0].double(), out["target_m_list"][0],
                                             reduction="sum").item()
    assert abs(hard - log["loss_m_0"]) > 1e-4 * abs(hard)  # 10x the tolerance above

    # only the non-top probabilities change (the top class and its probability stay): the loss changes
    ids, probs = batch["soft_target_list"][0]
    swapped = probs.clone()
    swapped[..., 1], swapped[..., 2] = probs[..., 2], probs[..., 1]
    assert torch.equal(swapped[..., 0], probs[..., 0]) and not torch.equal(swapped, probs)
    changed = dict(batch, soft_target_list=[(ids, swapped)])
    loss2, _, log2, out2 = _forward(soft_world, changed)
    assert torch.equal(out2["mask_indices"], out["mask_indices"])  # same masks: only the targets differ
    assert torch.equal(out2["target_m_list"][0], out["target_m_list"][0])
    assert log2["loss_m_0"] == pytest.approx(_expected_soft_loss(out2, changed, "m"), rel=1e-5)
    assert abs(log2["loss_m_0"] - log["loss_m_0"]) > 1e-4 * log["loss_m_0"]
    assert abs(loss2.item() - loss.item()) > 1e-4 * loss.item()


def test_soft_labels_must_be_listed_in_labels(corpus):
    data, labels, _ = corpus
    with pytest.raises(InputError, match="soft_labels"):
        build(tiny_student_cfg(data, labels, ["task.soft_labels=[nope]"]))


def _load(data, labels, extra=()):
    task, _, _ = build(tiny_student_cfg(data, labels, extra))
    task.load_dataset("train")
    return task.datasets["train"]


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


def test_task_preflight_options(flawed):
    """``task.preflight_audio_headers``, ``task.label_length_tolerance`` and ``task.preflight``
    (README, "Bad input"), each with the effect documented."""
    w = flawed
    with pytest.raises(InputError) as e:
        _load(w["data"], w["labels"])
    msg = str(e.value)
    assert f"{w['wav']} has sample rate 8000 Hz" in msg and f"{w['km']}:4:" in msg
    # headers off: only the label problem is left
    with pytest.raises(InputError) as e:
        _load(w["data"], w["labels"], ["task.preflight_audio_headers=false"])
    assert "8000" not in str(e.value) and f"{w['km']}:4:" in str(e.value)
    # a tolerance above the 0.2 s mismatch: only the header problem is left
    with pytest.raises(InputError) as e:
        _load(w["data"], w["labels"], ["task.label_length_tolerance=0.3"])
    assert "8000 Hz" in str(e.value) and f"{w['km']}:4:" not in str(e.value)
    with pytest.raises(InputError, match=re.escape(f"{w['km']}:4:")):
        _load(w["data"], w["labels"], ["task.preflight_audio_headers=false", "task.label_length_tolerance=0.15"])
    ds = _load(w["data"], w["labels"], ["task.preflight_audio_headers=false", "task.label_length_tolerance=0.3"])
    assert len(ds) == 5
    # no preflight at all: the split loads, and the bad file fails only when fairseq reads it
    ds = _load(w["data"], w["labels"], ["task.preflight=false"])
    assert len(ds) == 5
    with pytest.raises(Exception, match="8000"):
        ds[2]


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
