"""Loss maths against hand-computed values and against fairseq's own formulation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.losses import (
    count_correct, cosine_logits, feature_distillation_loss, feature_mse_loss, hard_cross_entropy,
    masking_distillation_loss, soft_cross_entropy,
)


X = torch.tensor([[1.0, 0.0]])


E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


LOGITS = [10.0, 0.0, 10.0 / math.sqrt(2.0)]


LSE = 10.0 + math.log(1.0 + math.exp(-10.0) + math.exp(10.0 / math.sqrt(2.0) - 10.0))


def test_cosine_logits_hand_values():
    got = cosine_logits(X, E, 0.1)
    assert got.shape == (1, 3) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), LOGITS, rtol=1e-6)


def test_hard_cross_entropy_hand_value():
    logits = torch.tensor([LOGITS])
    assert hard_cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(LSE - 10.0, rel=1e-6)
    assert hard_cross_entropy(logits, torch.tensor([1])).item() == pytest.approx(LSE, rel=1e-6)


def test_soft_cross_entropy_hand_value():
    logits = torch.tensor([LOGITS])
    ids = torch.tensor([[0, 2]])
    probs = torch.tensor([[0.75, 0.25]])
    expected = 0.75 * (LSE - LOGITS[0]) + 0.25 * (LSE - LOGITS[2])
    assert soft_cross_entropy(logits, ids, probs).item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_one_hot_equals_hard():
    torch.manual_seed(0)
    logits = torch.randn(7, 11)
    target = torch.randint(0, 11, (7,))
    ids = torch.stack([target, (target + 1) % 11], dim=1)
    probs = torch.tensor([[1.0, 0.0]]).expand(7, 2)
    assert soft_cross_entropy(logits, ids, probs).item() == pytest.approx(
        hard_cross_entropy(logits, target).item(), rel=1e-6
    )


def test_zero_probability_on_minus_inf_logit_is_finite():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    loss = soft_cross_entropy(logits, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_empty_selection_gives_zero():
    empty = torch.zeros(0, 5)
    assert hard_cross_entropy(empty, torch.zeros(0, dtype=torch.long)).item() == 0.0
    assert soft_cross_entropy(empty, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)).item() == 0.0
    assert count_correct(empty, torch.zeros(0, dtype=torch.long)) == 0


def test_matches_fairseq_compute_nce():
    """CE over all classes == fairseq HubertModel.compute_nce's CE with the positive in column 0."""
    from fairseq.models.hubert.hubert import HubertModel

    torch.manual_seed(1)
    x, embs = torch.randn(13, 8), torch.randn(6, 8)
    target = torch.randint(0, 6, (13,))
    fake = type("M", (), {"logit_temp": 0.1})()
    negs = embs.unsqueeze(1).expand(-1, 13, -1)
    nce = HubertModel.compute_nce(fake, x, embs[target], negs)
    fairseq_loss = F.cross_entropy(nce, torch.zeros(13, dtype=torch.long), reduction="sum")
    ours = hard_cross_entropy(cosine_logits(x, embs, 0.1), target)
    assert ours.item() == pytest.approx(fairseq_loss.item(), rel=1e-5)
    assert count_correct(cosine_logits(x, embs, 0.1), target) == int(
        (nce.argmax(-1) == 0).sum()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cosine_logits_finite_under_cpu_autocast(dtype):
    x = torch.randn(4, 8) * 1e4
    with torch.autocast("cpu", dtype=dtype):
        out = cosine_logits(x, torch.randn(5, 8), 0.1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.abs().max() <= 10.0 + 1e-4


def test_feature_distillation_hand_value_and_padding():
    pred = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])
    target = torch.tensor([[[0.0, 1.0], [-7.0, 3.0]]])
    pad = torch.tensor([[False, True]])
    loss, l1, cos = feature_distillation_loss(pred, target, pad, cos_weight=1.0)
    # only frame 0 counts: L1 = mean(|1|, |-1|) = 1; cos = 0 -> -log sigmoid(0) = log 2
    assert l1.item() == pytest.approx(1.0)
    assert cos.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert loss.item() == pytest.approx(1.0 + math.log(2.0), rel=1e-6)
    # changing a padded frame changes nothing
    target2 = target.clone()
    target2[0, 1] = 1e6
    assert feature_distillation_loss(pred, target2, pad)[0].item() == pytest.approx(loss.item())


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


