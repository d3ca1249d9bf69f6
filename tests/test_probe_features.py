"""The probe's cached features: every hidden state of the upstream, equal to fairseq's per-layer features."""

import os

import pytest
import torch

from dicehubert_fairseq.data.audio import read_audio
from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.probe.features import extract_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hidden_states_equal_fairseq_per_layer_features(tones):
    from dicehubert_fairseq.checkpoint import load_model

    model, _ = load_model(tones["ckpt"])
    manifest = read_manifest(os.path.join(tones["data"], "valid.tsv"))
    cache = extract_split(model, manifest, limit=1)
    states = cache.feats  # (L + 1, T, D), each state layer-normalised
    wav = torch.from_numpy(read_audio(manifest, 0))
    n_layers = len(model.encoder.layers)
    assert states.shape[0] == n_layers + 1 and states.shape[2] == 32

    def norm(x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:])

    with torch.no_grad():
        proj, _ = model.extract_features(wav[None], None, mask=False, ret_conv=True)
        torch.testing.assert_close(states[0], norm(proj[0]), rtol=0, atol=0)
        for layer in range(1, n_layers + 1):
            x, _ = model.extract_features(wav[None], None, mask=False, output_layer=layer)
            torch.testing.assert_close(states[layer], norm(x[0]), rtol=1e-5, atol=1e-5)


def test_chosen_layers_are_exactly_those_states_in_that_order(tones):
    from dicehubert_fairseq.checkpoint import load_model

    model, _ = load_model(tones["ckpt"])
    manifest = read_manifest(os.path.join(tones["data"], "valid.tsv"))
    full = extract_split(model, manifest, limit=3)
    some = extract_split(model, manifest, limit=3, layers=[2, 0])
    assert some.feats.shape == (2,) + full.feats.shape[1:]
    torch.testing.assert_close(some.feats, full.feats[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(some.offsets, full.offsets)
