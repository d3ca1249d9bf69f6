"""Feature readers of dicehubert-labels: teacher layer (== fairseq's extract_features) and MFCC."""

import ast
import importlib.util
import math
import os
import types

import numpy as np
import pytest
import torch

from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.data.audio import read_audio
from dicehubert_fairseq.frames import conv_output_length
from dicehubert_fairseq.labels.features import length_sorted_batches
from dicehubert_fairseq.labels.mfcc import MfccFeatureReader, compute_deltas, kaldi_mfcc, mfcc_39
from dicehubert_fairseq.labels.teacher import TeacherFeatureReader


@pytest.fixture(scope="module")
def utts(tiny_corpus):
    m = read_manifest(os.path.join(tiny_corpus["data"], "valid.tsv"))
    return m, [read_audio(m, i) for i in range(len(m))]


def _fairseq_layer(model, wav, layer, max_chunk=1_600_000):
    """fairseq dump_hubert_feature.HubertFeatureReader.get_feats, on CPU."""
    x = torch.from_numpy(wav).float().view(1, -1)
    out = []
    with torch.no_grad():
        for s in range(0, x.size(1), max_chunk):
            f, _ = model.extract_features(source=x[:, s : s + max_chunk], padding_mask=None, mask=False,
                                          output_layer=layer)
            out.append(f)
    return torch.cat(out, 1)[0].numpy()


@pytest.mark.parametrize("layer", [1, 2])
def test_teacher_batched_features_equal_fairseq_per_utterance(tiny_teacher, utts, layer):
    m, wavs = utts
    reader = TeacherFeatureReader(tiny_teacher, layer)
    feats = reader.features(wavs)  # one batch of 4 different lengths
    assert reader.dim == 32 and reader.frame_rate == 50
    for w, f in zip(wavs, feats):
        ref = _fairseq_layer(reader.model, w, layer)
        assert f.shape == ref.shape == (reader.num_frames(len(w)), 32)
        assert f.dtype == np.float32
        np.testing.assert_allclose(f, ref, atol=2e-5, rtol=1e-4)
    # 50 Hz: (S - 400) // 320 + 1 for HuBERT's conv stack
    assert [len(f) for f in feats] == [(len(w) - 400) // 320 + 1 for w in wavs]



@pytest.mark.parametrize("name", ["posbn", "conformer"])
def test_teacher_batched_features_equal_fairseq_per_utterance_batch_norm_pos_conv_and_conformer(
        export_models, utts, name):
    """Teachers whose padded batches fairseq gets wrong: conv_pos_batch_norm, conformer layers."""
    _, wavs = utts
    reader = TeacherFeatureReader(export_models[name], 2)
    for w, f in zip(wavs, reader.features(wavs)):
        np.testing.assert_allclose(f, _fairseq_layer(reader.model, w, 2), atol=2e-5, rtol=1e-4)


def test_teacher_layers_concatenated_per_frame(feat_world, one_torch_thread):
    """--layer 6,9,12: each frame is the three layers' outputs side by side, in the order given, each equal to
    fairseq's extract_features(output_layer=L) alone; one forward to the deepest layer."""
    m = read_manifest(os.path.join(feat_world["data"], "valid.tsv"))
    wavs = [read_audio(m, i) for i in range(len(m))]
    reader = TeacherFeatureReader(feat_world["teacher"], [12, 6, 9])
    assert reader.dim == 3 * 32 and reader.description["layer"] == [12, 6, 9]
    called = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: called.append(i))
             for i, layer in enumerate(reader.model.encoder.layers)]
    feats = reader.features(wavs)
    for h in hooks:
        h.remove()
    assert called == list(range(12))  # one batch, one forward through the 12 layers
    for w, f in zip(wavs, feats):
        assert f.shape == (reader.num_frames(len(w)), 96)
        for k, layer in enumerate([12, 6, 9]):
            np.testing.assert_allclose(f[:, 32 * k : 32 * (k + 1)], _fairseq_layer(reader.model, w, layer),
                                       atol=2e-5, rtol=1e-4)
    assert TeacherFeatureReader(feat_world["teacher"], [9]).description["layer"] == 9  # one layer: as before
    with pytest.raises(InputError, match="layer 13 out of range"):
        TeacherFeatureReader(feat_world["teacher"], [6, 13])
    with pytest.raises(InputError, match=r"layer 0 out of range \(the model has transformer layers 1\.\.12\)"):
        TeacherFeatureReader(feat_world["teacher"], [0, 6])
    with pytest.raises(InputError, match="distinct"):
        TeacherFeatureReader(feat_world["teacher"], [6, 6])

