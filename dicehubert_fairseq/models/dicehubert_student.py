"""Model ``dicehubert_student``: a HuBERT of configurable width/depth trained on teacher labels.

It *is* fairseq's ``HubertModel`` (same modules, same state-dict names, same masking) with

* ``build_model`` that builds ``cls`` (fairseq's builds ``HubertModel`` whatever the class),
* logits over all classes from one matmul (:func:`dicehubert_fairseq.losses.cosine_logits`),
  returned with the matching hard targets and soft targets, so the ``dicehubert`` criterion
  can mix hard and soft label streams,
* optional initialisation from a teacher checkpoint (every tensor whose name and shape match,
  conv front end included; pretraining heads excluded),
* optional feature-distillation heads (``feat_target_layers``, linear or DistilHuBERT's
  two-layer MLP: ``feat_head_hidden_dim``): with them, ``forward`` also
  returns every transformer layer's output and the heads' predictions, for the
  ``dicehubert_feat`` criterion (L_feat, DistilHuBERT / FitHuBERT style). With
  ``feat_target_layers`` empty (the default) the model and its state dict are exactly the
  L_SSL student's,
* a third encoder layer type beside fairseq's transformer and conformer: ``layer_type=conv``,
  blocks of depthwise-separable convolutions and a feed-forward network, no attention
  (:mod:`dicehubert_fairseq.models._conv_encoder`), inside fairseq's own encoder.

Hidden states come from :func:`dicehubert_fairseq.hidden_states.hidden_states`, as everywhere.
"""

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fairseq.data.data_utils import compute_mask_indices
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.models.wav2vec.wav2vec2 import LAYER_TYPE_CHOICES

from ..checkpoint import FEAT_HEADS, PRETRAINING_HEADS, load_state, require_hubert_family
from ..errors import InputError
from ..hidden_states import hidden_states
from ._checks import check_label_rate, check_mask_options
from ..losses import cosine_logits
from ._conv_encoder import ConvEncoder, receptive_field

logger = logging.getLogger(__name__)

#: Draws of a batch's span masks before fairseq's "entire sequence is masked" error is let through
#: (a row with 1-2 real frames fails a draw with probability about 2/3: 50 draws, about 1e-9).
MASK_REDRAWS = 50

#: What ``init/teacher.yaml`` (the ``*_init`` rows) sets ``model.init_from_teacher`` to until the command
#: line gives a path. Not ``???``: OmegaConf keeps the value it merges ``???`` onto (the recipe's
#: ``null``), so a forgotten path would silently mean a random initialisation.
INIT_FROM_TEACHER_REQUIRED = "REQUIRED_TEACHER_CHECKPOINT"

#: Parameters of a teacher never copied into a student: its own label set's heads and any
#: feature-distillation heads.
NOT_COPIED = PRETRAINING_HEADS + FEAT_HEADS


#: fairseq's encoder layer types, and ``conv``: convolution blocks without attention.
STUDENT_LAYER_TYPE_CHOICES = ChoiceEnum([str(c) for c in LAYER_TYPE_CHOICES] + ["conv"])


@dataclass
class DiceHubertStudentConfig(HubertConfig):
    layer_type: STUDENT_LAYER_TYPE_CHOICES = field(
        default="transformer",
        metadata={"help": "encoder layers: transformer or conformer (fairseq's), or conv: depthwise-separable "
                          "convolution blocks, no attention (kernel depthwise_conv_kernel_size, dilations "
                          "conv_encoder_dilations)"},
    )
    conv_encoder_dilations: List[int] = field(
        default_factory=lambda: [1],
        metadata={"help": "layer_type=conv: the depthwise convolutions' dilations, repeated over the blocks "
                          "(e.g. [1, 2, 4, 8])"},
    )
    init_from_teacher: Optional[str] = field(
        default=None,
        metadata={"help": "teacher checkpoint to initialise from: the conv front end and every "
                          "tensor whose name and shape match (pretraining heads excluded)"},
    )
    feat_target_layers: List[int] = field(
        default_factory=list,
        metadata={"help": "teacher transformer layers (1-based) the student predicts for L_feat "
                          "(criterion dicehubert_feat), one linear head each; empty: no heads"},
    )
    feat_student_layers: List[int] = field(
        default_factory=list,
        metadata={"help": "student layer (1-based) each head reads, one per feat_target_layers entry "
                          "(FitHuBERT layer-to-layer); empty: the last layer for every head (DistilHuBERT)"},
    )
    feat_teacher_dim: int = field(
        default=768,
        metadata={"help": "hidden size of the teacher the heads predict (HuBERT Base: 768)"},
    )
    feat_head_hidden_dim: int = field(
        default=0,
        metadata={"help": "0: each feature-distillation head is one linear layer (FitHuBERT); N > 0: "
                          "linear -> GELU -> linear with N hidden units (DistilHuBERT: N = the student's width)"},
    )


