"""Conv front-end frame arithmetic (dicehubert_fairseq.frames) against fairseq's own module."""

import pytest
import torch
from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel

from dicehubert_fairseq.frames import conv_layers, conv_output_length, frame_stride, padding_mask_of

HUBERT = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
ODD = "[(8,7,3)] + [(8,4,2)] * 2"


class _Model(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.feature_extractor = ConvFeatureExtractionModel(eval(spec), mode="layer_norm")


def test_layers_from_the_spec_and_from_the_model_agree():
    assert conv_layers(HUBERT) == [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2
    assert conv_layers(_Model(ODD)) == conv_layers(ODD) == [(7, 3), (4, 2), (4, 2)]
    assert frame_stride(conv_layers(HUBERT)) == 320 and frame_stride(conv_layers(ODD)) == 12


@pytest.mark.parametrize("spec", [ODD, "[(4,10,5)] + [(4,3,2)] * 4 + [(4,2,2)] * 2"])
def test_output_length_equals_the_conv_stack(spec):
    model = _Model(spec)
    layers = conv_layers(spec)
    with torch.no_grad():
        for n in [0, 1, 6, 7, 9, 30, 399, 400, 401, 719, 720, 721, 1234, 16000]:
            got = conv_output_length(n, layers)
            if got == 0:  # too short: some layer gets less than its kernel
                with pytest.raises(RuntimeError):
                    model.feature_extractor(torch.zeros(1, n))
            else:
                assert got == model.feature_extractor(torch.zeros(1, n)).shape[2], n
    # HuBERT's stack: the 50 Hz formula (S - 400) // 320 + 1
    assert all(conv_output_length(n, conv_layers(HUBERT)) == (n - 400) // 320 + 1 for n in range(400, 5000, 37))


def test_padding_mask_by_hand():
    assert padding_mask_of([3, 1, 0], 4).tolist() == [[False, False, False, True], [False, True, True, True],
                                                    [True, True, True, True]]
    assert padding_mask_of(torch.tensor([2]), 2).tolist() == [[False, False]]
