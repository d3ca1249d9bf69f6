"""L_feat: the ``dicehubert_feat`` criterion, the student's feature heads and layer states.

The teacher is frozen and outside every module tree (no gradient, not in any checkpoint, on
the student's device and dtype), the loss ignores padded frames, and a teacher or a label
stream that cannot serve the student is an error before training. L_SSL + L_feat is checked from
outside: one student forward per batch, ``sample_size`` the masked real frames, and L_feat
recomputed independently of the criterion's code.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
        # padding would have counted: outside 10x the tolerance of the equality above
        assert abs(everything.item() - only_real.item()) > 1e-4 * only_real.item()
        per_layer.append(only_real.item())
    assert loss.item() == pytest.approx(np.mean(per_layer) * n_real, rel=1e-5)
    assert {"feat_l1_L4", "feat_cos_L12", "feat_loss"} <= set(log)


@pytest.mark.parametrize("extra,kind", [([], "mse"), (["criterion.feat_loss=l1_cos"], "l1_cos")])
def test_layer_to_layer_loss_is_mse_by_default_over_real_frames(feat_world, extra, kind):
    """feat_narrow: FitHuBERT's mean squared error per layer (no cosine term), padding left out,
    L_feat the mean over the 12 layers; ``criterion.feat_loss=l1_cos`` switches to DistilHuBERT's."""
    task, model, crit = build(feat_cfg(feat_world, "feat_narrow",
                                       ["task.pad_audio=true", "task.max_sample_size=40000"] + extra))
    batch = batch_of(task)
    model.eval()
    with torch.no_grad():
        loss, sample_size, log = crit(model, batch)
        out = model(**batch["net_input"], mask=False)
        teacher = hidden_states(crit.teacher, **batch["net_input"], output_layer=12).layers
    pad = out["padding_mask"]
    n_real = int((~pad).sum())
    assert pad.any() and sample_size == n_real
    per_layer = []
    for k, pred in zip(range(1, 13), out["feat_preds"]):
        pred, target = pred[~pad], teacher[k - 1][~pad]  # the real frames alone, (N, D)
        if kind == "mse":
            expected = F.mse_loss(pred, target).item()  # FitHuBERT: F.mse_loss(...).mean() over everything
            assert log[f"feat_mse_L{k}"] / n_real == pytest.approx(expected, rel=1e-5)
        else:
            expected = feature_distillation_loss(pred[None], target[None], None)[0].item()
            assert {f"feat_l1_L{k}", f"feat_cos_L{k}"} <= set(log)
        assert log[f"feat_loss_L{k}"] / n_real == pytest.approx(expected, rel=1e-5)
        per_layer.append(expected)
    assert loss.item() == pytest.approx(np.mean(per_layer) * n_real, rel=1e-5)
    other = ("feat_l1_", "feat_cos_") if kind == "mse" else ("feat_mse_",)
    assert not [key for key in log if key.startswith(other)]


def test_teacher_gets_no_gradient_and_is_not_a_submodule(feat_world):
    task, model, crit = build(feat_cfg(feat_world))
    batch = batch_of(task)
    model.train()
    loss, _, _ = crit(model, batch)
    loss.backward()
    teacher = crit.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.feat_heads.parameters())
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


def test_ssl_plus_feat_one_masked_forward_serves_both_losses(feat_world):
    """L_SSL + L_feat (``ssl_feat_shallow_l6``): the student is called once per batch;
    ``sample_size`` is the number of masked, non-padded frames (L_SSL on masked frames only);
    L_feat is recomputed here: the heads applied by hand to the layer states of *that masked
    forward*, the teacher's layers from fairseq's own ``HubertModel.extract_features`` on the
    unmasked waveform, and DistilHuBERT's L1 + lambda * (-log sigmoid(cos)) written out,
    averaged over real frames and target layers."""
    from fairseq import checkpoint_utils

    cos_weight, feat_weight, ssl_weight = 0.7, 0.5, 1.0
    task, model, criterion = build(feat_cfg(feat_world, "ssl_feat_shallow_l6", [
        "task.pad_audio=true", "task.max_sample_size=40000", f"criterion.cos_weight={cos_weight}",
        f"criterion.feat_weight={feat_weight}", f"criterion.ssl_weight={ssl_weight}"]))
    assert criterion.cfg.pred_nomask_weight == 0  # L_SSL on masked frames only (the recipe)
    batch = batch_of(task)
    assert batch["net_input"]["padding_mask"].any(), "the test needs a padded batch"

    calls, outputs = [], []
    pre = model.register_forward_pre_hook(lambda _m, _args: calls.append(1))
    post = model.register_forward_hook(lambda _m, _args, out: outputs.append(out))
    model.eval()  # no dropout: the heads can be re-applied exactly
    try:
        with torch.no_grad():
            loss, sample_size, log = criterion(model, batch)
    finally:
        pre.remove()
        post.remove()
    assert len(calls) == 1, f"{len(calls)} student forwards for one batch"
    out = outputs[0]

    pad, masked = out["padding_mask"], out["mask_indices"]
    assert masked.any() and pad.any()
    assert sample_size == int((masked & ~pad).sum())

    # L_feat by hand: heads on the masked forward's layer states, teacher layers from fairseq
    states = out["layer_states"]
    teacher = checkpoint_utils.load_model_ensemble_and_task([feat_world["teacher"]])[0][0].eval()
    src, src_pad = batch["net_input"]["source"], batch["net_input"]["padding_mask"]
    layers = list(model.feat_target_layers)
    assert layers == [4, 8, 12]
    real = ~pad
    per_layer = []
    with torch.no_grad():
        for head, k in zip(model.feat_heads, layers):
            pred = head(states[-1]).double()  # DistilHuBERT: heads (MLPs) on the last layer
            target, _ = teacher.extract_features(src, padding_mask=src_pad, mask=False, output_layer=k)
            T = min(pred.shape[1], target.shape[1])
            pred, target = pred[:, :T][real[:, :T]], target[:, :T].double()[real[:, :T]]
            l1 = (pred - target).abs().mean(-1).mean()
            cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
            term = -torch.log(torch.sigmoid(cos)).mean()
            per_layer.append((l1 + cos_weight * term).item())
            assert log[f"feat_loss_L{k}"] / log["feat_frames"] == pytest.approx(per_layer[-1], rel=1e-5)
    feat = sum(per_layer) / len(per_layer)
    assert log["feat_loss"] / log["feat_frames"] == pytest.approx(feat, rel=1e-5)
    ssl = log["loss_m_0"] + log.get("loss_features_pen", 0.0)
    assert loss.item() == pytest.approx(ssl_weight * ssl + feat_weight * feat * sample_size, rel=1e-5)
    assert math.isfinite(loss.item()) and feat_weight * feat * sample_size > 0.01 * loss.item()

    # the states were the masked forward's: an unmasked forward gives other states (and other L_feat)
    with torch.no_grad():
        unmasked, _ = model.extract_features(src, padding_mask=src_pad, mask=False)
    assert unmasked.shape == states[-1].shape
    assert not torch.allclose(unmasked[real], states[-1][real], atol=1e-4)
    # (and the masked frames are where they differ most: the mask embedding replaced their input)
    gap = (unmasked - states[-1]).abs().mean(-1)
    assert gap[masked & real].mean() > gap[~masked & real].mean()


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