def feat_head(dim: int, teacher_dim: int, hidden: int = 0) -> nn.Module:
    """One feature-distillation head, ``(B, T, dim)`` -> ``(B, T, teacher_dim)``.

    ``hidden == 0``: a linear layer (FitHuBERT's layer-wise projection).  ``hidden > 0``:
    linear -> GELU -> linear, DistilHuBERT's prediction head (s3prl's distiller builds all heads
    as one ``Linear(dim, hidden * n)`` -> GELU -> ``SplitLinear``: the same maths, one MLP per head).
    """
    if hidden == 0:
        return nn.Linear(dim, teacher_dim)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, teacher_dim))


def init_from_state_dict(model: torch.nn.Module, teacher_state: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """Copy every tensor of ``teacher_state`` whose name and shape match ``model``'s.

    Returns:
        ``(copied, skipped)`` parameter names of the model.
    """
    own = model.state_dict()
    copied, skipped = [], []
    with torch.no_grad():
        for name, tensor in own.items():
            src = teacher_state.get(name)
            if name.startswith(NOT_COPIED) or src is None or src.shape != tensor.shape:
                skipped.append(name)
                continue
            tensor.copy_(src.to(tensor.dtype))
            copied.append(name)
    return copied, skipped


def _without_encoder_layers(cfg):
    """A copy of ``cfg`` for ``HubertModel.__init__`` to build around a convolution-only encoder:
    fairseq's ``TransformerEncoder`` knows no ``conv`` layers, so it gets none (replaced after)."""
    if OmegaConf.is_config(cfg):
        out = copy.deepcopy(cfg)
        with open_dict(out):
            out.layer_type, out.encoder_layers = "transformer", 0
        return out
    return dataclasses.replace(cfg, layer_type="transformer", encoder_layers=0)


def _task_seed(task_cfg) -> int:
    """``task.seed`` (linked to ``common.seed``) of the ``dicehubert`` task; 1 (fairseq's default
    ``common.seed``) for a task config without the field, such as fairseq's ``hubert_pretraining``.

    A config whose ``seed`` link cannot be resolved (a task config apart from its run's) is an
    error, not a silent 1.
    """
    if isinstance(task_cfg, DictConfig):
        return int(OmegaConf.select(task_cfg, "seed", default=1))
    return int(getattr(task_cfg, "seed", 1))


@register_model("dicehubert_student", dataclass=DiceHubertStudentConfig)
class DiceHubertStudent(HubertModel):
    """HuBERT student (narrow, shallow, or any size) for DiceHuBERT."""

    def __init__(self, cfg: DiceHubertStudentConfig, task_cfg, dictionaries) -> None:
        check_mask_options(cfg)
        conv = getattr(cfg, "layer_type", "transformer") == "conv"
        super().__init__(_without_encoder_layers(cfg) if conv else cfg, task_cfg, dictionaries)
        if conv:  # fairseq's encoder, its layers convolution blocks
            self.encoder = ConvEncoder(cfg)
            logger.info(f"encoder: {cfg.encoder_layers} convolution blocks x {cfg.encoder_embed_dim} (no attention), "
                        f"receptive field {receptive_field(cfg)} frames")
        targets = list(getattr(cfg, "feat_target_layers", None) or [])
        sources = list(getattr(cfg, "feat_student_layers", None) or [])
        n = cfg.encoder_layers
        if sources and len(sources) != len(targets):
            raise InputError([f"model.feat_student_layers has {len(sources)} entries but "
                              f"model.feat_target_layers has {len(targets)} (one student layer per target layer)"])
        bad = [k for k in sources if not 1 <= k <= n]
        if bad:
            raise InputError([f"model.feat_student_layers={sources}: layer(s) {bad} out of range "
                              f"(the student has transformer layers 1..{n})"])
        bad = [k for k in targets if k < 1]
        if bad:
            raise InputError([f"model.feat_target_layers={targets}: layers are 1-based, found {bad}"])
        self.feat_target_layers = targets
        self.feat_student_layers = sources or [n] * len(targets)
        self.seed = _task_seed(task_cfg)
        self.num_updates = 0
        self._masks_in_update = 0
        hidden = int(getattr(cfg, "feat_head_hidden_dim", 0) or 0)
        if hidden < 0:
            raise InputError([f"model.feat_head_hidden_dim={hidden}: expected 0 (linear heads) or a positive width"])
        self.feat_heads = (
            nn.ModuleList([feat_head(cfg.encoder_embed_dim, cfg.feat_teacher_dim, hidden) for _ in targets])
            if targets else None
        )

    @classmethod
    def build_model(cls, cfg: DiceHubertStudentConfig, task):
        if task.cfg.labels:
            check_label_rate(cfg.label_rate, task.cfg.sample_rate, cfg.conv_feature_layers)
        return cls(cfg, task.cfg, task.dictionaries)

    def predict_teacher_layers(self, states: List[torch.Tensor]) -> List[torch.Tensor]:
        """Apply the feature-distillation heads.

        Args:
            states: the student's layer outputs, ``(B, T, D)`` each, layer 1 first.

        Returns:
            one ``(B, T, feat_teacher_dim)`` prediction per ``feat_target_layers`` entry.
        """
        if self.feat_heads is None:
            raise InputError(["model.feat_target_layers is empty: the student has no feature-distillation "
                              "heads (set it, e.g. [4,8,12], to train with criterion dicehubert_feat)"])
        return [head(states[k - 1]) for head, k in zip(self.feat_heads, self.feat_student_layers)]

    def set_num_updates(self, num_updates):
        """fairseq's trainer calls this before every forward of an update (the masks' second seed)."""
        super().set_num_updates(num_updates)
        if num_updates != self.num_updates:
            self.num_updates = num_updates
            self._masks_in_update = 0

    def mask_seed(self) -> int:
        """Seed of the next ``apply_mask``: a function of (seed, data-parallel rank, update, call).

        ``call`` counts the masks drawn since the update number last changed (several batches
        per update under ``update_freq``, validation batches); a run resumed from a checkpoint
        of update ``u`` draws exactly what an uninterrupted run draws from update ``u`` on.
        """
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        key = [self.seed % 2**32, rank, self.num_updates, self._masks_in_update]
        self._masks_in_update += 1
        return int(np.random.SeedSequence(key).generate_state(1)[0] % (2**31 - 1))

    def apply_mask(self, x, padding_mask, target_list):
        """HuBERT's span masking, reproducible: the same masks for the same seed and update.

        fairseq's ``HubertModel`` draws spans from ``np.random.default_rng(None)`` (OS entropy),
        so it masks differently in two runs with the same seed.  Here ``compute_mask_indices``
        gets a seed from :meth:`mask_seed` (``task.seed``, i.e. ``common.seed``, and the update
        number), never from a global RNG that fairseq's data-prefetch thread also draws from;
        otherwise the same masks (same spans, ``min_masks=2``, channel masking). One difference:
        where fairseq's ``compute_mask_indices`` raises because its spans covered every real frame
        of a row (a padded row of one or two frames: about two draws in three), the spans are
        drawn again (up to :data:`MASK_REDRAWS` times), so such a batch trains instead of
        stopping the run at random.

        Args:
            x: ``(B, T, C)`` features (masked in place).
            padding_mask: ``(B, T)`` bool.

        Returns:
            ``(x, mask_indices)`` with ``mask_indices`` ``(B, T)`` bool (None if mask_prob is 0).
        """
        B, T, C = x.shape
        seed = self.mask_seed()
        indices = torch.arange(B)
        mask_indices = None
        if self.mask_prob > 0:
            for attempt in range(MASK_REDRAWS):
                try:
                    mask = compute_mask_indices(
                        (B, T), padding_mask, self.mask_prob, self.mask_length, self.mask_selection,
                        self.mask_other, min_masks=2, no_overlap=self.no_mask_overlap,
                        min_space=self.mask_min_space, seed=seed, epoch=2 * attempt, indices=indices,
                    )
                    break
                except ValueError as e:
                    # a row with a few real frames (padded beside a long one) drew spans covering
                    # all of them: fairseq raises; draw again (a row of padding only always raises)
                    if "entire sequence is masked" not in str(e) or attempt == MASK_REDRAWS - 1:
                        raise
            mask_indices = torch.from_numpy(mask).to(x.device)
            x[mask_indices] = self.mask_emb
        if self.mask_channel_prob > 0:
            channels = compute_mask_indices(
                (B, C), None, self.mask_channel_prob, self.mask_channel_length,
                self.mask_channel_selection, self.mask_channel_other,
                no_overlap=self.no_mask_channel_overlap, min_space=self.mask_channel_min_space,
                seed=seed, epoch=1, indices=indices,
            )
            x[torch.from_numpy(channels).to(x.device).unsqueeze(1).expand(-1, T, -1)] = 0
        return x, mask_indices

    def init_from_teacher(self, path: str) -> List[str]:
        """Initialise from a teacher checkpoint; returns the names of the copied tensors.

        Raises:
            InputError: ``path`` is :data:`INIT_FROM_TEACHER_REQUIRED` (not given), or not a
                HuBERT-family checkpoint.
        """
        if path == INIT_FROM_TEACHER_REQUIRED:
            raise InputError([f"model.init_from_teacher={path}: this row starts the student from a teacher "
                              f"(init/teacher.yaml); give model.init_from_teacher=PATH of a fairseq HuBERT checkpoint"])
        state = load_state(path)
        require_hubert_family(state, path)
        copied, skipped = init_from_state_dict(self, state["model"])
        logger.info(f"initialised {len(copied)} tensors from {path}; {len(skipped)} kept their random init")
        return copied

    def forward(
        self,
        source: torch.Tensor,
        target_list: Optional[List[torch.Tensor]] = None,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = True,
        features_only: bool = False,
        output_layer: Optional[int] = None,
        soft_target_list: Optional[List[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None,
    ) -> Dict[str, object]:
        """Masked prediction over all classes of every label stream, and the feature heads.

        Args:
            source: ``(B, S)`` waveforms.
            target_list: per stream ``(B, T_label)`` dictionary indices; None: no prediction
                (L_feat alone).
            padding_mask: ``(B, S)`` bool, True on padding.
            mask: apply span masking.
            features_only / output_layer: fairseq's ``HubertModel.forward(features_only=True)``
                (what ``extract_features`` calls), unchanged.
            soft_target_list: per stream ``None`` or ``((B, T_label, k) ids, (B, T_label, k) probs)``.

        Returns:
            dict with ``padding_mask`` ``(B, T)``, ``mask_indices`` ``(B, T)``, ``features_pen``;
            with ``target_list``, per stream ``i``: ``logit_m_list[i]`` ``(N_m, C_i)`` and
            ``target_m_list[i]`` ``(N_m,)`` on masked frames (``*_u_*`` on unmasked ones),
            ``soft_m_list[i]`` / ``soft_u_list[i]`` ``None`` or ``((N, k), (N, k))``; with
            feature-distillation heads, ``layer_states`` (every layer's ``(B, T, D)`` output,
            layer 1 first) and ``feat_preds`` (one ``(B, T, feat_teacher_dim)`` per target layer).
        """
        if features_only:
            return super().forward(source, None, padding_mask, mask, True, output_layer)
        n = len(target_list) if target_list is not None else 0
        soft = list(soft_target_list) if soft_target_list is not None else [None] * n
        packed = list(target_list or [])
        soft_slots = []
        for s in soft:  # soft streams ride along with the hard ones through forward_targets
            if s is None:
                soft_slots.append(None)
            else:
                soft_slots.append(len(packed))
                packed.extend(s)
        h = hidden_states(self, source, padding_mask, mask=mask, target_list=packed if n else None)
        out = {"padding_mask": h.padding_mask, "mask_indices": h.mask_indices, "features_pen": h.features_pen}
        if self.feat_heads is not None:
            out["layer_states"] = h.layers
            out["feat_preds"] = self.predict_teacher_layers(h.layers)
        if not n:
            return out
        target_list = h.target_list[:n]
        soft = [None if j is None else (h.target_list[j], h.target_list[j + 1]) for j in soft_slots]

        label_embs_list = self.label_embs_concat.split(self.num_classes, 0)
        if self.target_glu is not None:
            label_embs_list = [self.target_glu(e) for e in label_embs_list]
        for tag, selected, skip in (("m", ~h.padding_mask & h.mask_indices, self.skip_masked),
                                    ("u", ~h.padding_mask & ~h.mask_indices, self.skip_nomask)):
            if skip:
                out[f"logit_{tag}_list"] = [None] * n
                out[f"target_{tag}_list"] = [None] * n
                out[f"soft_{tag}_list"] = [None] * n
                continue
            proj = self.final_proj(h.x[selected])
            projs = proj.chunk(n, dim=-1) if self.untie_final_proj else [proj] * n
            out[f"logit_{tag}_list"] = [
                cosine_logits(p, e, self.logit_temp) for p, e in zip(projs, label_embs_list)
            ]
            out[f"target_{tag}_list"] = [t[selected] for t in target_list]
            out[f"soft_{tag}_list"] = [None if s is None else (s[0][selected], s[1][selected]) for s in soft]
        return out

    def get_logits(self, net_output, is_masked=True):
        return [x for x in net_output["logit_m_list" if is_masked else "logit_u_list"] if x is not None]

    def get_targets(self, net_output, is_masked=True):
        return [x for x in net_output["target_m_list" if is_masked else "target_u_list"] if x is not None]
