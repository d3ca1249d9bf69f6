"""Let fairseq 0.12 train in several CPU processes (``gloo``): its one CUDA-only collective.

fairseq's trainer gathers the logging outputs of criteria whose outputs cannot be summed
(HuBERT's and ours, ``logging_outputs_can_be_summed() == False``) with
``fairseq.distributed.utils.all_gather_list``. That function keeps two buffers as attributes
of itself and allocates them, when missing or too small, with ``torch.cuda.ByteTensor`` and
``pin_memory()``: in CPU processes the first update of a world-size-2 run ends in
``TypeError: type torch.cuda.ByteTensor not available``.

:func:`install` (run when this package is imported, i.e. by ``common.user_dir``, before the
trainer exists) wraps that function: when the process group's backend is not NCCL, it first
gives it CPU buffers of the size it would have allocated, then calls fairseq's function
unchanged. Under NCCL nothing changes. Tested by ``tests/e2e/test_distributed.py``, which trains
with two processes; everything else fairseq needs for CPU processes is configuration
(``config/run/cpu_torchrun.yaml``).
"""

import torch

from fairseq.distributed import utils as distributed_utils

_fairseq_all_gather_list = distributed_utils.all_gather_list


def _give_cpu_buffers(world_size: int, max_size: int) -> None:
    # The function reads its buffers through its module-level name (this wrapper, once installed).
    holder = distributed_utils.all_gather_list
    buffer = getattr(holder, "_buffer", None)
    if buffer is None or buffer.device.type != "cpu" or buffer.numel() < world_size * max_size:
        holder._buffer = torch.zeros(world_size * max_size, dtype=torch.uint8)
        holder._cpu_buffer = torch.zeros(max_size, dtype=torch.uint8)


def all_gather_list(data, group=None, max_size=16384):
    """fairseq's ``all_gather_list`` with CPU buffers under a non-NCCL backend (gloo).

    Args:
        data: any picklable object, gathered from every worker.
        group: the process group (default: fairseq's global group).
        max_size: bytes reserved per worker for the pickled ``data``.

    Returns:
        list of the ``data`` of every worker, in rank order.
    """
    if group is None:
        group = distributed_utils.get_global_group()
    if torch.distributed.get_backend(group) != "nccl":
        _give_cpu_buffers(distributed_utils.get_world_size(group), max_size)
    return _fairseq_all_gather_list(data, group=group, max_size=max_size)


def install() -> None:
    """Replace ``fairseq.distributed.utils.all_gather_list`` by :func:`all_gather_list`. Idempotent."""
    distributed_utils.all_gather_list = all_gather_list


install()
