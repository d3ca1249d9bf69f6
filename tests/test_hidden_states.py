"""hidden_states(): the one path to a HuBERT-family model's layer outputs, checked against fairseq's own."""

import contextlib

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.checkpoint import load_model
from tests.helpers.config import build, compose
from dicehubert_fairseq.frames import padding_mask_of
from dicehubert_fairseq.hidden_states import hidden_states
from tests.helpers.data import tiny_model_overrides


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def student(tiny_corpus, name="dicehubert_narrow", layers=4):
    cfg = compose(name, [f"task.data={tiny_corpus['data']}", f"task.label_dir={tiny_corpus['labels']}", "run=cpu",
                         "task.min_sample_size=8000", "task.pad_audio=true", "task.max_sample_size=40000"]
                  + tiny_model_overrides(layers=layers))
    task, model, _ = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(3)])
    assert batch["net_input"]["padding_mask"].any(), "the tests need a padded batch"
    return model.eval(), batch


@pytest.mark.parametrize("name", ["dicehubert_narrow", "dicehubert_conformer"])
def test_every_layer_and_stop_at_layer_equal_fairseq_extract_features(tiny_corpus, name):
    model, batch = student(tiny_corpus, name)
    net_input = batch["net_input"]
    with torch.no_grad():
        h = hidden_states(model, **net_input)
        x, pad = model.extract_features(**net_input)
        assert len(h.layers) == 4 and torch.equal(h.padding_mask, pad)
        assert torch.allclose(h.x, x, atol=1e-6) and torch.allclose(h.layers[-1], x, atol=1e-6)
        for layer in (1, 3):
            ref, _ = model.extract_features(**net_input, output_layer=layer)
            stopped = hidden_states(model, **net_input, output_layer=layer)
            assert len(stopped.layers) == layer
            assert torch.allclose(stopped.x, ref, atol=1e-6) and torch.allclose(h.layers[layer - 1], ref, atol=1e-6)
        proj, _ = model.extract_features(**net_input, ret_conv=True)
        assert torch.equal(h.features, proj)  # hidden state 0: the transformer's input
    assert not h.mask_indices.any() and h.target_list is None


def test_forward_stops_at_the_output_layer(tiny_teacher):
    model, _ = load_model(tiny_teacher)
    called = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: called.append(i)) for i, layer in enumerate(model.encoder.layers)]
    with torch.no_grad():
        h = hidden_states(model, torch.randn(2, 8000), output_layer=1)
    for hook in hooks:
        hook.remove()
    assert called == [0] and len(h.layers) == 1
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.encoder.layers)


def test_a_layer_dropped_by_layerdrop_passes_its_input_on(tiny_corpus):
    model, batch = student(tiny_corpus)
    model.train()
    model.encoder.layerdrop = 1.0  # every layer dropped
    h = hidden_states(model, **batch["net_input"])
    assert len(h.layers) == 4 and all(torch.equal(s, h.x) for s in h.layers)
    model.encoder.layerdrop = 0.5
    np.random.seed(3)  # fairseq draws LayerDrop from numpy's global RNG
    h = hidden_states(model, **batch["net_input"])
    same = [torch.equal(a, b) for a, b in zip(h.layers[:-1], h.layers[1:])]
    assert any(same) and not all(same)  # some layers ran, some passed their input on


def test_masking_and_targets_as_fairseqs_forward(tiny_corpus):
    model, batch = student(tiny_corpus)
    fixed = {}

    def apply_mask(x, padding_mask, target_list):  # one fixed span mask for both paths
        m = fixed.setdefault("m", torch.rand(x.shape[:2]) < 0.5)[:, : x.size(1)]
        x[m] = model.mask_emb
        return x, m

    model.apply_mask = apply_mask
    targets = batch["target_list"]
    with torch.no_grad():
        h = hidden_states(model, **batch["net_input"], mask=True, target_list=targets)
        x, pad = model.extract_features(**batch["net_input"], mask=True)
    T = h.x.size(1)  # forward_targets may trim the frames to the labels
    assert torch.equal(h.mask_indices, fixed["m"][:, :T]) and h.mask_indices.any()
    assert torch.allclose(h.x, x[:, :T], atol=1e-6) and torch.equal(h.padding_mask, pad[:, :T])
    _, aligned = model.forward_targets(model.forward_features(batch["net_input"]["source"]), targets)
    assert all(torch.equal(a, b) for a, b in zip(h.target_list, aligned))
    assert h.features_pen.item() > 0



