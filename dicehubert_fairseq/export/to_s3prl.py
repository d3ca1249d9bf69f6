"""``--to s3prl``: s3prl's converted HuBERT format, for its ``hubert_local`` / ``hubert_custom`` upstream.

The dict that s3prl's ``upstream/hubert/convert.py`` (``load_and_convert_fairseq_ckpt``) writes
and its ``load_converted_model`` reads (s3prl 0.4.x)::

    {"task_cfg": dict, "model_cfg": dict, "model_weight": state dict, "dictionaries_symbols": [[str]]}

``load_converted_model`` keeps the keys of ``task_cfg`` / ``model_cfg`` that its own copies of
``HubertPretrainingConfig`` / ``HubertConfig`` have, builds its ``HubertModel`` and loads the
weights strictly.  s3prl's ``HubertConfig`` lacks fairseq's ``conv_pos_batch_norm``: a model
that uses it is refused (s3prl would silently build a different positional conv); so is a
convolution-only student (``layer_type=conv``), which s3prl's ``HubertModel`` cannot build.  The file
holds plain types only, so s3prl's ``torch.load`` (``weights_only=True`` since torch 2.6) reads it.
"""

import logging
from typing import Any, Dict, List

import torch

from ..checkpoint import FEAT_HEADS, Source, require_plain
from ..errors import InputError
from .output import split_state_dict

logger = logging.getLogger(__name__)

#: fairseq ``HubertConfig`` fields that s3prl 0.4.18's copy does not have, with the value it assumes.
S3PRL_MISSING_FIELDS = {"conv_pos_batch_norm": False}


def refusals(source: Source) -> List[str]:
    m = source.model_cfg()
    problems = [f"{source.path}: model.{k}={m[k]}: s3prl's HubertConfig has no such field (it builds the "
                f"model as if {k}={v}); export with --to fairseq or --to hf instead"
                for k, v in S3PRL_MISSING_FIELDS.items() if k in m and m[k] != v]
    if source.needs_plugin():
        problems.append(f"{source.path}: model.layer_type=conv: s3prl's HubertModel has only transformer and "
                        f"conformer encoder layers, not this plugin's convolution-only blocks (export this model "
                        f"with --to fairseq)")
    return problems


def s3prl_state(source: Source) -> Dict[str, Any]:
    problems = refusals(source)
    if problems:
        raise InputError(problems)
    kept, dropped = split_state_dict(source.model.state_dict(), FEAT_HEADS)
    state = {
        "task_cfg": source.task_cfg(),
        "model_cfg": source.model_cfg(),
        "model_weight": {k: v.detach().clone() for k, v in kept.items()},
        "dictionaries_symbols": [list(map(str, d)) for d in source.dictionaries],
    }
    require_plain({k: v for k, v in state.items() if k != "model_weight"}, "s3prl checkpoint")
    return {"state": state, "dropped": dropped}


def write_s3prl(source: Source, path: str) -> Dict[str, Any]:
    """Save the s3prl converted checkpoint to ``path`` (the caller makes it atomic).

    Returns:
        dict with ``parameters`` and ``dropped``.
    """
    out = s3prl_state(source)
    torch.save(out["state"], path)
    params = sum(t.numel() for t in out["state"]["model_weight"].values() if t.is_floating_point())
    return {"parameters": params, "dropped": out["dropped"]}
