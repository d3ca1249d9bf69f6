"""A synthetic phone-recognition corpus where every "phone" is a tone (the probe's tests).

Each utterance is a sequence of segments; a segment is a tone of the phone's frequency (with a
second harmonic, a short fade in and out and a little noise).  Consecutive phones differ, so every
segment is one phone.  Written in the probe's input format: ``{split}.tsv`` (fairseq manifest),
``{split}.phn`` (one line of space-separated phones per manifest row) and 16 kHz mono wavs.
"""

import argparse
import os
import shutil
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import soundfile as sf

from dicehubert_fairseq.data.files import read_manifest

from .data import write_checkpoint, write_random_labels

#: Default phone inventory: symbol -> frequency in Hz.  Few and far apart: a randomly initialised
#: HuBERT front end (10-sample first kernel, strided convs without anti-aliasing, per-channel
#: GroupNorm over time) keeps only part of a tone's identity; with eight tones from 220 Hz to
#: 3.7 kHz a linear classifier on its frames reached about 50% frame accuracy on held-out tones.
TONES: Dict[str, float] = {"a": 250.0, "b": 800.0, "c": 2000.0, "d": 5000.0}


def write_tone_corpus(
    directory: str,
    splits: Dict[str, int] = None,
    tones: Dict[str, float] = None,
    phones_per_utterance: Tuple[int, int] = (4, 10),
    segment_seconds: Tuple[float, float] = (0.08, 0.2),
    gap_seconds: Tuple[float, float] = (0.0, 0.0),
    noise: float = 0.02,
    sample_rate: int = 16000,
    seed: int = 0,
    align_rate: int = 0,
) -> Dict[str, List[List[str]]]:
    """Write a tone corpus: ``{split}.tsv``, ``{split}.phn`` and wavs under ``directory/wav``.

    Args:
        directory: output directory.
        splits: utterances per split, default ``{"train": 40, "valid": 10, "test": 10}``.
        tones: phone symbol -> frequency (Hz), default :data:`TONES`.
        phones_per_utterance: (min, max) segments of an utterance.
        segment_seconds: (min, max) duration of a segment.
        gap_seconds: (min, max) silence before each segment and at the end (default none).
        noise: standard deviation of the added white noise.
        seed: seed of every random choice.
        align_rate: > 0: also ``{split}.align``, the phone of every frame at this many frames per
            second (the one at the frame's centre; ``sil`` in the gaps), as ``dicehubert-labels
            quality --align`` reads it.

    Returns:
        the phone transcript of every utterance, per split.
    """
    splits = splits or {"train": 40, "valid": 10, "test": 10}
    tones = tones or TONES
    symbols: Sequence[str] = list(tones)
    rng = np.random.default_rng(seed)
    wav_dir = os.path.join(directory, "wav")
    os.makedirs(wav_dir, exist_ok=True)
    out: Dict[str, List[List[str]]] = {}
    for split, n in splits.items():
        rows, transcripts, aligns = [], [], []
        for i in range(n):
            k = int(rng.integers(phones_per_utterance[0], phones_per_utterance[1] + 1))
            phones: List[str] = []
            while len(phones) < k:
                p = symbols[int(rng.integers(len(symbols)))]
                if not phones or p != phones[-1]:
                    phones.append(p)
            pieces, owner = [], []  # owner: the phone of every piece (sil for the gaps)
            gap = lambda: np.zeros(int(rng.uniform(*gap_seconds) * sample_rate))  # noqa: E731
            for p in phones:
                pieces.append(gap())
                owner += ["sil", p]
                size = int(rng.uniform(*segment_seconds) * sample_rate)
                t = np.arange(size) / sample_rate
                f = tones[p] * rng.uniform(0.97, 1.03)
                seg = 0.5 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 0.15 * np.sin(4 * np.pi * f * t)
                fade = min(80, size // 4)
                env = np.ones(size)
                env[:fade] = np.linspace(0, 1, fade)
                env[size - fade:] = np.linspace(1, 0, fade)
                pieces.append(seg * env * rng.uniform(0.5, 1.0))
            pieces.append(gap())
            owner.append("sil")
            wav = np.concatenate(pieces) + noise * rng.standard_normal(sum(len(x) for x in pieces))
            name = f"{split}_{i:04d}.wav"
            sf.write(os.path.join(wav_dir, name), wav.astype(np.float32), sample_rate, subtype="PCM_16")
            rows.append(f"{name}\t{len(wav)}")
            transcripts.append(phones)
            if align_rate:
                sample_phone = np.repeat(owner, [len(x) for x in pieces])
                hop = sample_rate / align_rate
                aligns.append([str(sample_phone[int((j + 0.5) * hop)]) for j in range(int(len(wav) / hop))])
        with open(os.path.join(directory, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write(os.path.abspath(wav_dir) + "\n" + "\n".join(rows) + "\n")
        with open(os.path.join(directory, f"{split}.phn"), "w", encoding="utf-8") as f:
            f.write("".join(" ".join(t) + "\n" for t in transcripts))
        if align_rate:
            with open(os.path.join(directory, f"{split}.align"), "w", encoding="utf-8") as f:
                f.write("".join(" ".join(a) + "\n" for a in aligns))
        out[split] = transcripts
    return out


def write_tone_world(data: str, labels: str, checkpoint: str, splits: Dict[str, int], seed: int = 0) -> None:
    """A tone corpus in ``data``, random labels ``km`` for its train/valid in ``labels`` and a randomly
    initialised 2 x 32 fairseq ``hubert`` at ``checkpoint`` (seeded by ``seed``)."""
    write_tone_corpus(data, splits=splits, seed=seed)
    sizes = {s: read_manifest(os.path.join(data, f"{s}.tsv")).sizes for s in ("train", "valid")}
    write_random_labels(labels, sizes)
    write_checkpoint(checkpoint, data, labels, seed=seed)


def copy_data(data: str, directory: str) -> str:
    """A private copy of a tone corpus's manifests and transcripts in ``directory/data`` (the wavs are shared)."""
    d = os.path.join(directory, "data")
    os.makedirs(d)
    for name in os.listdir(data):
        if name.endswith((".tsv", ".phn")):
            shutil.copy(os.path.join(data, name), d)
    return d


def write_tone_world(directory: str, splits: Dict[str, int], seed: int = 0, align_rate: int = 0) -> Dict[str, str]:
    """A tone corpus in ``directory``, random labels for it in ``directory/labels`` and a randomly
    initialised 2 x 32 fairseq ``hubert`` checkpoint ``directory/hubert.pt`` (seeded by ``seed``);
    ``align_rate``: the corpus's frame alignments too (:func:`write_tone_corpus`).

    Returns:
        ``{"data": directory, "labels": ..., "ckpt": ...}``.
    """
    write_tone_corpus(directory, splits, seed=seed, align_rate=align_rate)
    sizes = {s: read_manifest(os.path.join(directory, f"{s}.tsv")).sizes for s in ("train", "valid")}
    labels = os.path.join(directory, "labels")
    write_random_labels(labels, sizes)
    ckpt = os.path.join(directory, "hubert.pt")
    write_checkpoint(ckpt, directory, labels, seed=seed)
    return {"data": directory, "labels": labels, "ckpt": ckpt}


def main(argv=None) -> int:
    """``python -m tests.helpers.tones OUT``: a tone corpus and a random tiny checkpoint.

    Writes ``OUT/{train,valid,test}.{tsv,phn}``, ``OUT/wav/`` and ``OUT/hubert.pt`` (a randomly
    initialised 2 x 32 fairseq ``hubert``), ready for ``dicehubert-probe --checkpoint OUT/hubert.pt
    --data OUT``.
    """
    p = argparse.ArgumentParser(prog="python -m tests.helpers.tones", description=main.__doc__)
    p.add_argument("out", help="output directory")
    p.add_argument("--train", type=int, default=60, help="training utterances (default: %(default)s)")
    p.add_argument("--valid", type=int, default=15, help="valid utterances (default: %(default)s)")
    p.add_argument("--test", type=int, default=15, help="test utterances (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and the checkpoint (default: %(default)s)")
    args = p.parse_args(argv)
    write_tone_world(args.out, {"train": args.train, "valid": args.valid, "test": args.test}, seed=args.seed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
