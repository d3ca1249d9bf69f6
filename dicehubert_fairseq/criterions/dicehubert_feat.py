"""Criterion ``dicehubert_feat``: feature distillation (L_feat) from a frozen HuBERT teacher.

The paper's baseline and its combination with DiceHuBERT's objective:

* ``ssl_weight: 0`` -- L_feat alone (DistilHuBERT / FitHuBERT): the student sees the unmasked
  waveform; each of its prediction heads (``model.feat_target_layers``) regresses one teacher
  layer, averaged over non-padded frames, with ``feat_loss``: ``mse`` (FitHuBERT,
  :func:`~dicehubert_fairseq.losses.feature_mse_loss`) or ``l1_cos``, L1 + lambda * (-log sigmoid(cos))
  (DistilHuBERT, :func:`~dicehubert_fairseq.losses.feature_distillation_loss`).  No labels are
  needed (``task.labels: []``).
* ``ssl_weight > 0`` -- L_SSL + ``feat_weight`` * L_feat: one student forward with span
  masking gives both the ``dicehubert`` criterion's masked prediction loss (computed by that
  criterion's own code) and the layer states the heads read, so on masked frames the student
  predicts the teacher's features of the *unmasked* input.
* ``mask_distil: true`` -- masking distillation (MaskHuBERT, "Recycle-and-Distill"): the student
  sees the masked input, the teacher the clean input *and* the same masked input (its own mask
  embedding on the student's masked frames); masked frames regress the clean teacher, unmasked
  frames the masked teacher, each term weighted (``masked_weight``, ``unmasked_weight``) and
  divided by the real frames (:func:`~dicehubert_fairseq.losses.masking_distillation_loss`).

L_feat is ``sum_k feat_layer_weights[k] * loss_k`` over the target layers; an empty
``feat_layer_weights`` is the mean over them.

The teacher is loaded once (``teacher_checkpoint``), in eval mode with every parameter
frozen, and moved to the student's device and dtype at the first batch.  It is held in a
plain Python object, not as a submodule: it is not in ``criterion.state_dict()`` (fairseq
saves a criterion's state into every checkpoint when it has parameters), not in the model's,
and fairseq's ``criterion.half()`` / ``.to(device)`` never touch it.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II, MISSING

from ..checkpoint import load_model
from ..errors import InputError
from ..frames import conv_layers, frame_stride
from ..hidden_states import hidden_states
from ..losses import feature_distillation_loss, feature_mse_loss, masking_distillation_loss
from .dicehubert import DiceHubertCriterion, DiceHubertCriterionConfig

logger = logging.getLogger(__name__)

#: Per-layer L_feat: ``mse`` (FitHuBERT), ``l1_cos`` (DistilHuBERT: L1 + cos_weight * (-log sigmoid(cos))).
FEAT_LOSS_CHOICES = ChoiceEnum(["mse", "l1_cos"])


@dataclass
class DiceHubertFeatCriterionConfig(DiceHubertCriterionConfig):
    teacher_checkpoint: str = field(
        default=MISSING,
        metadata={"help": "frozen fairseq HuBERT-family checkpoint (e.g. hubert_base_ls960.pt) run on the fly"},
    )
    ssl_weight: float = field(
        default=0.0,
        metadata={"help": "weight of L_SSL (the dicehubert criterion's loss); 0: L_feat alone, unmasked "
                          "input, no labels needed"},
    )
    feat_weight: float = field(default=1.0, metadata={"help": "weight of L_feat"})
    feat_loss: FEAT_LOSS_CHOICES = field(
        default="mse",
        metadata={"help": "per-layer feature loss, averaged over non-padded frames: mse (FitHuBERT: mean "
                          "squared error, no cosine term) or l1_cos (DistilHuBERT: L1 + cos_weight * "
                          "(-log sigmoid(cos)))"},
    )
    cos_weight: float = field(
        default=1.0, metadata={"help": "lambda of l1_cos, L1 + lambda * (-log sigmoid(cos)) (DistilHuBERT: 1); "
                                       "unused by mse"}
    )
    feat_layer_weights: List[float] = field(
        default_factory=list,
        metadata={"help": "one weight per target layer: L_feat = sum of weight x layer loss (MaskHuBERT: 0.1 "
                          "for every layer but the last, 1 for the last); empty: the mean over target layers"},
    )
    mask_distil: bool = field(
        default=False,
        metadata={"help": "masking distillation (MaskHuBERT): the student sees the masked input (span masks of "
                          "model.mask_*); masked frames regress the teacher's features of the clean input, "
                          "unmasked frames the teacher's features of the same masked input; needs feat_loss=mse"},
    )
    masked_weight: float = field(
        default=1.0, metadata={"help": "mask_distil: weight of the masked frames' term (MaskHuBERT: 1)"}
    )
    unmasked_weight: float = field(
        default=1.0, metadata={"help": "mask_distil: weight of the unmasked frames' term (MaskHuBERT: 1)"}
    )
    target_layers: List[int] = field(
        default=II("model.feat_target_layers"),
        metadata={"help": "teacher layers predicted (linked to model.feat_target_layers)"},
    )
    teacher_dim: int = field(
        default=II("model.feat_teacher_dim"),
        metadata={"help": "teacher hidden size the heads predict (linked to model.feat_teacher_dim)"},
    )
    student_conv_feature_layers: str = field(
        default=II("model.conv_feature_layers"),
        metadata={"help": "the student's conv front end (linked), to check the frame rates match"},
    )
    normalize: bool = field(
        default=II("task.normalize"),
        metadata={"help": "whether the task normalises waveforms (linked to task.normalize)"},
    )


class _Frozen:
    """Holds a module outside any ``nn.Module`` tree (never registered, saved or cast)."""

    __slots__ = ("module",)

    def __init__(self, module: torch.nn.Module):
        self.module = module


def check_teacher(path: str, n_layers: int, dim: int, conv_feature_layers: str, normalize: bool,
                  target_layers: List[int], teacher_dim: int, student_conv_feature_layers: str,
                  task_normalize: bool) -> None:
    """Everything that keeps a teacher from serving the requested targets, as one error.

    Args:
        path: the teacher checkpoint (named in the messages).
        n_layers, dim, conv_feature_layers, normalize: the teacher's depth, hidden size, conv
            front end and whether it was trained on normalised waveforms.
        target_layers, teacher_dim, student_conv_feature_layers, task_normalize: what the
            student's config asks for.

    Raises:
        InputError: one line per problem.
    """
    problems = []
    bad = [k for k in target_layers if not 1 <= k <= n_layers]
    if not target_layers:
        problems.append(f"{path}: model.feat_target_layers is empty: nothing to distil (e.g. [4,8,12] for "
                        f"DistilHuBERT-style heads, [1,...,12] for layer-to-layer)")
    elif bad:
        problems.append(f"{path}: the teacher has transformer layers 1..{n_layers}, it cannot serve target "
                        f"layer(s) {bad} of model.feat_target_layers={list(target_layers)}")
    if int(dim) != int(teacher_dim):
        problems.append(f"{path}: the teacher's hidden size is {dim}, but model.feat_teacher_dim={teacher_dim} "
                        f"(set model.feat_teacher_dim={dim})")
    t_stride = frame_stride(conv_layers(conv_feature_layers))
    s_stride = frame_stride(conv_layers(student_conv_feature_layers))
    if t_stride != s_stride:
        problems.append(f"{path}: the teacher's frames are {t_stride} samples apart, the student's "
                        f"{s_stride} samples apart (model.conv_feature_layers): L_feat needs frame-aligned "
                        f"student and teacher")
    if bool(normalize) != bool(task_normalize):
        problems.append(f"{path}: the teacher was trained with task.normalize={bool(normalize)}, this task has "
                        f"task.normalize={bool(task_normalize)}: student and teacher read the same waveform, "
                        f"set task.normalize={bool(normalize)}")
    if problems:
        raise InputError(problems)


def check_feat_options(kind: str, target_layers: List[int], layer_weights: List[float], mask_distil: bool,
                       masked_weight: float, unmasked_weight: float) -> List[float]:
    """The loss options, checked together; returns the weight of each target layer.

    Raises:
        InputError: one line per problem (an unknown ``feat_loss``, a weight list of the wrong
            length, a negative weight, masking distillation with another loss than MSE).
    """
    problems = []
    if kind not in ("mse", "l1_cos"):  # a plain string from a hand-made config
        problems.append(f"criterion.feat_loss={kind}: expected mse or l1_cos")
    if layer_weights and len(layer_weights) != len(target_layers):
        problems.append(f"criterion.feat_layer_weights has {len(layer_weights)} entries but model.feat_target_layers "
                        f"has {len(target_layers)} ({list(target_layers)}): one weight per target layer, or none")
    if any(w < 0 for w in list(layer_weights) + [masked_weight, unmasked_weight]):
        problems.append(f"criterion.feat_layer_weights={list(layer_weights)}, masked_weight={masked_weight}, "
                        f"unmasked_weight={unmasked_weight}: weights must not be negative")
    if mask_distil and kind != "mse":
        problems.append(f"criterion.mask_distil=true with criterion.feat_loss={kind}: masking distillation is "
                        f"MaskHuBERT's mean squared error (set criterion.feat_loss=mse)")
    if problems:
        raise InputError(problems)
    return [float(w) for w in layer_weights] or [1.0 / max(len(target_layers), 1)] * len(target_layers)


@register_criterion("dicehubert_feat", dataclass=DiceHubertFeatCriterionConfig)
class DiceHubertFeatCriterion(DiceHubertCriterion):
    """L_feat (feature distillation from a frozen teacher), alone or added to L_SSL.

    Logged per target layer ``k``, each averaged over non-padded frames: ``feat_loss_L{k}``, and
    its terms: ``feat_mse_L{k}`` (``feat_loss: mse``), ``feat_l1_L{k}`` and ``feat_cos_L{k}``
    (the -log sigmoid(cos) term, ``feat_loss: l1_cos``) or ``feat_masked_L{k}`` and
    ``feat_unmasked_L{k}`` (``mask_distil``); ``feat_loss`` is L_feat, the layers' losses weighted
    by ``feat_layer_weights`` (empty: their mean).
    """

    def __init__(self, cfg: DiceHubertFeatCriterionConfig, task):
        super().__init__(cfg, task)
        if cfg.ssl_weight > 0 and not task.cfg.labels:
            raise InputError(["criterion.ssl_weight > 0 needs label streams, but task.labels is empty"])
        path = cfg.teacher_checkpoint
        teacher, tcfg = load_model(path)  # eval mode, every parameter frozen
        check_teacher(path, len(teacher.encoder.layers), teacher.encoder.embedding_dim,
                      tcfg.model.conv_feature_layers, tcfg.task.get("normalize", False),
                      list(cfg.target_layers), cfg.teacher_dim, cfg.student_conv_feature_layers, cfg.normalize)
        self.target_layers = list(cfg.target_layers)
        self._teacher = _Frozen(teacher)
        self.feat_loss_kind = str(cfg.feat_loss)
        self.layer_weights = check_feat_options(self.feat_loss_kind, self.target_layers, list(cfg.feat_layer_weights),
                                                bool(cfg.mask_distil), cfg.masked_weight, cfg.unmasked_weight)
        mode = "masking distillation, " if cfg.mask_distil else ""
        logger.info(f"teacher {path}: layers {self.target_layers} -> L_feat ({mode}{self.feat_loss_kind}, layer "
                    f"weights {self.layer_weights}, ssl_weight={cfg.ssl_weight}, feat_weight={cfg.feat_weight}); "
                    f"kept out of checkpoints")

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher (not a submodule of this criterion)."""
        return self._teacher.module

    def _place_teacher(self, model) -> torch.nn.Module:
        """The teacher on the student's device and dtype (moved once, at the first batch)."""
        ref = next(model.parameters())
        teacher = self._teacher.module
        p = next(teacher.parameters())
        if p.device != ref.device or p.dtype != ref.dtype:
            self._teacher.module = teacher = teacher.to(device=ref.device, dtype=ref.dtype)
        return teacher

    @torch.no_grad()
    def teacher_states(self, model, source, padding_mask, mask_indices=None) -> List[torch.Tensor]:
        """``(B, T, D_teacher)`` teacher outputs of every ``target_layers`` entry (no gradient).

        Args:
            mask_indices: ``(B, T)`` bool, the student's masked frames: the teacher sees them
                masked too (its own ``mask_emb``), as masking distillation's masked teacher;
                None: the clean input.
        """
        teacher = self._place_teacher(model)
        teacher.eval()
        layers = hidden_states(teacher, source, padding_mask, output_layer=max(self.target_layers),
                               mask_indices=mask_indices).layers
        return [layers[k - 1] for k in self.target_layers]

    def layer_loss(self, pred, target, padding_mask, masked=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One target layer's loss (``criterion.feat_loss``) and its logged terms.

        Args:
            pred, target: ``(B, T, D_teacher)`` student prediction and teacher features (of the
                clean input).
            padding_mask: ``(B, T)`` bool, True on padding (left out of every mean).
            masked: masking distillation only: ``(masked_target, mask_indices)``, the teacher's
                ``(B, T, D_teacher)`` features of the masked input and the ``(B, T)`` masks.

        Returns:
            ``(loss, terms)``: the scalar loss and ``{"mse": ...}``, ``{"l1": ..., "cos": ...}`` or
            (masking distillation) ``{"masked": ..., "unmasked": ...}``.
        """
        if masked is not None:
            loss, m, u = masking_distillation_loss(pred, target, masked[0], masked[1], padding_mask,
                                                   self.cfg.masked_weight, self.cfg.unmasked_weight)
            return loss, {"masked": m, "unmasked": u}
        if self.feat_loss_kind == "mse":
            loss = feature_mse_loss(pred, target, padding_mask)
            return loss, {"mse": loss}
        loss, l1, cos = feature_distillation_loss(pred, target, padding_mask, self.cfg.cos_weight)
        return loss, {"l1": l1, "cos": cos}

    def feat_loss(self, model, preds, padding_mask, sample, logging_output, mask_indices=None):
        """The per-layer distillation losses weighted by ``feat_layer_weights`` (empty: their mean);
        logs every layer's terms.

        Args:
            preds: the student's ``(B, T, D_teacher)`` predictions, one per target layer.
            padding_mask: ``(B, T)`` the student's frame padding.
            mask_indices: ``(B, T)`` the student's masked frames (masking distillation), or None.
        """
        net_input = sample["net_input"]
        source, source_padding = net_input["source"], net_input.get("padding_mask")
        targets = self.teacher_states(model, source, source_padding)
        masked_targets = None
        if self.cfg.mask_distil:
            masked_targets = self.teacher_states(model, source, source_padding, mask_indices=mask_indices)
        T = min(preds[0].size(1), targets[0].size(1))  # the SSL path trims frames to the labels
        padding_mask = padding_mask[:, :T]
        n_frames = int((~padding_mask).sum().item())
        total = 0.0
        for i, (k, pred, target, weight) in enumerate(zip(self.target_layers, preds, targets, self.layer_weights)):
            masked = None if masked_targets is None else (masked_targets[i][:, :T], mask_indices[:, :T])
            loss, terms = self.layer_loss(pred[:, :T], target[:, :T], padding_mask, masked)
            total = total + weight * loss
            logging_output[f"feat_loss_L{k}"] = loss.item() * n_frames
            for name, value in terms.items():
                logging_output[f"feat_{name}_L{k}"] = value.item() * n_frames
        logging_output["feat_loss"] = total.item() * n_frames
        logging_output["feat_frames"] = n_frames
        return total, n_frames

    def model_inputs(self, sample) -> dict:
        if self.cfg.ssl_weight > 0:  # one masked forward serves L_SSL and L_feat
            return super().model_inputs(sample)
        # L_feat alone, no labels: unmasked input, or the masked input of masking distillation
        return dict(sample["net_input"], mask=bool(self.cfg.mask_distil))

    def compute_loss(self, model, net_output, sample):
        """``ssl_weight`` * L_SSL + ``feat_weight`` * L_feat of one model output.

        L_feat, a mean over frames, is scaled by ``sample_size`` like L_SSL's sum: the masked
        frames with L_SSL, the non-padded frames alone.
        """
        logging_output = {}
        if self.cfg.ssl_weight > 0:
            ssl_loss, sample_size, logging_output = super().compute_loss(model, net_output, sample)
        feat, n_frames = self.feat_loss(model, net_output["feat_preds"], net_output["padding_mask"], sample,
                                        logging_output, net_output["mask_indices"])
        if self.cfg.ssl_weight > 0:
            loss = self.cfg.ssl_weight * ssl_loss + self.cfg.feat_weight * feat * sample_size
        else:
            sample_size = n_frames  # summed over frames, as fairseq's other criteria: sum / sample_size
            loss = self.cfg.feat_weight * feat * n_frames
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        DiceHubertCriterion.reduce_metrics(logging_outputs)
        frames = sum(log.get("feat_frames", 0) for log in logging_outputs)
        if frames == 0:
            return
        keys = set().union(*(log.keys() for log in logging_outputs))
        for key in sorted(keys):
            if key.startswith("feat_") and key != "feat_frames":
                val = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(key, val / frames, frames, round=4)
