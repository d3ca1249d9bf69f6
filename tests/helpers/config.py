"""Compose this project's hydra configs in-process, exactly as ``fairseq-hydra-train`` does.

Used by tests, benchmarks and the tiny example to build a task, model and criterion from a
config name without starting a training run.
"""

import os
from typing import List, Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import dicehubert_fairseq  # noqa: F401  (registers the plugin)
from fairseq import tasks
from fairseq.dataclass.initialize import add_defaults, hydra_init

#: The repository's config directory.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "config")


def compose(config_name: str, overrides: Sequence[str] = (), config_dir: Optional[str] = None) -> DictConfig:
    """Compose ``config_name`` with ``overrides`` against fairseq's schema, fully resolved.

    ``checkpoint.save_dir`` defaults to a hydra interpolation that only a running job can
    resolve: pass ``checkpoint.save_dir=...`` in ``overrides`` (done here if absent).
    """
    overrides: List[str] = list(overrides)
    if not any(o.startswith("checkpoint.save_dir=") for o in overrides):
        overrides.append("checkpoint.save_dir=checkpoints")
    hydra_init(config_name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(config_dir or CONFIG_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    add_defaults(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


def build(cfg: DictConfig):
    """``(task, model, criterion)`` for a composed config (imports this plugin first)."""
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion
