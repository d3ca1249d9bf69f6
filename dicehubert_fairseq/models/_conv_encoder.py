"""An encoder without attention for ``dicehubert_student`` (``model.layer_type=conv``).

:class:`ConvEncoder` *is* fairseq's wav2vec2/HuBERT ``TransformerEncoder`` -- the positional
convolution, the layer norm, dropout, LayerDrop, the padding to ``required_seq_len_multiple`` and
the ``layer=`` stop that ``extract_features(output_layer=L)`` uses -- with its layers built by
:meth:`ConvEncoder.build_encoder_layer` (fairseq's own extension point) as :class:`ConvBlock`:
depthwise-separable 1-D convolutions and a feed-forward network, no attention.  A block returns
what fairseq's encoder loop expects of a layer (``x, (attn, layer_result)``), so
:func:`~dicehubert_fairseq.hidden_states.hidden_states`, the criteria, the label dumper and the
probe run it unchanged.

Receptive field: block ``i`` convolves over ``kernel`` frames ``dilations[i % len(dilations)]``
apart, so the encoder sees ``1 + (kernel - 1) * sum of the blocks' dilations`` frames (centred),
plus the positional convolution's ``conv_pos - 1``.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder
from fairseq.modules import LayerNorm
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from torch import nn

from ..errors import InputError


class ConvBlock(nn.Module):
    """One attention-free encoder block, ``(T, B, D)`` in and out.

    A convolution module -- pointwise ``D -> 2D`` with a GLU, a depthwise convolution of ``kernel``
    frames ``dilation`` apart ("same" padding), the activation, pointwise ``D -> D`` -- then the
    feed-forward network of a transformer layer (``D -> ffn_dim -> D``), each with a residual
    connection and a layer norm, after it (``layer_norm_first=False``, as HuBERT Base's layers)
    or before it.  Padded frames are zeroed before the depthwise convolution, so a padded batch
    gives each utterance the states it gets alone.
    """

    def __init__(self, dim: int, ffn_dim: int, kernel: int, dilation: int, dropout: float,
                 activation_dropout: float, activation_fn: str, layer_norm_first: bool) -> None:
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.conv_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                                   groups=dim)
        self.conv_out = nn.Linear(dim, dim)
        self.conv_norm = LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = LayerNorm(dim)
        self.activation = utils.get_activation_fn(activation_fn)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def convolve(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The convolution module on ``(T, B, D)``; ``padding_mask`` ``(B, T)``, True on padding."""
        x = F.glu(self.conv_in(x), dim=-1)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.t().unsqueeze(-1), 0.0)
        x = self.depthwise(x.permute(1, 2, 0)).permute(2, 0, 1)
        return self.conv_out(self.activation(x))

    def _residual(self, x: torch.Tensor, norm: nn.Module, branch) -> torch.Tensor:
        if self.layer_norm_first:
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))

    def forward(self, x: torch.Tensor, self_attn_mask=None, self_attn_padding_mask=None, need_weights=False,
                att_args=None, **kwargs):
        """fairseq's encoder-layer call: ``x`` ``(T, B, D)``, ``self_attn_padding_mask`` ``(B, T)``.

        Returns:
            ``(x, (None, x))``: no attention weights; the block's output as its layer result
            (fairseq's encoder trims it with ``x`` when it padded the sequence).
        """
        x = self._residual(x, self.conv_norm, lambda h: self.convolve(h, self_attn_padding_mask))
        x = self._residual(x, self.ffn_norm,
                           lambda h: self.ffn_out(self.activation_dropout(self.activation(self.ffn_in(h)))))
        return x, (None, x)


def dilations_of(cfg) -> List[int]:
    """The dilation of every block (``conv_encoder_dilations`` repeated over ``encoder_layers``)."""
    pattern = [int(d) for d in cfg.conv_encoder_dilations]
    return [pattern[i % len(pattern)] for i in range(int(cfg.encoder_layers))]


def receptive_field(cfg) -> int:
    """Frames the encoder sees around a frame: its blocks' dilated kernels and the positional conv."""
    kernel = int(cfg.depthwise_conv_kernel_size)
    return 1 + (kernel - 1) * sum(dilations_of(cfg)) + int(cfg.conv_pos) - 1


def check_conv_encoder(cfg) -> None:
    """The settings of a convolution-only encoder, as one error.

    Raises:
        InputError: an even kernel (no centred "same" padding), no dilations or one below 1.
    """
    problems = []
    kernel = int(cfg.depthwise_conv_kernel_size)
    if kernel < 1 or kernel % 2 == 0:
        problems.append(f"model.depthwise_conv_kernel_size={kernel}: the convolution-only encoder's depthwise "
                        f"kernel must be odd (centred, \"same\" padding), e.g. 31")
    dilations = list(cfg.conv_encoder_dilations)
    if not dilations or any(int(d) < 1 for d in dilations):
        problems.append(f"model.conv_encoder_dilations={dilations}: expected one or more dilations >= 1 "
                        f"(repeated over the blocks), e.g. [1, 2, 4, 8]")
    if problems:
        raise InputError(problems)


class ConvEncoder(TransformerEncoder):
    """fairseq's ``TransformerEncoder`` whose layers are :class:`ConvBlock` (``model.layer_type=conv``)."""

    def __init__(self, cfg) -> None:
        check_conv_encoder(cfg)
        self._dilations = dilations_of(cfg)
        super().__init__(cfg)

    def build_encoder_layer(self, args, **kwargs) -> nn.Module:
        layer = ConvBlock(
            dim=self.embedding_dim,
            ffn_dim=args.encoder_ffn_embed_dim,
            kernel=int(args.depthwise_conv_kernel_size),
            dilation=self._dilations[kwargs["layer_idx"]],
            dropout=self.dropout,
            activation_dropout=args.activation_dropout,
            activation_fn=str(args.activation_fn),
            layer_norm_first=args.layer_norm_first,
        )
        if args.checkpoint_activations:
            layer = checkpoint_wrapper(layer)
        return layer
