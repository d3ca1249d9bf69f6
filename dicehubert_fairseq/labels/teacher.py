"""A teacher's transformer layer as frame features for k-means labels (:class:`TeacherFeatureReader`).

The output of transformer layer ``L`` (1-based) of any fairseq ``hubert`` or
``dicehubert_student`` checkpoint (or of several layers, concatenated per frame in the order
given: ``--layer 6,9,12``, one forward to the deepest), exactly what fairseq's
``dump_hubert_feature.py`` computes (``extract_features(..., output_layer=L)``, waveform
``layer_norm`` when the task normalises, utterances longer than ``max_chunk`` samples cut into
independent chunks), under ``torch.inference_mode``, forward stopped at layer ``L``, optionally
in fp16/bf16; one utterance at a time on CPU (padded batches were slower there), in
length-sorted padded batches on a GPU (``--max-batch-seconds``).

Batching does not change the features: the conv front end runs per utterance when it has a
GroupNorm over time (``extractor_mode=default``, HuBERT Base), the positional convolution reads
zeros on padded frames (also behind ``conv_pos_batch_norm``'s BatchNorm), the transformer sees a
frame-exact padding mask, and a conformer encoder (whose convolution module fairseq does not
mask) runs each utterance alone, so a batched frame equals the unbatched one up to float
rounding (:func:`~dicehubert_fairseq.hidden_states.hidden_states`, ``exact_padding=True``).
Features computed alone are bit-for-bit the same whatever the other utterances
(:func:`~.features.computed_alone`), which lets a feature cache reuse them exactly.
"""

import contextlib
import logging
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checkpoint import load_model
from ..errors import InputError
from ..frames import conv_layers, conv_output_length, frame_stride, padding_mask_of
from ..hidden_states import hidden_states
from .features import FeatureReader

logger = logging.getLogger(__name__)

#: fairseq dump_hubert_feature's default ``max_chunk`` (100 s at 16 kHz).
MAX_CHUNK = 1_600_000


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX); Linux only, else False."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name in (None, "float32", "fp32"):
        return None
    return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]


