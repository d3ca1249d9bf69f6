"""Frame features for k-means labels: the readers' interface, and the rows of a manifest read in batches.

Two readers share :class:`FeatureReader`: :class:`~.teacher.TeacherFeatureReader` (a teacher's
transformer layer) and :class:`~.mfcc.MfccFeatureReader` (Kaldi MFCC). :class:`FeatureSource`
is what ``fit`` and ``dump`` read: one open reader, the manifest, the inference batch the plan
resolved (:func:`~.plan.make_plan`) and, for ``run``, a cache of whole utterances.

Audio is read with soundfile as float32 in [-1, 1] (as fairseq's readers do).
"""

from dataclasses import dataclass
from typing import Collection, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.audio import read_audio
from ..data.files import Manifest
from ..feature_cache import FeatureCache


class FeatureReader:
    """Interface of the feature readers.

    Attributes:
        dim: feature dimension ``D``.
        frame_rate: frames per second (50 for HuBERT layers, 100 for MFCC).
        sample_rate: audio sample rate expected.
        description: a dict describing the features (stored with the k-means model).
        batch_invariant: True when an utterance's features are computed alone, so they do not
            depend (to the bit) on the other utterances of its batch.
    """

    dim: int
    frame_rate: float
    sample_rate: int
    description: Dict[str, object]
    batch_invariant: bool = False

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for an utterance of ``num_samples`` samples."""
        raise NotImplementedError

    def features(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Features of a batch of waveforms.

        Args:
            wavs: ``B`` float32 waveforms ``(S_b,)``.

        Returns:
            ``B`` float32 arrays ``(T_b, D)`` with ``T_b == num_frames(S_b)``.
        """
        raise NotImplementedError

    def features_torch(self, wavs: Sequence[np.ndarray]) -> List[torch.Tensor]:
        """As :meth:`features`, as float32 tensors on the reader's device."""
        return [torch.from_numpy(f) for f in self.features(wavs)]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def computed_alone(reader: FeatureReader, batch_samples: int) -> bool:
    """Whether every utterance's features are computed on their own (bit for bit independent of
    the other utterances): a batch-invariant reader (MFCC), or batches of one (``batch_samples`` 0)."""
    return bool(reader.batch_invariant) or batch_samples <= 0


def length_sorted_batches(lengths: Sequence[int], max_batch_samples: int, max_batch_size: int = 64) -> List[List[int]]:
    """Group positions into batches of similar length (longest first), bounded padded size.

    Args:
        lengths: samples per item.
        max_batch_samples: bound on ``len(batch) * max(length in batch)`` (an item longer than the
            bound gets a batch of its own).
        max_batch_size: bound on items per batch.

    Returns:
        lists of positions into ``lengths``; every position appears once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > max_batch_samples or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass(frozen=True)
class FeatureSource:
    """The features of a manifest's rows: one open reader, its inference batch, an optional cache.

    Args:
        manifest: the manifest.
        reader: the feature reader.
        batch_samples: padded samples per inference batch (see :func:`length_sorted_batches`);
            0: one utterance at a time.
        cache: rows it holds are taken from it instead of being computed, rows computed are
            added to it (until it is frozen). Only where features are :func:`computed_alone`
            (else ValueError), so a cached row is what computing it gives, to the bit.
    """

    manifest: Manifest
    reader: FeatureReader
    batch_samples: int
    cache: Optional[FeatureCache] = None

    def __post_init__(self):
        if self.cache is not None and not self.alone:
            raise ValueError("a feature cache is exact only for features computed one utterance at a time")

    @property
    def alone(self) -> bool:
        """Whether each utterance's features are computed on their own (:func:`computed_alone`)."""
        return computed_alone(self.reader, self.batch_samples)

    def num_frames(self, row: int) -> int:
        """Frames of manifest row ``row``."""
        return self.reader.num_frames(self.manifest.sizes[row])

    def read(self, rows: Sequence[int], keep: Optional[Collection[int]] = None,
             as_torch: bool = False) -> Iterator[Tuple[int, object]]:
        """Features of ``rows``, computed in length-sorted batches.

        Args:
            rows: manifest rows (a block; results come batch by batch, not in this order).
            keep: rows to yield (default: all of ``rows``). The batches are still planned over all
                of ``rows`` and computed whole when they hold a kept row (others are skipped), so a
                row's features do not depend on which rows are kept: batched float arithmetic
                changes in the last bits with the batch's other rows.
            as_torch: yield tensors on the reader's device instead of numpy arrays.

        Yields:
            ``(row, (T, D) features)`` for every row of ``rows`` (in ``keep``), in the same order
            whether or not a cache holds them.
        """
        sizes = [self.manifest.sizes[i] for i in rows]
        for batch in length_sorted_batches(sizes, self.batch_samples):
            batch_rows = [rows[j] for j in batch]
            if keep is not None and not any(r in keep for r in batch_rows):
                continue
            computed = self._compute([r for r in batch_rows if self.cache is None or r not in self.cache], as_torch)
            for r in batch_rows:
                if keep is not None and r not in keep:
                    continue
                if r in computed:
                    if self.cache is not None:
                        self.cache.add(r, computed[r])
                    yield r, computed[r]
                else:
                    f = self.cache.get(r)
                    yield r, (f.to(self.reader.device) if as_torch else f.numpy())

    def _compute(self, rows: List[int], as_torch: bool) -> Dict[int, object]:
        """``{row: (T, D) features}`` of ``rows``, one batch."""
        if not rows:
            return {}
        wavs = [read_audio(self.manifest, r, self.reader.sample_rate) for r in rows]
        feats = self.reader.features_torch(wavs) if as_torch else self.reader.features(wavs)
        for r, w, f in zip(rows, wavs, feats):
            expected = self.reader.num_frames(len(w))
            if f.shape[0] != expected:  # pragma: no cover - a bug, not bad input
                raise RuntimeError(f"{self.manifest.audio_path(r)}: {f.shape[0]} frames, expected {expected}")
        return dict(zip(rows, feats))
