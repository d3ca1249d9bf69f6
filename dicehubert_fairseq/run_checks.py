"""Checks of a training run's composed config, before fairseq builds anything.

Hydra calls :meth:`RequireDevice.on_job_start` with every job's composed config, before the
job's code runs (in the job's own process, also for submitit launches). ``config/recipe/ssl.yaml``
registers it under ``hydra.callbacks``.
"""

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def missing_gpu_message(config: DictConfig) -> str:
    """Why this run cannot start on this machine, or ``""``.

    Args:
        config: the composed fairseq config of one job (``common.cpu``, ``common.tpu``).

    Returns:
        one line naming the fix when the config asks for a CUDA GPU and torch sees none.
    """
    import torch

    common = config.get("common") or {}
    if common.get("cpu", False) or common.get("tpu", False) or torch.cuda.is_available():
        return ""
    return (f"dicehubert: this run trains on a GPU (common.cpu=false: the default overlay run=gpu, or run=slurm) "
            f"but torch {torch.__version__} finds no CUDA device here; add run=cpu to train on the CPU "
            f"(run=cpu_torchrun for several CPU processes)")


class RequireDevice(Callback):
    """Ends a job asking for a GPU on a machine without one: one line on stderr, exit status 1.

    Without it, fairseq builds the task, the model and the criterion and then dies in a
    traceback (``AssertionError: Torch not compiled with CUDA enabled``).
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        message = missing_gpu_message(config)
        if message:
            sys.exit(message)
