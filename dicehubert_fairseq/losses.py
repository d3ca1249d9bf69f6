"""Loss maths of DiceHuBERT as pure functions (no fairseq, no module state).

Shapes: ``N`` selected frames, ``C`` classes (dictionary size), ``D`` projection dim,
``k`` kept soft-label classes per frame, ``B`` batch, ``T`` frames.
"""

import torch
import torch.nn.functional as F


def cosine_logits(x: torch.Tensor, embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """HuBERT's prediction logits: cosine similarity to every label embedding over a temperature.

    Equivalent to fairseq's ``HubertModel.compute_nce`` (whose cross-entropy with the positive
    in column 0 equals cross-entropy over all classes) but one matmul instead of a ``(C, N, D)``
    expansion.  Computed in float32 so it stays finite under fp16/bf16 autocast.

    Args:
        x: ``(N, D)`` projected encoder outputs.
        embeddings: ``(C, D)`` label embeddings.
        temperature: HuBERT's ``logit_temp`` (0.1).

    Returns:
        ``(N, C)`` float32 logits.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=1e-8)
        e = F.normalize(embeddings.float(), dim=-1, eps=1e-8)
        return (x @ e.t()) / temperature


def hard_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``(N, C)`` logits against ``(N,)`` class indices (0 if N == 0)."""
    if logits.numel() == 0:
        return logits.new_zeros(())
    return F.cross_entropy(logits.float(), target.long(), reduction="sum")


def soft_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``(N, C)`` logits against sparse target distributions.

    Args:
        logits: ``(N, C)``.
        ids: ``(N, k)`` class indices of each frame's kept classes.
        probs: ``(N, k)`` their probabilities (rows sum to 1; zeros allowed).

    Returns:
        ``-sum_n sum_j probs[n, j] * log_softmax(logits[n])[ids[n, j]]`` (a scalar, 0 if N == 0).
    """
    if logits.numel() == 0:
        return logits.new_zeros(())
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, ids.long())
    probs = probs.float()
    # 0 * -inf would be nan: classes with zero probability contribute nothing
    return -(torch.where(probs > 0, probs * picked, torch.zeros_like(picked))).sum()


def count_correct(logits: torch.Tensor, target: torch.Tensor) -> int:
    """Frames whose arg-max logit is the target class."""
    if logits.numel() == 0:
        return 0
    return int((logits.argmax(-1) == target).sum().item())


def _real_frames(pred: torch.Tensor, padding_mask) -> torch.Tensor:
    """``(B, T)`` bool, True on the frames that count (not padding)."""
    if padding_mask is None:
        return torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
    return ~padding_mask


def feature_mse_loss(pred: torch.Tensor, target: torch.Tensor, padding_mask) -> torch.Tensor:
    """FitHuBERT's per-layer loss: mean squared error, averaged over real frames and dimensions.

    FitHuBERT (``rec_loss_type: mse``, no cosine term) takes ``F.mse_loss(..., reduction="none")``
    over ``(B, N, T, D)`` and averages everything; per layer that is this mean, with padded
    frames left out.

    Args:
        pred: ``(B, T, D)`` student predictions.
        target: ``(B, T, D)`` teacher features (no gradient needed).
        padding_mask: ``(B, T)`` bool, True on padded frames (or None).

    Returns:
        scalar: ``sum over real frames t and dims d of (pred - target)^2 / (n_real * D)``.
    """
    pred, target = pred.float(), target.float()
    keep = _real_frames(pred, padding_mask)
    n = keep.sum().clamp(min=1)
    return (((pred - target) ** 2).mean(-1) * keep).sum() / n


def feature_distillation_loss(
    pred: torch.Tensor, target: torch.Tensor, padding_mask: torch.Tensor, cos_weight: float = 1.0
):
    """DistilHuBERT's per-layer loss, L1 + lambda * (-log sigmoid(cos)), averaged over real frames.

    Args:
        pred: ``(B, T, D)`` student predictions.
        target: ``(B, T, D)`` teacher features (no gradient needed).
        padding_mask: ``(B, T)`` bool, True on padded frames (or None).
        cos_weight: lambda.

    Returns:
        ``(loss, l1, cos_term)`` scalars, each a mean over non-padded frames (and dims for L1).
    """
    pred = pred.float()
    target = target.float()
    keep = _real_frames(pred, padding_mask)
    n = keep.sum().clamp(min=1)
    l1 = ((pred - target).abs().mean(-1) * keep).sum() / n
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    cos_term = (-F.logsigmoid(cos) * keep).sum() / n
    return l1 + cos_weight * cos_term, l1, cos_term


def masking_distillation_loss(
    pred: torch.Tensor,
    clean_target: torch.Tensor,
    masked_target: torch.Tensor,
    mask_indices: torch.Tensor,
    padding_mask,
    masked_weight: float = 1.0,
    unmasked_weight: float = 1.0,
):
    """MaskHuBERT's per-layer loss (masking distillation, "Recycle-and-Distill", Interspeech 2023).

    The student saw the masked input.  On its masked frames it regresses the teacher's features
    of the clean input; on its unmasked frames, the teacher's features of the same masked input
    (the teacher given the student's masks).  The frame loss is the squared error averaged over
    dimensions; each term sums it over its frames and divides by the number of real frames,
    masked and unmasked together (sungnyun/ARMHuBERT ``train.py``: ``mse_loss(...).mean(-1).sum()
    / B / T`` for each term, there with padded frames in ``T``).

    Args:
        pred: ``(B, T, D)`` student predictions (from the masked input).
        clean_target: ``(B, T, D)`` teacher features of the clean input.
        masked_target: ``(B, T, D)`` teacher features of the masked input.
        mask_indices: ``(B, T)`` bool, True on masked frames.
        padding_mask: ``(B, T)`` bool, True on padded frames (or None); left out of both terms
            and of the frame count.
        masked_weight, unmasked_weight: the weight of each term (published: 1 and 1).

    Returns:
        ``(loss, masked_term, unmasked_term)`` scalars, ``loss = masked_weight * masked_term +
        unmasked_weight * unmasked_term``.
    """
    pred = pred.float()
    keep = _real_frames(pred, padding_mask)
    n = keep.sum().clamp(min=1)
    masked = keep & mask_indices
    masked_term = (((pred - clean_target.float()) ** 2).mean(-1) * masked).sum() / n
    unmasked_term = (((pred - masked_target.float()) ** 2).mean(-1) * (keep & ~masked)).sum() / n
    return masked_weight * masked_term + unmasked_weight * unmasked_term, masked_term, unmasked_term
