"""Frames of a fairseq conv front end: how many a waveform gives, how many samples apart, which are padding.

HuBERT's front end is a stack of un-padded 1-d convolutions given by fairseq's
``conv_feature_layers`` string (``"[(dim, kernel, stride), ...]"``); Kaldi-style MFCC frames are
the same arithmetic with one layer ``(window, shift)``. A batch of utterances of several lengths
is padded at the end of each row, and fairseq marks the padding True (:func:`padding_mask_of`).
"""

import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

#: ``(kernel, stride)`` of each layer, input side first.
ConvLayers = Sequence[Tuple[int, int]]


def conv_layers(front_end: Union[str, nn.Module]) -> List[Tuple[int, int]]:
    """``(kernel, stride)`` of every layer of a conv front end.

    Args:
        front_end: fairseq's ``conv_feature_layers`` string, or a model whose
            ``feature_extractor`` is fairseq's ``ConvFeatureExtractionModel`` (HuBERT-family).

    Returns:
        one ``(kernel, stride)`` per layer, input side first.
    """
    if isinstance(front_end, str):
        # fairseq's own format, read with eval as HubertModel reads it
        return [(int(k), int(s)) for _, k, s in eval(front_end)]  # noqa: S307
    convs = (next(m for m in block.modules() if isinstance(m, nn.Conv1d))
             for block in front_end.feature_extractor.conv_layers)
    return [(int(c.kernel_size[0]), int(c.stride[0])) for c in convs]


def conv_output_length(num_samples: int, layers: ConvLayers) -> int:
    """Frames a stack of un-padded 1-d convolutions makes of ``num_samples`` samples.

    Args:
        num_samples: input length.
        layers: ``(kernel, stride)`` of each layer (see :func:`conv_layers`).

    Returns:
        ``floor((n - k) / s) + 1`` applied layer by layer (0 if the input is too short).
    """
    n = int(num_samples)
    for k, s in layers:
        if n < k:
            return 0
        n = (n - k) // s + 1
    return n


def frame_stride(layers: ConvLayers) -> int:
    """Samples between two consecutive frames: the product of the strides."""
    return math.prod(int(s) for _, s in layers)


def padding_mask_of(lengths: Union[Sequence[int], torch.Tensor], size: int, device=None) -> torch.Tensor:
    """fairseq's padding mask of a batch padded at the end of each row.

    Args:
        lengths: ``(B,)`` samples (or frames) of each row.
        size: the padded length ``T``.
        device: where to build it.

    Returns:
        ``(B, T)`` bool, True on padding (position ``t >= lengths[b]``).
    """
    return torch.arange(size, device=device)[None, :] >= torch.as_tensor(lengths, device=device)[:, None]
