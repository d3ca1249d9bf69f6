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

from .data import tiny_model_overrides

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


def tiny_student_cfg(data: str, labels: str, extra: Sequence[str] = ()) -> DictConfig:
    """``dicehubert_narrow`` made tiny (2 x 32, :func:`~tests.helpers.data.tiny_model_overrides`) on CPU."""
    return compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu",
                                         "task.min_sample_size=8000"] + tiny_model_overrides() + list(extra))


#: Hidden size of the tiny L_feat students and teachers.
FEAT_DIM = 32
#: Overrides that make an L_feat row tiny, keeping its depth (a layer-to-layer row needs all 12).
FEAT_TINY = [o for o in tiny_model_overrides(dim=FEAT_DIM) if not o.startswith("++model.encoder_layers=")] + [
    "run=cpu", "task.min_sample_size=8000", f"++model.feat_teacher_dim={FEAT_DIM}",
]


def feat_cfg(world: dict, name: str = "feat_shallow_l6", extra: Sequence[str] = (),
             teacher: Optional[str] = None) -> DictConfig:
    """An L_feat row of ``world`` (``data``, ``labels``, ``teacher``) made tiny."""
    return compose(name, [f"task.data={world['data']}", f"task.label_dir={world['labels']}",
                          f"criterion.teacher_checkpoint={teacher or world['teacher']}"] + FEAT_TINY + list(extra))


def batch_of(task, n: int = 4, split: str = "train"):
    """A collated batch of the first ``n`` utterances of ``split``."""
    task.load_dataset(split)
    ds = task.datasets[split]
    return ds.collater([ds[i] for i in range(n)])
