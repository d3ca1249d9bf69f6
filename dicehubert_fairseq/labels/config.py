"""What ``dicehubert-labels`` reads: the corpus, the features and their reader, the inference batch.

:class:`Corpus` and :class:`FeatureConfig` are options of ``fit``, ``dump`` and ``run`` (each
field an option, :mod:`~dicehubert_fairseq.cli_args`); :func:`make_reader` opens the reader they
name and :func:`max_batch_samples` resolves the inference batch, both for the plan
(:func:`~.plan.make_plan`).
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from ..errors import InputError
from ..option_types import int_list
from .features import FeatureReader
from .mfcc import MfccFeatureReader
from .teacher import MAX_CHUNK, TeacherFeatureReader

#: ``--max-batch-seconds`` on CUDA when not given (on CPU: 0, one utterance at a time).
CUDA_BATCH_SECONDS = 50.0


@dataclass
class Corpus:
    """The utterances ``dump`` and ``run`` read (``fit``: :class:`FitCorpus`)."""

    manifest_dir: str = field(default=MISSING, metadata={"help": "directory with {split}.tsv"})
    split: str = field(default=MISSING, metadata={"help": "manifest split to read"})
    check_headers: bool = field(default=True, metadata={
        "help": "skip reading every audio header before starting", "flag": "--no-header-check"})

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.manifest_dir, f"{self.split}.tsv")


@dataclass
class FitCorpus(Corpus):
    split: str = field(default="train", metadata={"help": "manifest split to read"})


@dataclass
class FeatureConfig:
    """Which features to read (a teacher layer or MFCC) and how; each field is a ``dicehubert-labels`` option."""

    checkpoint: Optional[str] = field(default=None, metadata={
        "help": "fairseq hubert / dicehubert_student checkpoint (teacher)"})
    mfcc: bool = field(default=False, metadata={"help": "39-dim Kaldi MFCC at 100 Hz instead of a teacher"})
    layer: Optional[List[int]] = field(default=None, metadata={
        "help": "1-based transformer layer of --checkpoint (as fairseq's dump_hubert_feature); several, "
                "e.g. 6,9,12: their outputs concatenated per frame", "type": int_list, "nargs": None,
        "metavar": "L[,L...]"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={
        "help": "teacher compute precision: float16 on CUDA only; bfloat16 via autocast",
        "choices": ("float32", "float16", "bfloat16")})
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate for --mfcc"})
    max_batch_seconds: Optional[float] = field(default=None, metadata={
        "help": "padded audio per inference batch, in seconds; 0: one utterance at a time (default: 0 on CPU, "
                "where batching measured slower, and one utterance's features never depend on the others; "
                f"{CUDA_BATCH_SECONDS:g} on CUDA)"})
    max_chunk: int = field(default=MAX_CHUNK, metadata={
        "help": "longer utterances are cut into chunks of this many samples (fairseq's default)"})


def make_reader(cfg: FeatureConfig) -> FeatureReader:
    """A :class:`~.teacher.TeacherFeatureReader` (``checkpoint`` + ``layer``) or :class:`~.mfcc.MfccFeatureReader` (``mfcc``).

    Raises:
        InputError: neither or both sources, ``--checkpoint`` without ``--layer`` or ``--mfcc``
            with it, and everything :class:`~.teacher.TeacherFeatureReader` refuses.
    """
    if cfg.mfcc and cfg.checkpoint:
        raise InputError(["give --checkpoint CKPT --layer L (teacher features) or --mfcc, not both"])
    if cfg.mfcc:
        if cfg.layer is not None:
            raise InputError(["--layer applies to --checkpoint, not --mfcc"])
        return MfccFeatureReader(cfg.sample_rate)
    if cfg.checkpoint is None:
        raise InputError(["give --checkpoint CKPT --layer L (teacher features) or --mfcc"])
    if cfg.layer is None:
        raise InputError(["--checkpoint needs --layer L (1-based transformer layer)"])
    return TeacherFeatureReader(cfg.checkpoint, cfg.layer, device=cfg.device,
                                dtype=None if cfg.dtype == "float32" else cfg.dtype, max_chunk=cfg.max_chunk)


def max_batch_samples(cfg: FeatureConfig, reader: FeatureReader) -> int:
    """``--max-batch-seconds`` in samples (0: one utterance at a time), its default resolved.

    Unset, it is 0 on CPU -- HuBERT Base measured about 7% less CPU time per utterance alone
    than in padded 50 s batches there (``benchmarks/labels/profile_teacher.py``), and features
    computed alone do not depend on other utterances, so they can be reused exactly -- and
    :data:`CUDA_BATCH_SECONDS` on a GPU.
    """
    seconds = cfg.max_batch_seconds
    if seconds is None:
        seconds = CUDA_BATCH_SECONDS if reader.device.type == "cuda" else 0.0
    if seconds < 0:
        raise InputError([f"--max-batch-seconds must be >= 0, found {seconds:g}"])
    return int(seconds * reader.sample_rate)