def test_teacher_long_utterances_are_chunked_like_fairseq(tiny_teacher, utts):
    _, wavs = utts
    reader = TeacherFeatureReader(tiny_teacher, 2, max_chunk=12000)
    f = reader.features(wavs[:2])
    for w, got in zip(wavs[:2], f):
        ref = _fairseq_layer(reader.model, w, 2, max_chunk=12000)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
        assert len(got) == sum(conv_output_length(min(12000, len(w) - s), reader._conv) for s in range(0, len(w), 12000))


def test_teacher_forward_stops_at_layer(tiny_teacher, utts):
    _, wavs = utts
    reader = TeacherFeatureReader(tiny_teacher, 1)
    called = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: called.append(i))
             for i, layer in enumerate(reader.model.encoder.layers)]
    reader.features(wavs[:2])
    for h in hooks:
        h.remove()
    assert called and set(called) == {0}


def test_teacher_bfloat16_close_to_float32(tiny_teacher, utts):
    _, wavs = utts
    f32 = TeacherFeatureReader(tiny_teacher, 2).features(wavs[:2])
    bf = TeacherFeatureReader(tiny_teacher, 2, dtype="bfloat16").features(wavs[:2])
    for a, b in zip(f32, bf):
        assert b.dtype == np.float32 and a.shape == b.shape
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.mean() > 0.99