class TeacherFeatureReader(FeatureReader):
    """Output of transformer layer ``layer`` (1-based) of a HuBERT-family checkpoint.

    Args:
        checkpoint: fairseq ``hubert`` or ``dicehubert_student`` checkpoint.
        layer: 1-based transformer layer (as fairseq's ``dump_hubert_feature.py``), or several
            distinct layers whose outputs are concatenated per frame in the order given
            (``dim`` = their number x the model's width; one forward to the deepest).
        device: ``cpu`` or ``cuda``.
        dtype: ``float32`` (default), ``float16`` (CUDA only) or ``bfloat16`` (autocast; on CPU
            only where the CPU supports it well).  Features are returned as float32.
        max_chunk: utterances longer than this many samples are cut into independent chunks
            (fairseq's default, 100 s) and their features concatenated.

    Raises:
        InputError: checkpoint missing/corrupt/not HuBERT-family, layer out of range, fp16 on CPU.
    """

    def __init__(self, checkpoint: str, layer: Union[int, Sequence[int]], device: str = "cpu",
                 dtype: Optional[str] = None, max_chunk: int = MAX_CHUNK):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError([f"--device {device}: CUDA is not available on this machine"])
        self.autocast_dtype = _dtype(dtype)
        if self.autocast_dtype is torch.float16 and not device.startswith("cuda"):
            raise InputError(["--dtype float16 needs --device cuda (use bfloat16 on CPU)"])
        if self.autocast_dtype is torch.bfloat16 and not device.startswith("cuda") and not cpu_has_bf16():
            # measured here (AVX2 only): the conv front end ~25x and the transformer ~3x slower than fp32
            logger.warning("--dtype bfloat16: this CPU has no bfloat16 instructions (avx512_bf16/amx_bf16); "
                           "expect it to be much slower than float32")
        self.layers = [int(layer)] if isinstance(layer, int) else [int(v) for v in layer]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise InputError([f"--layer: expected distinct 1-based layers such as 9 or 6,9,12, found {layer}"])
        below = [v for v in self.layers if v < 1]  # load_model names the checkpoint and its layers
        self.model, cfg = load_model(checkpoint, device=device, layer=below[0] if below else max(self.layers))
        #: the deepest layer: where the forward stops
        self.layer = max(self.layers)
        self._device = torch.device(device)
        self.max_chunk = int(max_chunk)
        task_cfg = cfg["task"] if hasattr(cfg, "__getitem__") else cfg.task
        self.sample_rate = int(task_cfg.get("sample_rate", 16000))
        self.normalize_wav = bool(task_cfg.get("normalize", False))
        model_cfg = cfg["model"]
        self.extractor_mode = str(model_cfg.get("extractor_mode", "default"))
        self._conv = conv_layers(self.model)
        self.frame_rate = self.sample_rate / frame_stride(self._conv)
        width = int(self.model.encoder.embedding_dim if hasattr(self.model.encoder, "embedding_dim")
                    else model_cfg["encoder_embed_dim"])
        self.dim = width * len(self.layers)
        # fp16 weights on CUDA halve memory; bf16 on CPU stays under autocast with fp32 weights
        if self.autocast_dtype is torch.float16:
            self.model.half()
            self.autocast_dtype = None
            self._input_dtype = torch.float16
        else:
            self._input_dtype = torch.float32
        self.description = {
            "type": "hubert", "checkpoint": os.path.abspath(checkpoint),
            "layer": self.layers[0] if len(self.layers) == 1 else list(self.layers),
            "dim": self.dim, "frame_rate": self.frame_rate, "sample_rate": self.sample_rate,
            "normalize_wav": self.normalize_wav, "extractor_mode": self.extractor_mode,
            "max_chunk": self.max_chunk, "dtype": dtype or "float32",
        }
        logger.info(f"teacher {checkpoint}: layer {','.join(map(str, self.layers))} of "
                    f"{len(self.model.encoder.layers)}, "
                    f"dim {self.dim}, {self.frame_rate:g} Hz, device {device}, dtype {dtype or 'float32'}")

    @property
    def device(self) -> torch.device:
        return self._device

    def _chunks(self, num_samples: int) -> List[Tuple[int, int]]:
        return [(s, min(s + self.max_chunk, num_samples)) for s in range(0, num_samples, self.max_chunk)]

    def num_frames(self, num_samples: int) -> int:
        return sum(conv_output_length(b - a, self._conv) for a, b in self._chunks(num_samples))

    def _prepare(self, wav: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(wav, dtype=np.float32)).to(self._device)
        if self.normalize_wav:
            x = torch.nn.functional.layer_norm(x, x.shape)
        return x

    def _forward(self, items: List[torch.Tensor]) -> List[torch.Tensor]:
        lengths = [len(x) for x in items]
        src = items[0].new_zeros(len(items), max(lengths), dtype=self._input_dtype)
        for b, x in enumerate(items):
            src[b, : len(x)] = x
        padding_mask = padding_mask_of(lengths, src.size(1), device=src.device)
        # HubertModel.extract_features(output_layer=L), batched, each utterance as if alone
        h = hidden_states(self.model, src, padding_mask, output_layer=self.layer, exact_padding=True)
        x = h.x if len(self.layers) == 1 else torch.cat([h.layers[k - 1] for k in self.layers], dim=-1)
        return [x[b, : conv_output_length(n, self._conv)].float() for b, n in enumerate(lengths)]

    def features_torch(self, wavs: Sequence[np.ndarray]) -> List[torch.Tensor]:
        items, owner = [], []
        for u, wav in enumerate(wavs):
            x = self._prepare(wav)  # fairseq normalises the whole waveform, then chunks
            for a, b in self._chunks(len(x)):
                items.append(x[a:b])
                owner.append(u)
        with torch.inference_mode():
            ctx = (torch.autocast(self._device.type, dtype=self.autocast_dtype)
                   if self.autocast_dtype is not None else contextlib.nullcontext())
            with ctx:
                outs = self._forward(items)
        per_utt: List[List[torch.Tensor]] = [[] for _ in wavs]
        for u, o in zip(owner, outs):
            per_utt[u].append(o)
        return [p[0] if len(p) == 1 else torch.cat(p, 0) for p in per_utt]

    def features(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        return [f.cpu().numpy() for f in self.features_torch(wavs)]
