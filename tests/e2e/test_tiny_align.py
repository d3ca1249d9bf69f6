"""examples/tiny/synth_corpus.py --align: frame-level phones of espeak-ng's speech from its phoneme events, then
``dicehubert-labels quality`` on them.

The phones met in the events must be the transcript's (synth_corpus checks it), the 0.1 s of silence sox pads each
utterance with must be silence and the first phone must start where the padding ends (the offset arithmetic), and
the phone frames must be loud where the silence frames are quiet.
"""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.labels.cli import main as labels_main
from tests.e2e.test_tiny_example import TINY, _env, require_speech_tools

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def aligned_corpus(tmp_path_factory):
    require_speech_tools()
    out = tmp_path_factory.mktemp("aligned")
    proc = subprocess.run([sys.executable, os.path.join(TINY, "synth_corpus.py"), "--out", str(out), "--minutes", "0.8",
                           "--seed", "5", "--jobs", "1", "--align"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out)


def _rows(path):
    with open(path) as f:
        return [line.split() for line in f.read().splitlines()]


def test_alignments_time_the_transcripts_phones(aligned_corpus):
    first_phone, loud, quiet = [], [], []
    for split in ("train", "valid", "test"):
        m = read_manifest(os.path.join(aligned_corpus, f"{split}.tsv"))
        align = _rows(os.path.join(aligned_corpus, f"{split}.align"))
        phn = _rows(os.path.join(aligned_corpus, f"{split}.phn"))
        assert len(align) == len(phn) == len(m)
        for i, (frames, phones) in enumerate(zip(align, phn)):
            assert len(frames) == m.sizes[i] * 100 // 16000
            # phones in the order of the transcript (a phone shorter than a frame may fall between centres)
            runs = [p for p, _ in itertools.groupby(frames) if p != "sil"]
            ref = [p for p, _ in itertools.groupby(phones)]
            it = iter(ref)
            assert all(p in it for p in runs) and len(runs) >= 0.9 * len(ref), (runs, ref)
            assert frames[:9] == ["sil"] * 9 and frames[-9:] == ["sil"] * 9  # sox's 0.1 s pads
            first_phone.append(next(t for t, p in enumerate(frames) if p != "sil"))
            wav, _ = sf.read(m.audio_path(i), dtype="float32")
            rms = np.sqrt(np.square(wav[: len(frames) * 160].reshape(-1, 160)).mean(1))
            loud.extend(rms[[t for t, p in enumerate(frames) if p != "sil"]])
            quiet.extend(rms[[t for t, p in enumerate(frames) if p == "sil"]])
    # sox trims the leading silence to the first sound and pads 0.1 s: the first phone starts there
    assert all(9 <= t <= 12 for t in first_phone), first_phone
    assert np.median(loud) > 20 * np.median(quiet)


def test_quality_of_labels_against_the_alignments(aligned_corpus, tmp_path, capsys):
    """Labels at 100 Hz that are the aligned phones themselves: every metric is 1."""
    align = os.path.join(aligned_corpus, "valid.align")
    rows = _rows(align)
    phones = sorted({p for r in rows for p in r})
    with open(tmp_path / "valid.phid", "w") as f:
        f.writelines(" ".join(str(phones.index(p)) for p in r) + "\n" for r in rows)
    assert labels_main(["quality", "--label-dir", str(tmp_path), "--labels", "phid", "--align", align,
                        "--label-rate", "100"]) == 0
    assert "| 1.0000 | 1.0000 | 1.0000 |" in capsys.readouterr().out
