"""Frame features for k-means labels: a teacher's transformer layer, or Kaldi-style MFCC.

Two readers with one interface (:class:`FeatureReader`):

* :class:`TeacherFeatureReader` -- output of transformer layer ``L`` (1-based) of any fairseq
  ``hubert`` or ``dicehubert_student`` checkpoint (or of several layers, concatenated per frame
  in the order given: ``--layer 6,9,12``, one forward to the deepest), exactly what fairseq's
  ``dump_hubert_feature.py`` computes (``extract_features(..., output_layer=L)``, waveform
  ``layer_norm`` when the task normalises, utterances longer than ``max_chunk`` samples cut into
  independent chunks), but batched over length-sorted utterances, under
  ``torch.inference_mode``, forward stopped at layer ``L``, optionally in fp16/bf16.
  Batching does not change the features: the conv front end runs per utterance when it has a
  GroupNorm over time (``extractor_mode=default``, HuBERT Base), the positional convolution
  reads zeros on padded frames (also behind ``conv_pos_batch_norm``'s BatchNorm), the
  transformer sees a frame-exact padding mask, and a conformer encoder (whose convolution
  module fairseq does not mask) runs each utterance alone, so a batched frame equals the
  unbatched one up to float rounding (:func:`~dicehubert_fairseq.hidden_states.hidden_states`,
  ``exact_padding=True``).
* :class:`MfccFeatureReader` -- 13 MFCC + delta + delta-delta (39 dims) at 100 Hz, the recipe
  of fairseq's ``dump_mfcc_feature.py`` (``torchaudio.compliance.kaldi.mfcc`` with
  ``use_energy=False`` then ``torchaudio.functional.compute_deltas`` twice), re-implemented with
  plain torch because torchaudio does not load beside torch 2.13 (see :func:`kaldi_mfcc`).

Audio is read with soundfile as float32 in [-1, 1] (as fairseq's readers do).
"""

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Collection, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checkpoint import load_model
from ..cli_args import int_list
from ..data.audio import read_audio
from ..data.files import Manifest
from ..errors import InputError
from ..frames import conv_layers, conv_output_length, frame_stride
from ..hidden_states import hidden_states

logger = logging.getLogger(__name__)

#: fairseq dump_hubert_feature's default ``max_chunk`` (100 s at 16 kHz).
MAX_CHUNK = 1_600_000


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


# --------------------------------------------------------------------------------- teacher


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
        padding_mask = torch.arange(src.size(1), device=src.device)[None, :] >= torch.tensor(
            lengths, device=src.device)[:, None]
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


# ------------------------------------------------------------------------------------ MFCC


def _mel_scale(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)


