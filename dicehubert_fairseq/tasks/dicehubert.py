"""Task ``dicehubert``: fairseq's ``hubert_pretraining`` with preflight checks and soft labels."""

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import II

from fairseq.tasks import register_task
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask, LabelEncoder

from ..data.dataset import SOFT_PAD, DiceHubertDataset
from ..data.files import SoftLabels, read_dictionary_symbols
from ..data.preflight import check_split, require_valid
from ..errors import InputError

logger = logging.getLogger(__name__)


def _under_fairseq_cli() -> bool:
    """True inside ``fairseq-hydra-train`` / ``fairseq-train`` (not when used as a library)."""
    return HydraConfig.initialized() or os.path.basename(sys.argv[0] or "").startswith("fairseq-")


@contextlib.contextmanager
def _user_errors():
    """Under fairseq's CLIs, bad input ends the run with its message and status 1, no traceback."""
    try:
        yield
    except InputError as e:
        if not _under_fairseq_cli():
            raise
        raise SystemExit(f"dicehubert: bad input, nothing was trained:\n{e}") from None


@dataclass
class DiceHubertConfig(HubertPretrainingConfig):
    soft_labels: List[str] = field(
        default_factory=list,
        metadata={"help": "label streams (names from `labels`) trained on soft targets read from "
                          "{split}.{label}.soft_*.npy (see dicehubert-labels dump --soft)"},
    )
    preflight: bool = field(
        default=True,
        metadata={"help": "check manifest, audio files and labels of a split before loading it"},
    )
    preflight_audio_headers: bool = field(
        default=True,
        metadata={"help": "also open every audio header in the preflight (readable, rate, channels, "
                          "length; about 0.1 ms a file): fairseq would otherwise fail mid-training on "
                          "a wrong rate and silently average stereo"},
    )
    label_length_tolerance: float = field(
        default=0.1,
        metadata={"help": "seconds a label sequence may differ from its audio's duration"},
    )
    seed: int = field(
        default=II("common.seed"),
        metadata={"help": "seed of the random crops (with the epoch and the utterance) and of the "
                          "student's span masks (with the update number); linked to common.seed"},
    )
    cpu: Optional[bool] = field(
        default=None,
        metadata={"help": "common.cpu, linked by config/recipe/ssl.yaml: false (a GPU run) on a machine without "
                          "a CUDA device ends fairseq-hydra-train before anything is built, in one line naming "
                          "run=cpu; None: not checked"},
    )


def missing_gpu_message(cpu: Optional[bool]) -> str:
    """Why a training run cannot start here, or ``""``.

    Args:
        cpu: the run's ``common.cpu`` (``task.cpu``); ``None``: unknown, not checked.

    Returns:
        one line naming the fix when the run asks for a CUDA device (``cpu`` false) and torch
        sees none.
    """
    if cpu is None or cpu or torch.cuda.is_available():
        return ""
    return (f"dicehubert: this run trains on a GPU (common.cpu=false: the default overlay run=gpu, or run=slurm) "
            f"but torch {torch.__version__} finds no CUDA device here; add run=cpu to train on the CPU "
            f"(run=cpu_torchrun for several CPU processes)")


