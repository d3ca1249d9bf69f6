"""Criterion ``dicehubert``: HuBERT masked prediction on hard and/or soft teacher labels."""

import logging
import math
from dataclasses import dataclass, field
from typing import List

import torch

from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.hubert_criterion import HubertCriterionConfig
from fairseq.logging import metrics

from ..losses import count_correct, hard_cross_entropy, soft_cross_entropy

logger = logging.getLogger(__name__)


@dataclass
class DiceHubertCriterionConfig(HubertCriterionConfig):
    """fairseq's ``hubert`` criterion config (``pred_masked_weight``, ``pred_nomask_weight``,
    ``loss_weights``, ``log_keys``), with HuBERT's feature-penalty weight as the default and one
    weight per label stream."""

    loss_weights: List[float] = field(
        default_factory=lambda: [10.0],
        metadata={"help": "weights of the model's extra losses (HuBERT: the feature penalty)"},
    )
    label_weights: List[float] = field(
        default_factory=list,
        metadata={"help": "one weight per label stream (task.labels order); empty means 1 each"},
    )


def loss_scaled(model) -> bool:
    """True when fairseq trains with a dynamic loss scaler (``common.fp16`` or ``common.amp``)."""
    p = next(model.parameters(), None)
    if p is not None and p.dtype == torch.float16:
        return True  # fp16: fairseq casts the model to half
    try:
        return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
    except (TypeError, AttributeError):  # torch < 2.4
        return torch.is_autocast_enabled()


def check_finite(loss: torch.Tensor, sample, scaled: bool = False) -> None:
    """Report a non-finite ``loss`` with the batch's utterances (audio paths and dataset indices).

    Raises ``FloatingPointError`` -- except under fp16/AMP loss scaling (``scaled``), where fairseq
    treats non-finite gradients as an overflow (skips the batch, lowers the scale, and stops at
    ``common.min_loss_scale``): there the utterances are logged as a warning instead.
    """
    if torch.isfinite(loss).all():
        return
    ids = sample["id"].tolist() if "id" in sample else []
    names = sample.get("utt_names")
    what = f"utterances {names} (dataset indices {ids})" if names else f"dataset indices {ids}"
    msg = f"non-finite loss ({loss.item()}) on the batch of {what}"
    if scaled:
        logger.warning(msg + "; fairseq's loss scaler will skip this batch")
        return
    raise FloatingPointError(msg)