def test_length_sorted_batches_cover_everything_once():
    lengths = [5, 100, 7, 100, 50, 3, 60]
    batches = length_sorted_batches(lengths, max_batch_samples=200, max_batch_size=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 200
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


# ----------------------------------------------------------------------------- MFCC


def numpy_kaldi_mfcc39(x, sr=16000):
    """Kaldi compute-mfcc-feats (use-energy=false, dither 0) + deltas, written from Kaldi's docs in float64."""
    x = np.asarray(x, dtype=np.float64)
    N, S, P, B, C, L = 400, 160, 512, 23, 13, 22.0
    T = 1 + (len(x) - N) // S
    n = np.arange(N)
    win = (0.5 - 0.5 * np.cos(2 * np.pi * n / (N - 1))) ** 0.85

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(sr / 2)
    d = (hi - lo) / (B + 1)
    banks = np.zeros((B, P // 2 + 1))
    for b in range(B):
        left, center, right = lo + b * d, lo + (b + 1) * d, lo + (b + 2) * d
        for k in range(P // 2):  # Kaldi ignores the Nyquist bin
            mm = mel(k * sr / P)
            if left < mm < right:
                banks[b, k] = (mm - left) / (center - left) if mm <= center else (right - mm) / (right - center)
    dct = np.array([[math.sqrt((1.0 if k == 0 else 2.0) / B) * math.cos(math.pi / B * (j + 0.5) * k)
                     for j in range(B)] for k in range(C)])
    lifter = 1.0 + 0.5 * L * np.sin(np.pi * np.arange(C) / L)
    out = np.zeros((T, C))
    for t in range(T):
        fr = x[t * S : t * S + N].copy()
        fr -= fr.mean()
        pre = fr.copy()
        pre[1:] -= 0.97 * fr[:-1]
        pre[0] -= 0.97 * fr[0]
        spec = np.abs(np.fft.rfft(pre * win, P)) ** 2
        fb = np.log(np.maximum(banks @ spec, np.finfo(np.float32).eps))
        out[t] = (dct @ fb) * lifter

    def deltas(c):
        Tn = len(c)
        return np.stack([sum(k * (c[min(t + k, Tn - 1)] - c[max(t - k, 0)]) for k in (1, 2)) / 10.0
                         for t in range(Tn)])

    d1 = deltas(out)
    return np.concatenate([out, d1, deltas(d1)], axis=1)


def test_mfcc_matches_float64_kaldi_reference(utts):
    _, wavs = utts
    reader = MfccFeatureReader()
    for w in wavs[:3]:
        got = reader.features([w])[0]
        ref = numpy_kaldi_mfcc39(w)
        assert got.shape == ref.shape == (1 + (len(w) - 400) // 160, 39)
        assert reader.num_frames(len(w)) == len(got)
        # float32 vs float64: the cepstra agree to ~1e-4 of their spread
        err = np.abs(got - ref).max(0) / ref.std(0)
        assert err.max() < 1e-3, err


def _torchaudio_source_namespace():
    """torchaudio's own kaldi.mfcc / compute_deltas / create_dct, executed from its source text
    (the package is never imported: its C++ extension does not load beside torch 2.13)."""
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or not spec.submodule_search_locations:
        # fairseq depends on torchaudio, so `pip install -e '.[test]'` installs its sources and this
        # runs; it is skipped only in an environment built without torchaudio
        pytest.skip("torchaudio's source files are not installed (they come with fairseq's dependencies; "
                    "this comparison runs wherever `pip install torchaudio` put them)")
    root = spec.submodule_search_locations[0]
    with open(os.path.join(root, "functional", "functional.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    from typing import Optional

    ns = {"torch": torch, "math": math, "Tensor": torch.Tensor, "Optional": Optional}
    for name in ("create_dct", "compute_deltas"):
        exec(compile(ast.Module(body=[funcs[name]], type_ignores=[]), "torchaudio-functional", "exec"), ns)
    fake = types.SimpleNamespace(functional=types.SimpleNamespace(create_dct=ns["create_dct"],
                                                                  compute_deltas=ns["compute_deltas"]))
    with open(os.path.join(root, "compliance", "kaldi.py"), encoding="utf-8") as f:
        src = f.read().replace("import torchaudio\n", "", 1)
    kaldi = {"__name__": "torchaudio_kaldi_source", "torchaudio": fake}
    exec(compile(src, "torchaudio-kaldi", "exec"), kaldi)
    return kaldi, fake


def test_mfcc_matches_torchaudio_kaldi_source_used_by_fairseq(utts):
    """The exact computation of fairseq's dump_mfcc_feature.MfccFeatureReader.get_feats."""
    kaldi, ta = _torchaudio_source_namespace()
    _, wavs = utts
    for w in wavs[:3]:
        x = torch.from_numpy(w).float().view(1, -1)
        mfccs = kaldi["mfcc"](waveform=x, sample_frequency=16000, use_energy=False).transpose(0, 1)
        deltas = ta.functional.compute_deltas(mfccs)
        ddeltas = ta.functional.compute_deltas(deltas)
        ref = torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).numpy()
        got = MfccFeatureReader().features([w])[0]
        assert got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)  # bit-identical, as the README says


def test_mfcc_known_properties():
    sr = 16000
    t = np.arange(sr) / sr
    # a louder copy of a signal only shifts c0 (log energy) -- the other cepstra are scale-free
    w = (0.1 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(sr)).astype(np.float32)
    a = kaldi_mfcc(torch.from_numpy(w)).numpy()
    b = kaldi_mfcc(torch.from_numpy(4 * w)).numpy()
    lifter0 = 1.0
    np.testing.assert_allclose((b - a)[:, 0], 2 * np.log(4) * math.sqrt(23) * lifter0, rtol=1e-3)
    np.testing.assert_allclose((b - a)[:, 1:], 0, atol=2e-3)
    # deltas of a linear ramp are its slope away from the edges
    ramp = torch.arange(20, dtype=torch.float32).repeat(3, 1) * 2.0
    np.testing.assert_allclose(compute_deltas(ramp)[:, 2:-2].numpy(), 2.0, atol=1e-6)
    # 39 dims at 100 Hz; shorter than one 25 ms window -> no frames
    assert mfcc_39(torch.from_numpy(w)).shape == (1 + (sr - 400) // 160, 39)
    assert mfcc_39(torch.zeros(399)).shape == (0, 39)


def test_student_checkpoint_is_a_valid_teacher(tiny_corpus, utts, tmp_path):
    """Our own dicehubert_student checkpoints (next DiceHuBERT round) feed the same reader."""
    from tests.helpers.data import write_checkpoint

    path = str(tmp_path / "student.pt")
    write_checkpoint(path, tiny_corpus["data"], tiny_corpus["labels"], model="dicehubert_student", task="dicehubert",
                     model_overrides={"encoder_layers": 3})
    _, wavs = utts
    reader = TeacherFeatureReader(path, 3)
    f = reader.features(wavs[:2])
    for w, got in zip(wavs[:2], f):
        np.testing.assert_allclose(got, _fairseq_layer(reader.model, w, 3), atol=2e-5, rtol=1e-4)