@register_task("dicehubert", dataclass=DiceHubertConfig)
class DiceHubertTask(HubertPretrainingTask):
    """HuBERT masked prediction on teacher k-means labels (hard or soft), with preflight checks."""

    cfg: DiceHubertConfig

    @classmethod
    def setup_task(cls, cfg: DiceHubertConfig, **kwargs) -> "DiceHubertTask":
        # the first thing fairseq builds: a GPU run on a machine without one stops here, in one
        # line (otherwise fairseq builds everything, then dies in a CUDA traceback); a task
        # rebuilt from a checkpoint (a teacher) keeps the cpu flag of the run that saved it
        if not kwargs.get("from_checkpoint") and _under_fairseq_cli():
            message = missing_gpu_message(cfg.cpu)
            if message:
                raise SystemExit(message)
        return super().setup_task(cfg, **kwargs)

    def __init__(self, cfg: DiceHubertConfig) -> None:
        unknown = [s for s in cfg.soft_labels if s not in cfg.labels]
        if unknown:
            raise InputError([f"task.soft_labels names {unknown}, which are not in task.labels {list(cfg.labels)}"])
        super().__init__(cfg)

    def load_dictionaries(self):
        with _user_errors():
            return self._load_dictionaries()

    def _load_dictionaries(self):
        label_dir = self.get_label_dir()
        if not os.path.isdir(label_dir):
            which = "task.label_dir" if self.cfg.label_dir is not None else "task.data"
            raise InputError([f"{which}={label_dir}: directory not found (expected dict.{{label}}.txt and label files)"])
        for label in self.cfg.labels:  # clear errors for missing/empty/duplicated dictionaries
            read_dictionary_symbols(os.path.join(label_dir, f"dict.{label}.txt"))
        return super().load_dictionaries()

    def build_model(self, cfg, from_checkpoint=False):
        with _user_errors():  # e.g. a missing/corrupt model.init_from_teacher checkpoint
            model = super().build_model(cfg, from_checkpoint)
            teacher = getattr(cfg, "init_from_teacher", None)
            if teacher and not from_checkpoint:  # a reloaded student already has its own weights
                model.init_from_teacher(teacher)
            return model

    def build_criterion(self, cfg, from_checkpoint=False):
        with _user_errors():  # e.g. a bad teacher checkpoint of criterion dicehubert_feat
            return super().build_criterion(cfg, from_checkpoint)

    def _check_dirs(self) -> None:
        problems = []
        if not os.path.isdir(self.cfg.data):
            problems.append(f"task.data={self.cfg.data}: directory not found (expected {{split}}.tsv manifests)")
        if self.cfg.label_dir is not None and not os.path.isdir(self.cfg.label_dir):
            problems.append(f"task.label_dir={self.cfg.label_dir}: directory not found (expected label files)")
        if problems:
            raise InputError(problems)

    def load_dataset(self, split: str, **kwargs) -> None:
        with _user_errors():
            self._load_dataset(split)

    def _load_dataset(self, split: str) -> None:
        self._check_dirs()
        if self.cfg.preflight:
            problems = check_split(
                self.cfg.data, split, self.get_label_dir(), self.cfg.labels, self.cfg.label_rate,
                sample_rate=self.cfg.sample_rate, soft_labels=self.cfg.soft_labels,
                audio_headers=self.cfg.preflight_audio_headers, tolerance=self.cfg.label_length_tolerance,
            )
            require_valid(problems, f"split '{split}'")
        dicts = self.dictionaries
        soft, luts, pads = [], [], []
        for label, d in zip(self.cfg.labels, dicts):
            pads.append(d.pad())
            if label in self.cfg.soft_labels:
                sl = SoftLabels(self.get_label_dir(), split, label)
                lut = np.array([d.index(str(c)) for c in range(sl.n_clusters)], dtype=np.int64)
                if (lut == d.unk()).any():
                    raise InputError([f"{sl.paths['meta']}: cluster ids 0..{sl.n_clusters - 1} are not all in "
                                      f"dict.{label}.txt"])
                soft.append(sl)
                luts.append(lut)
            else:
                soft.append(None)
                luts.append(None)
        self.datasets[split] = DiceHubertDataset(
            f"{self.cfg.data}/{split}.tsv",
            sample_rate=self.cfg.sample_rate,
            label_paths=[f"{self.get_label_dir()}/{split}.{lab}" for lab in self.cfg.labels],
            label_rates=self.cfg.label_rate,
            pad_list=[SOFT_PAD if s is not None else p for s, p in zip(soft, pads)],
            eos_list=[d.eos() for d in dicts],
            label_processors=[None if s is not None else LabelEncoder(d) for s, d in zip(soft, dicts)],
            max_keep_sample_size=self.cfg.max_keep_size,
            min_keep_sample_size=self.cfg.min_sample_size,
            max_sample_size=self.cfg.max_sample_size,
            pad_audio=self.cfg.pad_audio,
            normalize=self.cfg.normalize,
            store_labels=False,
            random_crop=self.cfg.random_crop,
            single_target=self.cfg.single_target,
            soft_labels=soft,
            soft_luts=luts,
            hard_pads=pads,
            seed=self.cfg.seed,
        )