@register_criterion("dicehubert", dataclass=DiceHubertCriterionConfig)
class DiceHubertCriterion(FairseqCriterion):
    """Cross-entropy of the student's cosine logits against teacher cluster ids.

    One model call (:meth:`forward`), one loss (:meth:`compute_loss`): a subclass changes the
    loss or the model's inputs, never the call (fairseq's translation_moe criterion does the same).

    Hard streams: cross-entropy with the cluster id (exactly HuBERT's loss).  Soft streams:
    cross-entropy with the temperature-scaled distribution over clusters.  Loss on masked
    frames weighs ``pred_masked_weight``, on unmasked ones ``pred_nomask_weight``; each stream
    weighs ``label_weights[i]``; the feature penalty weighs ``loss_weights[0]``.
    """

    def __init__(self, cfg: DiceHubertCriterionConfig, task):
        super().__init__(task)
        self.cfg = cfg
        n = len(task.cfg.labels)
        if cfg.label_weights and len(cfg.label_weights) != n:
            raise ValueError(
                f"criterion.label_weights has {len(cfg.label_weights)} entries but task.labels has {n} streams"
            )
        self.label_weights = list(cfg.label_weights) if cfg.label_weights else [1.0] * n

    def stream_loss(self, net_output, tag: str, logging_output: dict) -> torch.Tensor:
        total = 0.0
        logits_list = net_output[f"logit_{tag}_list"]
        for i, (logits, target, soft) in enumerate(
            zip(logits_list, net_output[f"target_{tag}_list"], net_output[f"soft_{tag}_list"])
        ):
            if logits is None:
                continue
            if soft is None:
                loss = hard_cross_entropy(logits, target)
            else:
                loss = soft_cross_entropy(logits, soft[0], soft[1])
            total = total + self.label_weights[i] * loss
            logging_output[f"loss_{tag}_{i}"] = loss.detach().item()
            with torch.no_grad():
                logging_output[f"correct_{tag}_{i}"] = count_correct(logits, target)
                logging_output[f"count_{tag}_{i}"] = int(target.numel())
        return total

    def forward(self, model, sample, reduce=True):
        """Run the model once on :meth:`model_inputs`, then :meth:`compute_loss` on its output."""
        net_output = model(**self.model_inputs(sample))  # through model(...): a DDP wrapper sees the forward
        loss, sample_size, logging_output = self.compute_loss(model, net_output, sample)
        check_finite(loss, sample, scaled=loss_scaled(model))
        for key in self.cfg.log_keys:  # as fairseq's hubert criterion: net_output values to log
            if key in net_output:
                logging_output[key] = float(net_output[key])
        logging_output.update(
            loss=loss.item(),
            ntokens=sample_size,
            nsentences=sample["id"].numel(),
            sample_size=sample_size,
        )
        return loss, sample_size, logging_output

    def model_inputs(self, sample) -> dict:
        """Keyword arguments of the model call: the batch's ``net_input`` and its label streams."""
        return dict(sample["net_input"], target_list=sample["target_list"],
                    soft_target_list=sample.get("soft_target_list"))

    def compute_loss(self, model, net_output, sample):
        """L_SSL of one model output.

        Returns:
            ``(loss, sample_size, logging_output)``: the loss summed over ``sample_size`` frames
            (masked, plus unmasked if ``pred_nomask_weight > 0``) with the weighted feature
            penalty; per stream ``i``, ``loss_m_i``, ``correct_m_i``, ``count_m_i`` (``_u_`` for
            unmasked frames, logged also when ``pred_nomask_weight`` is 0, as fairseq's ``hubert``
            criterion does) and ``loss_features_pen``.
        """
        logging_output = {}
        loss = 0.0
        sample_size = 0
        if self.cfg.pred_masked_weight > 0:
            loss = loss + self.cfg.pred_masked_weight * self.stream_loss(net_output, "m", logging_output)
            sample_size += int(net_output["target_m_list"][0].numel()) if net_output["target_m_list"][0] is not None else 0
        if self.cfg.pred_nomask_weight > 0:
            loss = loss + self.cfg.pred_nomask_weight * self.stream_loss(net_output, "u", logging_output)
            sample_size += int(net_output["target_u_list"][0].numel()) if net_output["target_u_list"][0] is not None else 0
        elif net_output.get("logit_u_list"):
            with torch.no_grad():  # not in the loss, logged as fairseq's hubert criterion does
                self.stream_loss(net_output, "u", logging_output)
        if not torch.is_tensor(loss):
            loss = net_output["features_pen"].new_zeros(())
        extra, names = model.get_extra_losses(net_output)
        weights = list(self.cfg.loss_weights)
        if len(weights) == 1 and len(extra) > 1:
            weights = weights * len(extra)
        for p, name, coef in zip(extra, names, weights):
            if coef != 0 and p is not None:
                p = coef * p.float() * sample_size
                loss = loss + p
                logging_output[f"loss_{name}"] = p.item()
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        denom = max(sample_size, 1)
        metrics.log_scalar("loss", loss_sum / denom / math.log(2), sample_size, round=3)
        keys = set().union(*(log.keys() for log in logging_outputs)) if logging_outputs else set()
        for key in sorted(keys):
            if key.startswith("loss_"):
                val = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(key, val / denom / math.log(2), sample_size, round=3)
            elif key.startswith("count_"):  # fairseq's hubert criterion: count_m_i, and correct_m_i = accuracy
                count = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(key, count)
                if count > 0:
                    correct = sum(log.get("correct_" + key[len("count_"):], 0) for log in logging_outputs)
                    metrics.log_scalar("correct_" + key[len("count_"):], correct / count, count, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False