def test_given_mask_indices_get_the_models_mask_embedding(tiny_teacher):
    """The teacher of masking distillation sees the student's masks: the frames given get its own
    mask_emb, the others are untouched; a mask one frame short or long is cut or padded unmasked."""
    model, _ = load_model(tiny_teacher)
    src = torch.randn(2, 12000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = hidden_states(model, src)
        T = clean.features.size(1)
        m = torch.zeros(2, T, dtype=torch.bool)
        m[0, 3:9], m[1, 10:14] = True, True
        given = hidden_states(model, src, mask_indices=m)
        short = hidden_states(model, src, mask_indices=m[:, : T - 1])
        long = hidden_states(model, src, mask_indices=torch.cat([m, torch.ones(2, 1, dtype=torch.bool)], 1))
    assert torch.equal(given.mask_indices, m)
    assert torch.equal(given.features[m], model.mask_emb.expand(int(m.sum()), -1))
    assert torch.equal(given.features[~m], clean.features[~m])
    assert not torch.allclose(given.x[~m], clean.x[~m])  # attention carries the masks to the other frames
    assert torch.equal(short.x, given.x) and torch.equal(long.x, given.x)  # the last frame: unmasked in both
    with pytest.raises(ValueError, match="not both"):
        hidden_states(model, src, mask=True, mask_indices=m)


def padded_batch(wavs):
    """``(source (B, T_max), padding_mask (B, T_max))`` of waveforms of different lengths, zero-padded."""
    lengths = [len(w) for w in wavs]
    src = torch.zeros(len(wavs), max(lengths))
    for b, w in enumerate(wavs):
        src[b, : len(w)] = w
    return src, padding_mask_of(lengths, src.size(1))


def assert_each_utterance_as_alone(model, exact, wavs):
    """Every utterance's output and layer states in the batch ``exact`` equal its forward alone."""
    for b, w in enumerate(wavs):
        alone = hidden_states(model, w[None])
        T = alone.x.size(1)
        assert int((~exact.padding_mask[b]).sum()) == T
        torch.testing.assert_close(exact.x[b, :T], alone.x[0], atol=2e-5, rtol=1e-4)
        for a, s in zip(exact.layers, alone.layers):
            torch.testing.assert_close(a[b, :T], s[0], atol=2e-5, rtol=1e-4)


def test_exact_padding_gives_each_utterance_its_states_alone(tiny_teacher):
    model, _ = load_model(tiny_teacher)  # extractor_mode=default: GroupNorm over time
    lengths = [12000, 7000, 9500]
    wavs = [torch.randn(n) for n in lengths]
    src, pad = padded_batch(wavs)
    with torch.no_grad():
        exact = hidden_states(model, src, pad, exact_padding=True)
        batched = hidden_states(model, src, pad)
        assert_each_utterance_as_alone(model, exact, wavs)
        # fairseq's semantics instead: the front end saw the padding
        x, _ = model.extract_features(src, pad)
        assert torch.equal(batched.x, x)
        assert not torch.allclose(batched.x[1, :10], exact.x[1, :10], atol=1e-3)


@pytest.mark.parametrize("name,batched", [("posbn", True), ("conformer", False), ("shallow", True), ("conv", False)])
def test_exact_padding_is_exact_for_batch_norm_positional_conv_and_conformer(export_models, name, batched):
    """conv_pos_batch_norm: the BatchNorm turns the zeroed padding into non-zero frames that the positional
    conv reads (0.13-0.17 off before the fix); the conformer's depthwise conv reads padded frames in every
    layer (runs one by one). Both as each utterance alone; the BatchNorm model still in one batch."""
    model, _ = load_model(export_models[name])
    g = torch.Generator().manual_seed(0)
    lengths = [12000, 7000, 9500]
    wavs = [torch.randn(n, generator=g) for n in lengths]
    src, pad = padded_batch(wavs)
    calls = []
    hook = model.encoder.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        exact = hidden_states(model, src, pad, exact_padding=True)
        n_calls = len(calls)
        plain = hidden_states(model, src, pad)
        assert_each_utterance_as_alone(model, exact, wavs)
    hook.remove()
    assert n_calls == (1 if batched else 3)
    if name != "shallow":  # what fairseq's padded batch gives instead (the bug the test is about)
        assert (plain.x[1, :20] - exact.x[1, :20]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="one by one") if not batched else contextlib.nullcontext():
        hidden_states(model, src, pad, exact_padding=True, mask=True)
