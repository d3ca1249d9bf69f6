"""L_feat: the ``dicehubert_feat`` criterion, the student's feature heads and layer states.

The teacher is frozen and outside every module tree (no gradient, not in any checkpoint, on
the student's device and dtype), the loss ignores padded frames, and a teacher or a label
stream that cannot serve the student is an error before training.
"""

import math
import os

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from tests.helpers.config import build, compose
from dicehubert_fairseq.data.files import SoftLabelWriter
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.losses import feature_distillation_loss
from dicehubert_fairseq.hidden_states import hidden_states
from tests.helpers.data import (
    num_frames, tiny_model_overrides, write_checkpoint, write_corpus, write_random_labels,
)

DIM = 32
TINY = [o for o in tiny_model_overrides(dim=DIM) if not o.startswith("++model.encoder_layers=")] + [
    "run=cpu", "task.min_sample_size=8000", f"++model.feat_teacher_dim={DIM}",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second torch thread mostly spin-waits on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def feat_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 6, "valid": 2}, seconds=(0.6, 1.4), seed=5)
    write_random_labels(labels, sizes, "km", 20, 50)
    deep, shallow = str(root / "teacher12.pt"), str(root / "teacher2.pt")
    write_checkpoint(deep, data, labels, model_overrides={"encoder_layers": 12}, seed=1)
    write_checkpoint(shallow, data, labels, model_overrides={"encoder_layers": 2}, seed=2)
    return {"root": root, "data": data, "labels": labels, "sizes": sizes, "teacher": deep, "shallow": shallow}


def feat_cfg(w, name="feat_shallow_l6", extra=(), teacher=None):
    return compose(name, [f"task.data={w['data']}", f"task.label_dir={w['labels']}",
                          f"criterion.teacher_checkpoint={teacher or w['teacher']}"] + TINY + list(extra))


def batch_of(task, n=4, split="train"):
    task.load_dataset(split)
    ds = task.datasets[split]
    return ds.collater([ds[i] for i in range(n)])


# --------------------------------------------------------------------------- the loss maths


def test_feature_distillation_loss_hand_values_and_padding():
    # frame 1: equal vectors (L1 0, cos 1); frame 2: opposite (L1 mean 1, cos -1); frame 3: padding
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [0.0, -1.0], [-5.0, 3.0]]])
    pad = torch.tensor([[False, False, True]])
    a, b = math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))  # -log sigmoid(1), -log sigmoid(-1)
    loss, l1, cos = feature_distillation_loss(pred, target, pad, cos_weight=2.0)
    assert l1.item() == pytest.approx(0.5)
    assert cos.item() == pytest.approx((a + b) / 2)
    assert loss.item() == pytest.approx(0.5 + 2.0 * (a + b) / 2)
    loss.backward()
    assert torch.equal(pred.grad[0, 2], torch.zeros(2))  # the padded frame gets no gradient
    assert pred.grad[0, :2].abs().sum() > 0
    # without the mask the padded frame would dominate
    assert feature_distillation_loss(pred.detach(), target, None)[0].item() > 10


# --------------------------------------------------------------------------- the criterion


def test_criterion_ignores_padded_frames(feat_world):
    w = feat_world
    task, model, crit = build(feat_cfg(w, extra=["task.pad_audio=true", "task.max_sample_size=40000"]))
    batch = batch_of(task)
    assert batch["net_input"]["padding_mask"].any(), "the test needs a padded batch"
    model.eval()
    with torch.no_grad():
        loss, sample_size, log = crit(model, batch)
        out = model(**batch["net_input"], mask=False)
        preds = out["feat_preds"]
        teacher = hidden_states(crit.teacher, **batch["net_input"], output_layer=12).layers
    pad = out["padding_mask"]
    n_real = int((~pad).sum())
    assert pad.any() and sample_size == n_real < pad.numel()
    assert log["feat_frames"] == n_real
    per_layer = []
    for k, pred in zip([4, 8, 12], preds):
        target = teacher[k - 1]
        # the same loss on the real frames alone, concatenated: no padding anywhere
        only_real, _, _ = feature_distillation_loss(pred[~pad][None], target[~pad][None], None)
        assert log[f"feat_loss_L{k}"] / n_real == pytest.approx(only_real.item(), rel=1e-5)
        everything, _, _ = feature_distillation_loss(pred, target, None)
        assert abs(everything.item() - only_real.item()) > 1e-3  # padding would have counted
        per_layer.append(only_real.item())
    assert loss.item() == pytest.approx(np.mean(per_layer) * n_real, rel=1e-5)
    assert {"feat_l1_L4", "feat_cos_L12", "feat_loss"} <= set(log)


