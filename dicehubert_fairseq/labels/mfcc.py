"""Kaldi-style MFCC in plain torch: fairseq's ``dump_mfcc_feature.py`` features without torchaudio.

:class:`MfccFeatureReader` -- 13 MFCC + delta + delta-delta (39 dims) at 100 Hz, the recipe of
fairseq's ``dump_mfcc_feature.py`` (``torchaudio.compliance.kaldi.mfcc`` with
``use_energy=False`` then ``torchaudio.functional.compute_deltas`` twice), re-implemented with
plain torch because torchaudio does not load beside torch 2.13 (see :func:`kaldi_mfcc`).
MFCC of an utterance are computed alone, so they never depend on the other utterances read
with it (``batch_invariant``).
"""

import math
from typing import List, Sequence

import numpy as np
import torch

from ..frames import conv_output_length
from .features import FeatureReader


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
