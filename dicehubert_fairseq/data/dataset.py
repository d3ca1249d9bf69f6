"""fairseq's ``HubertDataset`` plus soft-label streams.

A soft stream's "label" for an utterance is the range of its global frame indices in the
memory-mapped soft-label arrays.  ``HubertDataset`` crops and pads those indices exactly as it
crops and pads hard labels (padding with -1), and :meth:`DiceHubertDataset.collater` turns
them into

* ``target_list[j]``: ``(B, T)`` hard targets (the most likely cluster, as dictionary index),
* ``soft_target_list[j]``: ``((B, T, k) dictionary indices, (B, T, k) probabilities)``,

so the model and criterion see hard and soft streams side by side.

Random crops (``random_crop``) are drawn from an RNG seeded by ``(seed, epoch, dataset index)``
alone: fairseq's ``HubertDataset`` draws them from numpy's global RNG, which fairseq's
prefetch thread (where ``collater`` runs) shares with the training thread, so two runs of the
same command cropped differently.

The manifest is read once, by ``HubertDataset``, keeping every row; the rows outside
``[min_keep_sample_size, max_keep_sample_size]`` are dropped afterwards, and the manifest row of
each item kept is known (soft labels and label lines are found by it).
"""

import itertools
import logging
import threading
from typing import List, Optional, Sequence

import numpy as np
import torch

from fairseq.data import HubertDataset

from .files import SoftLabels

logger = logging.getLogger(__name__)

#: Padding value of soft streams' frame indices (any negative number is free).
SOFT_PAD = -1


def _byte_offsets(label_path: str, rows: Sequence[int]) -> List[tuple]:
    """``(start, end)`` byte range of each line ``rows[i]`` of a label file (lines end at ``\\n``)."""
    with open(label_path, "rb") as f:
        ends = list(itertools.accumulate(len(line) for line in f))
    starts = [0] + ends[:-1]
    return [(starts[i], ends[i]) for i in rows]


