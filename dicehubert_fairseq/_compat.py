"""Make fairseq 0.12 checkpoints load under torch >= 2.6 without disabling its safety check.

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load`` without
``weights_only``; since torch 2.6 that means ``weights_only=True``, which refuses every
pickled class that is not allow-listed.  HuBERT checkpoints pickle a few fairseq/stdlib/numpy
objects (the task's label ``Dictionary``, an ``argparse.Namespace`` in old checkpoints, numpy
scalars in the trainer's extra state).  We allow-list exactly those, rather than turning the
check off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), so arbitrary code in a checkpoint still
cannot run.
"""

import argparse
import logging

import numpy as np
import torch

from fairseq.data.dictionary import Dictionary

logger = logging.getLogger(__name__)


def _numpy_globals():
    found = [np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core")
    found.append(core.multiarray.scalar)
    found.append(core.multiarray._reconstruct)
    found.append(np.ndarray)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes by their class
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                found.append(getattr(dtypes, name))
    return found


#: Every global a fairseq HuBERT / dicehubert checkpoint may pickle.
SAFE_GLOBALS = [Dictionary, argparse.Namespace] + _numpy_globals()


def allow_fairseq_checkpoints() -> None:
    """Allow-list :data:`SAFE_GLOBALS` for ``torch.load(weights_only=True)``. Idempotent."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads with weights_only=False by default anyway
        return
    add(SAFE_GLOBALS)


allow_fairseq_checkpoints()
