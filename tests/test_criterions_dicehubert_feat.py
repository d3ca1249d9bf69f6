"""L_feat: the ``dicehubert_feat`` criterion, the student's feature heads and layer states.

The teacher is frozen and outside every module tree (no gradient, not in any checkpoint, on
the student's device and dtype), the loss ignores padded frames, and a teacher or a label
stream that cannot serve the student is an error before training.
"""

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.hidden_states import hidden_states
from dicehubert_fairseq.losses import feature_distillation_loss
from tests.helpers.config import build
from tests.helpers.config import feat_cfg, batch_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