def test_feature_mse_loss_hand_values_and_padding():
    # frame 1: equal (0); frame 2: squared errors 0 and 4 -> mean 2; frame 3: padding
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [0.0, -1.0], [-5.0, 3.0]]])
    pad = torch.tensor([[False, False, True]])
    loss = feature_mse_loss(pred, target, pad)
    assert loss.item() == pytest.approx((0.0 + 2.0) / 2)
    loss.backward()
    assert torch.equal(pred.grad[0, 2], torch.zeros(2))  # the padded frame gets no gradient
    # d/dpred of mean over 2 frames x 2 dims of (pred - target)^2: 2 * (pred - target) / 4
    assert torch.allclose(pred.grad[0, 1], torch.tensor([0.0, 1.0]))
    # without the mask the padded frame counts: (0 + 2 + (105^2 + 97^2) / 2) / 3
    assert feature_mse_loss(pred.detach(), target, None).item() == pytest.approx((2.0 + (105 ** 2 + 97 ** 2) / 2) / 3)


def test_feature_mse_loss_has_no_cosine_term():
    """FitHuBERT's loss is the squared distance alone: a prediction in the teacher's direction
    but twice as long costs its squared error; L1 + cos would add -log sigmoid(1) on top."""
    target = torch.tensor([[[3.0, 4.0]]])
    assert feature_mse_loss(2 * target, target, None).item() == pytest.approx((9.0 + 16.0) / 2)
    assert feature_mse_loss(target, target, None).item() == 0.0
    l1_cos = feature_distillation_loss(target, target, None)[0].item()
    assert l1_cos == pytest.approx(math.log1p(math.exp(-1.0)))  # not 0: the cosine term never vanishes


def test_feature_mse_loss_matches_fithubert_reduction_without_padding():
    """FitHuBERT: ``F.mse_loss(pred, target, reduction="none")`` over ``(B, N, T, D)``, then ``.mean()``:
    with no padding, the mean over N layers of this per-layer loss."""
    g = torch.Generator().manual_seed(0)
    preds, targets = torch.randn(3, 2, 7, 5, generator=g), torch.randn(3, 2, 7, 5, generator=g)  # N, B, T, D
    ours = torch.stack([feature_mse_loss(p, t, None) for p, t in zip(preds, targets)]).mean()
    fithubert = F.mse_loss(preds.transpose(0, 1), targets.transpose(0, 1), reduction="none").mean()
    assert ours.item() == pytest.approx(fithubert.item(), rel=1e-6)


DTYPES = [torch.float16, torch.bfloat16]


def _extreme_inputs(dtype_in=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 16, generator=g) * 1e4   # representable in fp16, but |x|^2 and x @ e.t() are not
    e = torch.randn(9, 16, generator=g) * 1e4
    if dtype_in == torch.float32:  # autocast with fp32 inputs (AMP / bf16 autocast, fp32 parameters)
        x[1] = 0.0                 # a zero vector (normalisation eps)
        x[2] = 1e-30               # underflows if cast to fp16/bf16
        e[3] = 0.0
    else:  # inputs already half (fairseq fp16 casts the model): tiny but representable rows.  (An
        # exactly-zero half vector has a 1/eps = 1e8 gradient, which fp16 cannot hold -- as in
        # fairseq's own compute_nce; the fp16 loss scaler skips such a batch.)
        x[1] = 1e-3
        e[3] = 1e-3
    return x.to(dtype_in).requires_grad_(), e.to(dtype_in).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input_dtype", ["float32", "same"])
