"""The export's own check: it compares the written model with the source, fails loudly, and masks the frames
transformers masks."""

import os

import pytest
import torch

from dicehubert_fairseq.checkpoint import load_source
from dicehubert_fairseq.export import check
from dicehubert_fairseq.export.cli import main
from dicehubert_fairseq.frames import padding_mask_of
from dicehubert_fairseq.hidden_states import hidden_states

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hf_check_runs_and_can_fail(export_models, tmp_path, capsys, monkeypatch):
    """A failed check writes nothing."""
    monkeypatch.setattr(check, "TOLERANCE", -1.0)
    out = tmp_path / "x_hf"
    code = main([export_models["teacher"], "--to", "hf", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "differs from the source by up to" in err and err.count("\n") == 1, err
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_batch_padding_mask_gives_the_conv_arithmetic_frames(export_models):
    """fairseq's forward_padding_mask, given a plain sample mask, counts one frame more for some lengths;
    the check's mask gives every utterance exactly its conv-arithmetic frames (transformers' count)."""
    for name in ("narrow", "shallow"):
        model = load_source(export_models[name]).model
        wavs, lengths = check.random_batch(load_source(export_models[name]))
        frames = check.frames_of(model, lengths)
        plain = padding_mask_of(lengths, wavs.shape[1])
        with torch.inference_mode():
            fairseq_own = hidden_states(model, wavs, plain)
            ours = hidden_states(model, wavs, check.batch_padding_mask(model, lengths, wavs.shape[1]))
            exact = hidden_states(model, wavs, plain, exact_padding=True)
        assert (~ours.padding_mask).sum(1).tolist() == frames
        assert (~exact.padding_mask).sum(1).tolist() == frames
        assert (~fairseq_own.padding_mask).sum(1).tolist() != frames, name  # why the check builds its own mask
        diff = max(check.max_abs(check.outputs(ours), check.outputs(exact), frames))
        if name == "shallow":  # LayerNorm front end: the batch's front end is each utterance's
            assert diff < 1e-5, diff
        else:  # GroupNorm front end: normalised over the padded length here, per utterance with exact_padding
            assert diff > 1e-3, diff
