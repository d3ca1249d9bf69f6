"""Reading the audio of a manifest row (soundfile, float32 in [-1, 1], as fairseq's readers)."""

import logging

import numpy as np
import soundfile as sf

from ..errors import InputError, where
from .files import Manifest

logger = logging.getLogger(__name__)

#: Samples a file may differ from its manifest row before a warning (one 10 ms hop at 16 kHz).
LENGTH_TOLERANCE = 160


def read_audio(manifest: Manifest, i: int, sample_rate: int = 16000) -> np.ndarray:
    """Read row ``i`` of ``manifest`` as float32 mono samples in [-1, 1].

    Args:
        manifest: a parsed ``{split}.tsv``.
        i: 0-based row index.
        sample_rate: the rate the audio must have.

    Returns:
        ``(S,)`` float32 waveform.

    Raises:
        InputError: unreadable/corrupt file, wrong sample rate, more than one channel (message
            names the manifest line and the file).
    """
    path = manifest.audio_path(i)
    loc = where(manifest.path, i + 2)
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises RuntimeError / LibsndfileError / TypeError
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise InputError([f"{loc}: cannot read audio {path} ({msg})"]) from None
    if sr != sample_rate:
        raise InputError([f"{loc}: {path} has sample rate {sr} Hz, expected {sample_rate} Hz"])
    if wav.shape[1] != 1:
        raise InputError([f"{loc}: {path} has {wav.shape[1]} channels, expected mono"])
    if abs(len(wav) - manifest.sizes[i]) > LENGTH_TOLERANCE:
        logger.warning(f"{loc}: {path} has {len(wav)} samples, the manifest says {manifest.sizes[i]}")
    return np.ascontiguousarray(wav[:, 0])