def test_teacher_gets_no_gradient_and_is_not_a_submodule(feat_world):
    task, model, crit = build(feat_cfg(feat_world))
    batch = batch_of(task)
    model.train()
    loss, _, _ = crit(model, batch)
    loss.backward()
    teacher = crit.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in model.feat_heads)
    # outside both module trees: nothing to save, to cast, or to hand to the optimizer
    assert list(crit.parameters()) == [] and crit.state_dict() == {}
    assert not any("teacher" in k for k in model.state_dict())
    student = {id(p) for p in model.parameters()}
    assert not any(id(p) in student for p in teacher.parameters())


def test_teacher_follows_student_device_and_dtype(feat_world):
    task, model, crit = build(feat_cfg(feat_world))
    batch = batch_of(task, 2)
    model.eval()
    crit(model, batch)
    assert next(crit.teacher.parameters()).dtype == torch.float32
    model.double()
    net_input = dict(batch["net_input"], source=batch["net_input"]["source"].double())
    loss, _, _ = crit(model, dict(batch, net_input=net_input))
    p = next(crit.teacher.parameters())
    assert p.dtype == torch.float64 and p.device == next(model.parameters()).device
    assert torch.isfinite(loss)
    crit.half()  # what fairseq does to the criterion under --fp16: the teacher is out of reach
    assert next(crit.teacher.parameters()).dtype == torch.float64


def test_ssl_plus_feat_reuses_the_ssl_loss(feat_world):
    task, model, crit = build(feat_cfg(feat_world, "ssl_feat_shallow_l6", ["criterion.feat_weight=0.5"]))
    batch = batch_of(task)
    loss, sample_size, log = crit(model, batch)
    assert {"loss_m_0", "correct_m_0", "loss_features_pen", "feat_loss_L4", "feat_loss"} <= set(log)
    ssl = log["loss_m_0"] + log["loss_features_pen"]
    feat = log["feat_loss"] / log["feat_frames"]
    assert loss.item() == pytest.approx(ssl + 0.5 * feat * sample_size, rel=1e-5)


def test_trained_checkpoint_holds_the_student_only_and_resumes(feat_world, tmp_path):
    from fairseq import checkpoint_utils
    from tests.test_ablations import tiny_config, train

    w = feat_world
    overrides = ("task.data=DATA", "task.label_dir=LABELS", "criterion.teacher_checkpoint=TEACHER")
    cfg = tiny_config("ssl_feat_shallow_l6", overrides, w, str(tmp_path / "ckpt"), updates=5)
    state = train(cfg)
    _, fresh, _ = build(cfg)
    assert set(state["model"]) == set(fresh.state_dict())  # student + heads, nothing else
    assert state.get("criterion") is None
    teacher_sd = torch.load(w["teacher"], weights_only=True)["model"]
    assert len(teacher_sd) > len(state["model"])
    # the student reloads in this process like any fairseq checkpoint
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([os.path.join(cfg.checkpoint.save_dir,
                                                                               "checkpoint_last.pt")])
    assert models[0].feat_heads is not None and len(models[0].feat_heads) == 3
    # and training resumes from checkpoint_last.pt (the teacher is loaded again, not restored)
    resumed = train(tiny_config("ssl_feat_shallow_l6", overrides, w, str(tmp_path / "ckpt"), updates=7))
    assert resumed["optimizer_history"][-1]["num_updates"] == 7


# --------------------------------------------------------------------------- layer states