def test_hard_and_soft_cross_entropy_finite_under_autocast(dtype, input_dtype):
    x, e = _extreme_inputs(torch.float32 if input_dtype == "float32" else dtype)
    target = torch.tensor([0, 3, 8, 1, 2, 3])
    ids = torch.tensor([[0, 3, 5]] * 6)
    probs = torch.tensor([[0.7, 0.3, 0.0]] * 6)  # a zero probability too
    with torch.autocast("cpu", dtype=dtype):
        logits = cosine_logits(x, e, 0.1)
        hard = hard_cross_entropy(logits, target)
        soft = soft_cross_entropy(logits, ids, probs)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert logits.abs().max() <= 1 / 0.1 + 1e-4  # cosines over the temperature
    for loss in (hard, soft):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (hard + soft).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(e.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_cross_entropy_matches_fp32_under_autocast(dtype):
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(50, 16, generator=g), torch.randn(12, 16, generator=g)
    ids = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(50)])
    probs = torch.softmax(torch.randn(50, 4, generator=g), -1)
    ref = soft_cross_entropy(cosine_logits(x, e, 0.1), ids, probs)
    with torch.autocast("cpu", dtype=dtype):
        got = soft_cross_entropy(cosine_logits(x.to(dtype), e.to(dtype), 0.1), ids, probs.to(dtype))
    tol = 1e-2 if dtype == torch.float16 else 5e-2  # only the inputs' rounding differs
    assert torch.isfinite(got) and abs(got.item() - ref.item()) / ref.item() < tol


def test_soft_cross_entropy_with_extreme_logits_is_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-math.inf, 0.0, 1.0]], requires_grad=True)
    ids = torch.tensor([[1, 0], [0, 2]])
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = soft_cross_entropy(logits, ids, probs)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(2e4 + (1 - math.log(math.e + 1)) * -1, rel=1e-4)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_masking_distillation_hand_values_and_padding():
    """MaskHuBERT's loss: masked frames against the clean teacher, unmasked against the masked
    teacher, each summed over its frames and divided by all real frames; padding left out.

    One utterance of 4 frames (D = 2), frame 3 padding, frame 1 masked:
    pred = [[1, 1], [2, 0], [0, 0], [9, 9]], clean = [[0, 1], [0, 0], [1, 1], [0, 0]],
    masked teacher = [[1, 3], [5, 5], [0, 2], [0, 0]].
    Masked term: frame 1 vs clean: ((2-0)^2 + 0^2) / 2 = 2, over 3 real frames: 2/3.
    Unmasked term: frame 0 vs masked: (0 + 2^2) / 2 = 2; frame 2: (0 + 2^2) / 2 = 2: 4/3.
    (Frame 1 against the masked teacher would add ((2-5)^2 + 5^2) / 2 = 17, frame 0 against the
    clean teacher 1/2: the targets are not swapped.)
    """
    pred = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    clean = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    masked_teacher = torch.tensor([[[1.0, 3.0], [5.0, 5.0], [0.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[False, True, False, False]])
    pad = torch.tensor([[False, False, False, True]])
    loss, m, u = masking_distillation_loss(pred, clean, masked_teacher, mask, pad)
    assert m.item() == pytest.approx(2 / 3) and u.item() == pytest.approx(4 / 3)
    assert loss.item() == pytest.approx(2.0)
    weighted, m2, u2 = masking_distillation_loss(pred, clean, masked_teacher, mask, pad, 3.0, 0.5)
    assert (m2.item(), u2.item()) == (pytest.approx(2 / 3), pytest.approx(4 / 3))
    assert weighted.item() == pytest.approx(3.0 * 2 / 3 + 0.5 * 4 / 3)
    # a masked padded frame is still padding: nothing changes
    assert masking_distillation_loss(pred, clean, masked_teacher, mask | pad, pad)[0].item() == pytest.approx(2.0)
    # no padding mask: frame 3 counts as unmasked, (81 + 81) / 2 = 81 more, over 4 frames
    loss_all, m_all, u_all = masking_distillation_loss(pred, clean, masked_teacher, mask, None)
    assert m_all.item() == pytest.approx(2 / 4) and u_all.item() == pytest.approx((4 + 81) / 4)


def test_masking_distillation_is_mse_when_both_teachers_agree():
    """With one target for both terms and weights 1 it is FitHuBERT's MSE over real frames."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.5
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    loss, _, _ = masking_distillation_loss(pred, target, target, mask, pad)
    assert loss.item() == pytest.approx(feature_mse_loss(pred, target, pad).item(), rel=1e-6)