class DiceHubertDataset(HubertDataset):
    """``HubertDataset`` whose streams may be soft.

    Args:
        soft_labels: one entry per label stream, a :class:`SoftLabels` or ``None`` (hard).
        soft_luts: one entry per stream, ``(K,)`` int64 array mapping cluster id to dictionary
            index (``None`` for hard streams).
        hard_pads: dictionary pad index per stream (soft streams' ``pad_list`` entry must be
            :data:`SOFT_PAD`).
        seed: seed of the random crops (the task passes ``common.seed``); with the epoch
            (:meth:`set_epoch`) and the dataset index it fixes every crop.
        max_keep_sample_size / min_keep_sample_size: ``HubertDataset``'s (keyword only): rows
            longer / shorter are dropped.
        **kwargs: everything else ``HubertDataset`` takes.
    """

    def __init__(
        self,
        manifest_path: str,
        *args,
        soft_labels: Sequence[Optional[SoftLabels]] = (),
        soft_luts: Sequence[Optional[np.ndarray]] = (),
        hard_pads: Sequence[int] = (),
        seed: int = 1,
        max_keep_sample_size: Optional[int] = None,
        min_keep_sample_size: Optional[int] = None,
        **kwargs,
    ):
        self.seed = int(seed)
        self.epoch = 1
        self._collating = threading.local()  # .indices: the dataset indices of the batch being collated
        self.soft_labels = list(soft_labels)
        self.soft_luts = [None if lut is None else torch.as_tensor(lut, dtype=torch.long) for lut in soft_luts]
        self.hard_pads = list(hard_pads)
        super().__init__(manifest_path, *args, **kwargs)  # every row: the manifest is read here, once
        self._keep_rows(min_keep_sample_size, max_keep_sample_size)

    def _keep_rows(self, min_keep: Optional[int], max_keep: Optional[int]) -> None:
        """Drop the rows outside ``[min_keep, max_keep]`` samples (fairseq's rule); :attr:`_rows`: the
        manifest row of each item kept."""
        self._rows = [r for r, n in enumerate(self.sizes)
                      if (min_keep is None or n >= min_keep) and (max_keep is None or n <= max_keep)]
        if len(self._rows) < len(self.sizes):
            logger.info(f"kept {len(self._rows)} of {len(self.sizes)} utterances: "
                        f"{sum(min_keep is not None and n < min_keep for n in self.sizes)} shorter than {min_keep} samples, "
                        f"{sum(max_keep is not None and n > max_keep for n in self.sizes)} longer than {max_keep}")
        self.audio_names = [self.audio_names[r] for r in self._rows]
        self.sizes = [self.sizes[r] for r in self._rows]
        if self.store_labels:
            self.label_list = [[labels[r] for r in self._rows] for labels in self.label_list]
        else:
            # fairseq's load_label_offset measures lines after newline translation, so in a CRLF
            # file every line is a byte short and labels drift: measure the raw bytes instead
            self.label_offsets_list = [_byte_offsets(p, self._rows) for p in self.label_paths]

    def set_epoch(self, epoch: int) -> None:
        """Called by fairseq's epoch iterator before each epoch (the crops' second seed)."""
        self.epoch = int(epoch)

    def crop_rng(self, index: Optional[int]) -> np.random.Generator:
        """The RNG of utterance ``index``'s crop in the current epoch (a function of seed, epoch, index)."""
        key = [self.seed % 2**32, self.epoch] + ([] if index is None else [int(index)])
        return np.random.default_rng(key)

    def collater_audio(self, audios, audio_size):
        """``HubertDataset``'s, each random crop's start drawn from :meth:`crop_rng` of its utterance.

        The audios come in the order of the batch :meth:`collater` is collating, whose dataset
        indices it recorded; the waveforms longer than ``audio_size`` are cut here, so fairseq's
        own crop (from numpy's global RNG) never runs.
        """
        if not self.random_crop:
            return super().collater_audio(audios, audio_size)
        indices = getattr(self._collating, "indices", None) or [None] * len(audios)
        starts = [int(self.crop_rng(i).integers(0, len(a) - audio_size + 1)) if len(a) > audio_size else 0
                  for i, a in zip(indices, audios)]
        cropped = [a[s : s + audio_size] if len(a) > audio_size else a for a, s in zip(audios, starts)]
        collated, padding_mask, _ = super().collater_audio(cropped, audio_size)
        return collated, padding_mask, starts

    def get_label(self, index, label_idx):
        soft = self.soft_labels[label_idx] if self.soft_labels else None
        if soft is None:
            if self.store_labels:
                return super().get_label(index, label_idx)
            start, end = self.label_offsets_list[label_idx][index]
            with open(self.label_paths[label_idx], "rb") as f:
                f.seek(start)
                label = f.read(end - start).decode("utf-8")
            if self.label_processors is not None:
                label = self.label_processors[label_idx](label)
            return label
        start, end = soft.frame_range(self._rows[index])
        return torch.arange(start, end, dtype=torch.long)

    def collater(self, samples):
        # HubertDataset.collater hands collater_audio the waveforms of these samples, in this order
        self._collating.indices = [s["id"] for s in samples if s["source"] is not None]
        try:
            batch = super().collater(samples)
        finally:
            self._collating.indices = None
        if batch:  # named in error messages (e.g. a non-finite loss)
            batch["utt_names"] = [self.audio_names[i] for i in batch["id"].tolist()]
        if not batch or not any(s is not None for s in self.soft_labels):
            return batch
        targets = batch["target"] if self.single_target else batch["target_list"]
        targets = [targets] if self.single_target else targets
        soft_list: List[Optional[tuple]] = []
        for j, soft in enumerate(self.soft_labels):
            if soft is None:
                soft_list.append(None)
                continue
            frames = targets[j]
            valid = frames >= 0
            flat = frames[valid].numpy()
            ids = torch.from_numpy(np.asarray(soft.ids[flat], dtype=np.int64))
            probs = torch.from_numpy(np.asarray(soft.probs[flat], dtype=np.float32))
            k = ids.shape[1]
            lut = self.soft_luts[j]
            full_ids = frames.new_full(frames.shape + (k,), self.hard_pads[j])
            full_probs = torch.zeros(frames.shape + (k,), dtype=torch.float32)
            full_ids[valid] = lut[ids]
            full_probs[valid] = probs
            hard = frames.new_full(frames.shape, self.hard_pads[j])
            hard[valid] = full_ids[valid][:, 0]
            targets[j] = hard
            soft_list.append((full_ids, full_probs))
        if self.single_target:
            batch["target"] = targets[0]
        batch["soft_target_list"] = soft_list
        return batch
