"""Features of whole utterances kept in memory: the one cache of the label dumper and of the probe.

* ``dicehubert-labels run`` keeps the k-means sample's features here while fitting, keyed by
  manifest row, up to a bound in frames, and takes them from here when dumping
  (:class:`~dicehubert_fairseq.labels.features.FeatureSource`);
* the probe keeps every hidden state of every utterance of a split
  (:func:`~dicehubert_fairseq.probe.features.extract_split`) and trains on views of it.

Frames are stored back to back in one tensor allocated once (untouched pages of it take no
memory), utterance after utterance in the order they are added.
"""

from typing import Dict, List, Optional, Sequence

import torch


class FeatureCache:
    """Whole utterances' features, ``states`` vectors of ``dim`` per frame, at most ``capacity`` frames.

    Args:
        capacity: frames it can hold.
        dim: ``D``, the width of one feature vector.
        states: feature vectors per frame (the probe: every hidden state, ``L + 1``; labels: 1).

    Attributes:
        feats: ``(states, N, D)`` float32 view of the ``N`` frames held.
        offsets: ``(U + 1,)`` int64 frame offsets of the ``U`` utterances held, in the order added.
        served_frames / served_rows: what :meth:`get` returned so far.
    """

    def __init__(self, capacity: int, dim: int, states: int = 1, _buffer: Optional[torch.Tensor] = None,
                 _offsets: Sequence[int] = (0,)):
        self.capacity = int(capacity)
        self._buffer = torch.empty(int(states), self.capacity, int(dim)) if _buffer is None else _buffer
        self._offsets: List[int] = list(_offsets)
        self._position: Dict[int, int] = {u: u for u in range(len(self._offsets) - 1)}
        self.frozen = False
        self.served_frames = 0
        self.served_rows = 0

    @property
    def feats(self) -> torch.Tensor:
        return self._buffer[:, : self._offsets[-1]]

    @property
    def offsets(self) -> torch.Tensor:
        return torch.tensor(self._offsets, dtype=torch.long)

    @property
    def frames(self) -> int:
        """Frames held."""
        return self._offsets[-1]

    @property
    def lengths(self) -> torch.Tensor:
        """``(U,)`` frames of each utterance held."""
        offsets = self.offsets
        return offsets[1:] - offsets[:-1]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __contains__(self, key: int) -> bool:
        return key in self._position

    def add(self, key: int, feats) -> bool:
        """Keep one utterance's features under ``key`` if there is room and the cache is not frozen.

        Args:
            key: what :meth:`get` finds them by (a manifest row).
            feats: ``(T, D)`` (one state per frame) or ``(states, T, D)``, a tensor or an array (copied).

        Returns:
            whether they were kept.
        """
        feats = torch.as_tensor(feats)
        if feats.dim() == 2:
            feats = feats.unsqueeze(0)
        start, n = self._offsets[-1], feats.shape[1]
        if self.frozen or key in self._position or start + n > self.capacity:
            return False
        self._buffer[:, start : start + n] = feats
        self._position[key] = len(self._offsets) - 1
        self._offsets.append(start + n)
        return True

    def get(self, key: int) -> torch.Tensor:
        """The features kept under ``key``: ``(T, D)`` with one state per frame, else ``(states, T, D)`` (a view)."""
        u = self._position[key]
        f = self._buffer[:, self._offsets[u] : self._offsets[u + 1]]
        self.served_frames += f.shape[1]
        self.served_rows += 1
        return f[0] if f.shape[0] == 1 else f

    def freeze(self) -> None:
        """Take no more utterances."""
        self.frozen = True

    def frame_index(self, utts: Sequence[int]) -> torch.Tensor:
        """``(n,)`` frame indices of the utterances at positions ``utts`` (in the order added), concatenated."""
        return torch.cat([torch.arange(self._offsets[u], self._offsets[u + 1]) for u in utts])

    def select(self, utts: Sequence[int]) -> "FeatureCache":
        """A new cache holding the utterances at positions ``utts``, in that order (a copy; its keys
        are their new positions)."""
        lengths = [self._offsets[u + 1] - self._offsets[u] for u in utts]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        feats = self.feats[:, self.frame_index(utts)]
        return FeatureCache(offsets[-1], feats.shape[2], feats.shape[0], _buffer=feats, _offsets=offsets)

    def to(self, device) -> "FeatureCache":
        """The same utterances, under the same keys, with their features on ``device``."""
        feats = self.feats.to(device)
        moved = FeatureCache(self.frames, feats.shape[2], feats.shape[0], _buffer=feats, _offsets=self._offsets)
        moved._position = dict(self._position)
        return moved