def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's triangular mel filter bank (no VTLN warping).

    Args:
        num_bins: number of mel bins.
        padded_window: FFT size.
        sample_rate: Hz.
        low_freq / high_freq: band edges in Hz (``high_freq <= 0`` is an offset from Nyquist).

    Returns:
        ``(num_bins, padded_window // 2 + 1)`` weights (the Nyquist column is zero, as Kaldi).
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_rate / padded_window
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    mel = _mel_scale(fft_bin_width * torch.arange(padded_window // 2, dtype=torch.float32)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).to(dtype)


def kaldi_dct(num_ceps: int, num_bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's DCT-II matrix ``(num_bins, num_ceps)`` (orthonormal, first column sqrt(1/N))."""
    n = torch.arange(float(num_bins))
    k = torch.arange(float(num_bins)).unsqueeze(1)
    dct = torch.cos(math.pi / float(num_bins) * (n + 0.5) * k)
    dct[0] *= 1.0 / math.sqrt(2.0)
    dct *= math.sqrt(2.0 / float(num_bins))
    dct = dct.t().contiguous()
    dct[:, 0] = math.sqrt(1 / float(num_bins))
    return dct[:, :num_ceps].to(dtype)


def kaldi_mfcc(wav: torch.Tensor, sample_rate: int = 16000, num_ceps: int = 13, num_mel_bins: int = 23,
               frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
               cepstral_lifter: float = 22.0, low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi ``compute-mfcc-feats`` with torchaudio's defaults and ``use_energy=False``.

    Povey window, DC removal per frame, pre-emphasis 0.97 (first sample against itself), FFT
    rounded up to a power of two, power spectrum, 23 mel bins from 20 Hz to Nyquist, log floored
    at float32 epsilon, DCT keeping 13 cepstra, lifter 22, ``snip_edges`` (only whole frames),
    no dither.  Same operations in the same order as ``torchaudio.compliance.kaldi.mfcc``.

    Args:
        wav: ``(S,)`` waveform (float32 in [-1, 1], as fairseq passes it).

    Returns:
        ``(T, num_ceps)`` with ``T = 1 + (S - 400) // 160`` at 16 kHz (0 frames if ``S < 400``).
    """
    dtype, device = wav.dtype, wav.device
    eps = torch.tensor(torch.finfo(torch.float).eps, dtype=dtype, device=device)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    size = int(sample_rate * frame_length_ms * 0.001)
    padded = 1 if size == 0 else 2 ** (size - 1).bit_length()
    if wav.numel() < size:
        return wav.new_zeros(0, num_ceps)
    m = 1 + (wav.numel() - size) // shift
    frames = wav.contiguous().as_strided((m, size), (shift * wav.stride(0), wav.stride(0)))
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    frames = frames - preemphasis * prev
    window = torch.hann_window(size, periodic=False, dtype=dtype, device=device).pow(0.85)
    frames = torch.nn.functional.pad(frames * window, (0, padded - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq, dtype).to(device)
    fbank = torch.maximum(torch.mm(power, banks.T), eps).log()
    ceps = fbank.matmul(kaldi_dct(num_ceps, num_mel_bins, dtype).to(device))
    lifter = 1.0 + 0.5 * cepstral_lifter * torch.sin(math.pi * torch.arange(num_ceps) / cepstral_lifter)
    return ceps * lifter.unsqueeze(0).to(device=device, dtype=dtype)


def compute_deltas(feats: torch.Tensor, win_length: int = 5) -> torch.Tensor:
    """Regression deltas along time (torchaudio's ``compute_deltas``, replicate padding).

    Args:
        feats: ``(C, T)``.

    Returns:
        ``(C, T)``: ``sum_{n=1..N} n (x[t+n] - x[t-n]) / (2 sum n^2)`` with ``N = (win - 1) // 2``.
    """
    n = (win_length - 1) // 2
    denom = n * (n + 1) * (2 * n + 1) / 3
    x = torch.nn.functional.pad(feats.unsqueeze(0), (n, n), mode="replicate")
    kernel = torch.arange(-n, n + 1, 1, device=feats.device, dtype=feats.dtype).repeat(feats.shape[0], 1, 1)
    return (torch.nn.functional.conv1d(x, kernel, groups=feats.shape[0]) / denom).squeeze(0)


def mfcc_39(wav: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """fairseq ``dump_mfcc_feature``'s features: MFCC + delta + delta-delta.

    Args:
        wav: ``(S,)`` float32 waveform.

    Returns:
        ``(T, 39)`` float32 at 100 Hz.
    """
    mfccs = kaldi_mfcc(wav, sample_rate).transpose(0, 1)  # (13, T)
    if mfccs.shape[1] == 0:
        return mfccs.new_zeros(0, 39)
    deltas = compute_deltas(mfccs)
    ddeltas = compute_deltas(deltas)
    return torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).contiguous()


class MfccFeatureReader(FeatureReader):
    """39-dim MFCC at 100 Hz (fairseq ``dump_mfcc_feature.py``), one utterance at a time on CPU.

    Args:
        sample_rate: audio sample rate (fairseq's default 16000).
    """

    batch_invariant = True

    def __init__(self, sample_rate: int = 16000):
        self.sample_rate = int(sample_rate)
        self.dim = 39
        self.frame_rate = 100.0
        self.description = {"type": "mfcc", "dim": 39, "frame_rate": 100.0, "sample_rate": self.sample_rate}

    def num_frames(self, num_samples: int) -> int:
        return conv_output_length(num_samples, [(int(self.sample_rate * 0.025), int(self.sample_rate * 0.010))])

    def features(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        with torch.inference_mode():
            return [mfcc_39(torch.from_numpy(np.asarray(w, dtype=np.float32)), self.sample_rate).numpy()
                    for w in wavs]


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
    max_batch_seconds: float = field(default=50.0, metadata={"help": "padded audio per inference batch, in seconds"})
    max_chunk: int = field(default=MAX_CHUNK, metadata={
        "help": "longer utterances are cut into chunks of this many samples (fairseq's default)"})


def make_reader(cfg: FeatureConfig) -> FeatureReader:
    """A :class:`TeacherFeatureReader` (``checkpoint`` + ``layer``) or :class:`MfccFeatureReader` (``mfcc``).

    Raises:
        InputError: neither or both sources, ``--checkpoint`` without ``--layer`` or ``--mfcc``
            with it, and everything :class:`TeacherFeatureReader` refuses.
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


# --------------------------------------------------------------------------------- batching


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


def iter_features(reader: FeatureReader, manifest: Manifest, indices: Sequence[int], max_batch_samples: int,
                  as_torch: bool = False, keep: Optional[Collection[int]] = None) -> Iterator[Tuple[int, object]]:
    """Features of ``manifest`` rows ``indices``, computed in length-sorted batches.

    Args:
        reader: the feature reader.
        manifest: the manifest.
        indices: rows to read (a block; results come batch by batch, not in this order).
        max_batch_samples: padded samples per batch (see :func:`length_sorted_batches`).
        as_torch: yield tensors on the reader's device instead of numpy arrays.
        keep: rows to yield (default: all of ``indices``). The batches are still planned over
            all of ``indices`` and computed whole when they hold a kept row (others are skipped),
            so a row's features do not depend on which rows are kept: batched float arithmetic
            changes in the last bits with the batch's other rows.

    Yields:
        ``(row, (T, D) features)`` for every row in ``indices`` (in ``keep``).
    """
    sizes = [manifest.sizes[i] for i in indices]
    for batch in length_sorted_batches(sizes, max_batch_samples):
        rows = [indices[j] for j in batch]
        if keep is not None and not any(r in keep for r in rows):
            continue
        wavs = [read_audio(manifest, r, reader.sample_rate) for r in rows]
        feats = reader.features_torch(wavs) if as_torch else reader.features(wavs)
        for r, w, f in zip(rows, wavs, feats):
            expected = reader.num_frames(len(w))
            if f.shape[0] != expected:  # pragma: no cover - a bug, not bad input
                raise RuntimeError(f"{manifest.audio_path(r)}: {f.shape[0]} frames, expected {expected}")
            if keep is None or r in keep:
                yield r, f
