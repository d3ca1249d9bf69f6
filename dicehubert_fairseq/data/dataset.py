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
"""

import itertools
import logging
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fairseq.data import HubertDataset
from fairseq.data.audio.hubert_dataset import load_audio

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
        **kwargs: everything ``HubertDataset`` takes.
    """

    def __init__(
        self,
        manifest_path: str,
        *args,
        soft_labels: Sequence[Optional[SoftLabels]] = (),
        soft_luts: Sequence[Optional[np.ndarray]] = (),
        hard_pads: Sequence[int] = (),
        seed: int = 1,
        **kwargs,
    ):
        self.seed = int(seed)
        self.epoch = 1
        self._collating: Dict[int, Dict[int, int]] = {}  # thread -> {id(waveform): dataset index}
        self.soft_labels = list(soft_labels)
        self.soft_luts = [None if lut is None else torch.as_tensor(lut, dtype=torch.long) for lut in soft_luts]
        self.hard_pads = list(hard_pads)
        _, _, self._rows, _, _ = load_audio(
            manifest_path, kwargs.get("max_keep_sample_size"), kwargs.get("min_keep_sample_size")
        )
        super().__init__(manifest_path, *args, **kwargs)
        if not self.store_labels:
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

    def crop_to_max_size(self, wav, target_size):
        """``HubertDataset``'s crop, its random start drawn from :meth:`crop_rng` of the utterance.

        ``collater`` (through ``collater_audio``) calls it once per waveform to crop; the
        waveform is identified by the object it is, recorded by :meth:`collater`.
        """
        diff = len(wav) - target_size
        if diff <= 0 or not self.random_crop:
            return super().crop_to_max_size(wav, target_size)
        index = self._collating.get(threading.get_ident(), {}).get(id(wav))
        start = int(self.crop_rng(index).integers(0, diff + 1))
        return wav[start : start + target_size], start

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
        thread = threading.get_ident()
        self._collating[thread] = {id(s["source"]): s["id"] for s in samples if s["source"] is not None}
        try:
            batch = super().collater(samples)
        finally:
            self._collating.pop(thread, None)
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