# ----------------------------------------------------------------------------- masking distillation (MaskHuBERT)

MASK_WEIGHTS = [0.1] * 11 + [1.0]


def test_masking_distillation_student_masked_teacher_clean_and_masked(feat_world):
    """maskdistil_narrow: one masked student forward; the teacher runs on the clean input and on the
    student's masks (its own mask embedding there); masked frames regress the clean teacher,
    unmasked frames the masked one; layers weighted 0.1 (1..11) and 1 (12), summed; padding left out."""
    task, model, crit = build(feat_cfg(feat_world, "maskdistil_narrow",
                                       ["task.pad_audio=true", "task.max_sample_size=40000"]))
    assert crit.layer_weights == MASK_WEIGHTS
    batch = batch_of(task)
    inputs = crit.model_inputs(batch)
    assert inputs["mask"] is True and "target_list" not in inputs  # masked input, no labels
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
        loss, sample_size, log = crit.compute_loss(model, out, batch)
        net = batch["net_input"]
        clean = hidden_states(crit.teacher, **net, output_layer=12)
        masked = hidden_states(crit.teacher, **net, output_layer=12, mask_indices=out["mask_indices"])
    mask, pad = out["mask_indices"], out["padding_mask"]
    real = ~pad
    n_real = int(real.sum())
    assert pad.any() and (mask & real).any() and (~mask & real).any() and sample_size == n_real
    # the teacher saw the student's masks, with its own mask embedding
    torch.testing.assert_close(masked.features[mask], crit.teacher.mask_emb.expand(int(mask.sum()), -1))
    assert torch.equal(masked.features[~mask], clean.features[~mask])
    expected, swapped = 0.0, 0.0
    for k, pred, w in zip(range(1, 13), out["feat_preds"], MASK_WEIGHTS):
        c, m = clean.layers[k - 1], masked.layers[k - 1]
        assert not torch.allclose(c[~mask & real], m[~mask & real])  # masking changes the unmasked frames' context
        sq_clean, sq_masked = ((pred - c) ** 2).mean(-1), ((pred - m) ** 2).mean(-1)
        masked_term = sq_clean[mask & real].sum().item() / n_real
        unmasked_term = sq_masked[~mask & real].sum().item() / n_real
        assert log[f"feat_masked_L{k}"] / n_real == pytest.approx(masked_term, rel=1e-5)
        assert log[f"feat_unmasked_L{k}"] / n_real == pytest.approx(unmasked_term, rel=1e-5)
        expected += w * (masked_term + unmasked_term)
        swapped += w * (sq_masked[mask & real].sum().item() + sq_clean[~mask & real].sum().item()) / n_real
    assert loss.item() == pytest.approx(expected * n_real, rel=1e-5)
    assert abs(swapped - expected) > 1e-3 * expected  # the two teachers' roles are not interchangeable


def test_masking_distillation_trains_every_head_and_logs_both_terms(feat_world):
    task, model, crit = build(feat_cfg(feat_world, "maskdistil_shallow_l6"))
    assert crit.target_layers == [6, 12] and crit.layer_weights == [0.1, 1.0]
    assert model.feat_student_layers == [1, 2]
    batch = batch_of(task)
    model.train()
    loss, _, log = crit(model, batch)
    loss.backward()
    assert {"feat_masked_L6", "feat_unmasked_L12", "feat_loss"} <= set(log) and "feat_mse_L6" not in log
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.feat_heads.parameters())
    assert model.mask_emb.grad is not None and model.mask_emb.grad.abs().sum() > 0  # masked frames reached the student


def test_masking_distillation_options_are_checked(feat_world):
    w = feat_world
    _fails(w, "criterion.mask_distil=true with criterion.feat_loss=l1_cos", name="maskdistil_narrow",
           extra=["criterion.feat_loss=l1_cos"])
    _fails(w, "criterion.feat_layer_weights has 2 entries", "model.feat_target_layers has 12", name="maskdistil_narrow",
           extra=["criterion.feat_layer_weights=[0.1,1.0]"])
    _fails(w, "must not be negative", name="maskdistil_narrow", extra=["criterion.unmasked_weight=-1"])