def test_ssl_forward_unchanged_by_the_feature_heads(feat_world):
    cfg = [f"task.data={feat_world['data']}", f"task.label_dir={feat_world['labels']}"] + TINY
    task, plain, _ = build(compose("dicehubert_narrow", cfg))
    _, with_heads, _ = build(compose("dicehubert_narrow", cfg + ["++model.feat_target_layers=[4,8,12]"]))
    assert with_heads.load_state_dict(plain.state_dict(), strict=False).missing_keys == [
        f"feat_heads.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    batch = batch_of(task, 3)
    assert plain.feat_heads is None and not any(k.startswith("feat_heads") for k in plain.state_dict())
    fixed = {}

    def apply_mask(x, padding_mask, target_list):  # the same span mask for both models
        m = fixed.setdefault("m", torch.rand(x.shape[:2]) < 0.5)[:, : x.size(1)]
        x = x.clone()
        x[m] = plain.mask_emb
        return x, m

    outs = []
    for model in (plain, with_heads):
        model.eval()
        model.apply_mask = apply_mask
        outs.append(model(target_list=batch["target_list"], **batch["net_input"]))
    for key in ("logit_m_list", "logit_u_list", "target_m_list"):
        assert all(torch.equal(a, b) for a, b in zip(outs[0][key], outs[1][key]))
    assert "layer_states" not in outs[0] and len(outs[1]["layer_states"]) == 12 and len(outs[1]["feat_preds"]) == 3


# --------------------------------------------------------------------------- bad input


def _fails(w, *fragments, name="feat_shallow_l6", extra=(), teacher=None):
    with pytest.raises(InputError) as e:
        build(feat_cfg(w, name, extra, teacher))
    for frag in fragments:
        assert frag in str(e.value), str(e.value)


def test_teacher_too_shallow_for_the_target_layers(feat_world):
    w = feat_world
    _fails(w, w["shallow"], "layers 1..2", "cannot serve target layer(s) [4, 8, 12]", teacher=w["shallow"])
    # layer-to-layer for a 12-layer student needs 12 teacher layers too
    _fails(w, "layers 1..2", name="feat_narrow", teacher=w["shallow"])


def test_teacher_width_frame_rate_and_normalisation_must_match(feat_world):
    w = feat_world
    _fails(w, "hidden size is 32", "model.feat_teacher_dim=32", extra=["++model.feat_teacher_dim=768"])
    conv_100hz = "'[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)]'"  # 160-sample stride
    _fails(w, "160 samples", "320 samples", extra=[f"++model.conv_feature_layers={conv_100hz}"])
    _fails(w, "task.normalize=False", extra=["task.normalize=true"])


def test_student_layers_must_exist(feat_world):
    w = feat_world
    _fails(w, "feat_student_layers", "out of range", "1..2", extra=["model.feat_student_layers=[1,2,3]"])
    _fails(w, "one student layer per target layer", extra=["model.feat_student_layers=[1,2]"])


def test_ssl_weight_needs_labels(feat_world):
    _fails(feat_world, "task.labels is empty", extra=["criterion.ssl_weight=1.0"])


@pytest.mark.parametrize("label_rate,conv,ok", [
    (50, None, True),                                   # k-means labels, 50 Hz student
    (100, None, True),                                  # HuBERT iteration 1: every other MFCC label
    (25, None, True),                                   # each label repeated twice
    (50, "'[(32,10,5)] + [(32,3,2)] * 4 + [(32,3,3)]'", False),  # 66.7 Hz student: ratio 0.75
    (40, None, False),                                  # ratio 0.8
])
def test_label_rate_must_fit_the_student_frame_rate(feat_world, label_rate, conv, ok):
    w = feat_world
    name = f"km{label_rate}"
    write_random_labels(w["labels"], w["sizes"], name, 20, label_rate)
    extra = [f"task.labels=[{name}]", f"task.label_rate={label_rate}"]
    if conv:
        extra.append(f"++model.conv_feature_layers={conv}")
    cfg = compose("dicehubert_narrow", [f"task.data={w['data']}", f"task.label_dir={w['labels']}"] + TINY + extra)
    if ok:
        build(cfg)
        return
    with pytest.raises(InputError) as e:
        build(cfg)
    msg = str(e.value)
    assert f"task.label_rate={label_rate}" in msg and "expected an integer or 1/integer" in msg, msg


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
                                                         "task.labels=[kms]", "task.soft_labels=[kms]"] + TINY))
    with pytest.raises(InputError) as e:
        task.load_dataset("train")
    msg = str(e.value)
    assert "train.kms.soft.json" in msg and "K=25" in msg and "dict.kms.txt has 20 symbols" in msg, msg
