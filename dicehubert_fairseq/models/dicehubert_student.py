"""Model ``dicehubert_student``: a HuBERT of configurable width/depth trained on teacher labels.

It *is* fairseq's ``HubertModel`` (same modules, same state-dict names, same masking) with

* ``build_model`` that builds ``cls`` (fairseq's builds ``HubertModel`` whatever the class),
* logits over all classes from one matmul (:func:`dicehubert_fairseq.losses.cosine_logits`),
  returned with the matching hard targets and soft targets, so the ``dicehubert`` criterion
  can mix hard and soft label streams,
* optional initialisation from a teacher checkpoint (every tensor whose name and shape match,
  conv front end included; pretraining heads excluded).
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from fairseq.models import register_model
from fairseq.models.hubert.hubert import HubertConfig, HubertModel

from ..losses import cosine_logits

logger = logging.getLogger(__name__)

#: Parameters that belong to a teacher's own label set, never copied into a student.
PRETRAINING_HEADS = ("label_embs_concat", "final_proj.", "target_glu.")


@dataclass
class DiceHubertStudentConfig(HubertConfig):
    init_from_teacher: Optional[str] = field(
        default=None,
        metadata={"help": "teacher checkpoint to initialise from: the conv front end and every "
                          "tensor whose name and shape match (pretraining heads excluded)"},
    )


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
            if name.startswith(PRETRAINING_HEADS) or src is None or src.shape != tensor.shape:
                skipped.append(name)
                continue
            tensor.copy_(src.to(tensor.dtype))
            copied.append(name)
    return copied, skipped


@register_model("dicehubert_student", dataclass=DiceHubertStudentConfig)
class DiceHubertStudent(HubertModel):
    """HuBERT student (narrow, shallow, or any size) for DiceHuBERT."""

    @classmethod
    def build_model(cls, cfg: DiceHubertStudentConfig, task):
        return cls(cfg, task.cfg, task.dictionaries)

    def init_from_teacher(self, path: str) -> List[str]:
        """Initialise from a teacher checkpoint; returns the names of the copied tensors."""
        from ..checkpoint import load_state, require_hubert_family

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
        """Masked prediction over all classes of every label stream.

        Args:
            source: ``(B, S)`` waveforms.
            target_list: per stream ``(B, T_label)`` dictionary indices.
            padding_mask: ``(B, S)`` bool, True on padding.
            mask: apply span masking.
            features_only / output_layer: as ``HubertModel`` (delegated to it).
            soft_target_list: per stream ``None`` or ``((B, T_label, k) ids, (B, T_label, k) probs)``.

        Returns:
            dict with, per stream ``i``, ``logit_m_list[i]`` ``(N_m, C_i)`` and
            ``target_m_list[i]`` ``(N_m,)`` on masked frames (``*_u_*`` on unmasked ones),
            ``soft_m_list[i]`` / ``soft_u_list[i]`` ``None`` or ``((N, k), (N, k))``, plus
            ``padding_mask`` ``(B, T)``, ``mask_indices`` ``(B, T)`` and ``features_pen``.
        """
        if features_only or target_list is None:
            return super().forward(source, target_list, padding_mask, mask, True, output_layer)

        n = len(target_list)
        soft = list(soft_target_list) if soft_target_list is not None else [None] * n
        packed = list(target_list)
        soft_slots = []
        for s in soft:
            if s is None:
                soft_slots.append(None)
            else:
                soft_slots.append(len(packed))
                packed.extend(s)
        features = self.forward_features(source)
        # HubertModel.forward_targets subsamples every tensor along dim 1: soft ones ride along
        features, packed = self.forward_targets(features, packed)
        target_list = packed[:n]
        soft = [None if j is None else (packed[j], packed[j + 1]) for j in soft_slots]

        features_pen = features.float().pow(2).mean()
        features = self.layer_norm(features.transpose(1, 2))
        if padding_mask is not None:
            padding_mask = self.forward_padding_mask(features, padding_mask)
        else:
            padding_mask = features.new_zeros(features.shape[:2], dtype=torch.bool)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        features = self.dropout_input(features)
        if mask:
            x, mask_indices = self.apply_mask(features, padding_mask, target_list)
        else:
            x, mask_indices = features, None
        if mask_indices is None:
            mask_indices = torch.zeros_like(padding_mask)
        x, _ = self.encoder(x, padding_mask=padding_mask, layer=None)

        label_embs_list = self.label_embs_concat.split(self.num_classes, 0)
        if self.target_glu is not None:
            label_embs_list = [self.target_glu(e) for e in label_embs_list]

        out = {"padding_mask": padding_mask, "mask_indices": mask_indices, "features_pen": features_pen}
        for tag, selected, skip in (("m", ~padding_mask & mask_indices, self.skip_masked),
                                    ("u", ~padding_mask & ~mask_indices, self.skip_nomask)):
            if skip:
                out[f"logit_{tag}_list"] = [None] * n
                out[f"target_{tag}_list"] = [None] * n
                out[f"soft_{tag}_list"] = [None] * n
                continue
            proj = self.final_proj(x[selected])
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
