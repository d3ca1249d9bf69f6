"""``--to fairseq``: a plain fairseq ``hubert`` checkpoint, loadable without this plugin.

The file is what fairseq's trainer saves, reduced to what loading needs:

* ``cfg``: the source's config with model ``hubert`` (``HubertConfig``'s fields only), task
  ``hubert_pretraining`` (``HubertPretrainingConfig``'s fields only), criterion ``hubert``
  (``HubertCriterionConfig``'s fields) and ``common.user_dir`` unset;
* ``model``: every tensor but the feature-distillation heads (HuBERT's own pretraining heads
  stay: fairseq's ``HubertModel`` has them and loads strictly);
* ``task_state``: ``{"dictionaries": [[symbol, ...], ...]}``, the symbols of each label
  dictionary as plain lists of strings rather than pickled ``fairseq.data.dictionary.Dictionary``
  objects.  ``HubertModel`` only takes ``len()`` of each, so fairseq's
  ``load_model_ensemble_and_task`` builds the model (and ``hubert_asr`` fine-tuning starts
  from it), and ``torch.load(weights_only=True)`` (the default since torch 2.6) reads the file
  with no allow-list: it holds only dicts, lists, strings, numbers, None and tensors;
* ``optimizer_history`` (one entry: criterion, optimizer name, update count) and
  ``extra_state`` (epoch), which fairseq's loader expects; no optimizer state.

Continuing HuBERT *pretraining* from this file is not what it is for: fairseq's pretraining
task encodes labels with ``Dictionary`` methods, so resume from the source checkpoint instead.

One model is beyond fairseq's ``hubert``: a convolution-only student (``model.layer_type=conv``).
Its file is the same (plain types, no heads, task ``hubert_pretraining``) but keeps model
``dicehubert_student`` (``DiceHubertStudentConfig``'s fields but the training-only ones): fairseq's
loader builds it once ``dicehubert_fairseq`` is imported (a warning says so).
"""

import dataclasses
import logging
from typing import Any, Dict

import torch
from fairseq.criterions.hubert_criterion import HubertCriterionConfig
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..checkpoint import FEAT_HEADS, Source, require_plain
from .output import split_state_dict

logger = logging.getLogger(__name__)


def _section(cfg, key: str) -> Any:
    node = cfg.get(key)
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    except OmegaConfBaseException:  # e.g. ${hydra:...} left unresolved in an old checkpoint
        return OmegaConf.to_container(node, resolve=False, enum_to_str=True)


def plain_fairseq_cfg(source: Source) -> Dict[str, Any]:
    """The source's fairseq config as plain Python, rewritten for fairseq's own ``hubert``."""
    cfg = {k: _section(source.cfg, k) for k in source.cfg.keys()}
    cfg["model"] = source.student_model_cfg() if source.needs_plugin() else source.model_cfg()
    cfg["task"] = source.task_cfg()
    crit = cfg.get("criterion") or {}
    fields = {f.name for f in dataclasses.fields(HubertCriterionConfig)}
    cfg["criterion"] = dict({k: v for k, v in crit.items() if k in fields}, _name="hubert")
    if isinstance(cfg.get("common"), dict):
        cfg["common"]["user_dir"] = None
    require_plain(cfg, "cfg")
    return cfg


def fairseq_state(source: Source) -> Dict[str, Any]:
    """The checkpoint dict :func:`write_fairseq` saves (plain types and tensors only)."""
    kept, dropped = split_state_dict(source.model.state_dict(), FEAT_HEADS)
    history = (source.state.get("optimizer_history") or [{}])[-1]
    extra = source.state.get("extra_state") or {}
    epoch = (extra.get("train_iterator") or {}).get("epoch", extra.get("epoch", 1))
    state = {
        "args": None,
        "cfg": plain_fairseq_cfg(source),
        "model": {k: v.detach().clone() for k, v in kept.items()},
        "task_state": {"dictionaries": [list(map(str, d)) for d in source.dictionaries]},
        "optimizer_history": [{
            "criterion_name": "HubertCriterion",
            "optimizer_name": str(history.get("optimizer_name", "FairseqAdam")),
            "lr_scheduler_state": {"best": None},
            "num_updates": int(history.get("num_updates", 0) or 0),
        }],
        "extra_state": {"train_iterator": {"epoch": int(epoch or 1), "iterations_in_epoch": 0}},
    }
    require_plain({k: v for k, v in state.items() if k != "model"}, "checkpoint")
    return {"state": state, "dropped": dropped}


def write_fairseq(source: Source, path: str) -> Dict[str, Any]:
    """Save the plain ``hubert`` checkpoint to ``path`` (the caller makes it atomic).

    Returns:
        dict with ``parameters`` and ``dropped`` (the source tensors left out).
    """
    out = fairseq_state(source)
    if source.needs_plugin():
        logger.warning(f"{source.path}: model.layer_type=conv (no attention) is beyond fairseq's own 'hubert': the "
                       f"file keeps model 'dicehubert_student' and loads with fairseq's loader after "
                       f"'import dicehubert_fairseq'")
    torch.save(out["state"], path)
    params = sum(t.numel() for t in out["state"]["model"].values() if t.is_floating_point())
    return {"parameters": params, "dropped": out["dropped"]}
