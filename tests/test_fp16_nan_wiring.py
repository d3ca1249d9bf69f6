"""Numerics wiring: a NaN produced by a half-precision model's forward, under fairseq's fp16 loss
scaling, gives a warning naming the utterances and a skipped batch -- through fairseq's own
``Trainer.train_step`` (model cast to half, ``FP16Optimizer``, dynamic loss scaler) and the
``dicehubert`` criterion, not only through the criterion's helper. Without loss scaling the same
NaN stops training with an error naming the utterances.

The NaN enters through a forward hook on the model (its output's first masked logit), so the
criterion sees what a half-precision overflow inside the model would give it.
"""

import logging

import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.config import build, compose
from dicehubert_fairseq.testing import tiny_model_overrides, write_corpus, write_random_labels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16nan")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(0.8, 1.2), seed=61)
    write_random_labels(labels, sizes, "km", 20, 50, seed=61)
    return data, labels


def _trainer(corpus, *extra):
    from fairseq.trainer import Trainer

    data, labels = corpus
    cfg = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu",
                                        "task.min_sample_size=8000", "optimization.lr=[0.001]",
                                        "lr_scheduler.warmup_updates=2"] + tiny_model_overrides() + list(extra))
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    return Trainer(cfg, task, model, criterion), ds.collater([ds[i] for i in (2, 0)])


def _nan_logit(_module, _args, out):
    out["logit_m_list"][0] = out["logit_m_list"][0].clone()
    out["logit_m_list"][0][0, 0] = float("nan")
    return out


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_nan_under_fp16_loss_scaling_warns_and_skips_the_batch(corpus, monkeypatch, caplog, one_thread):
    # fairseq's CPU-less spots: FP16Optimizer's flattened fp32 copy asks torch.cuda for a device
    # (fp16_no_flatten_grads avoids it) and train_step's overflow handler ends in
    # `torch.tensor(0.0).cuda()`; on this CPU-only machine .cuda() is made a no-op for the test.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    trainer, sample = _trainer(corpus, "common.fp16=true", "common.fp16_no_flatten_grads=true")
    assert next(trainer.model.parameters()).dtype == torch.float16  # fairseq cast the model to half
    scale = trainer.optimizer.scaler.loss_scale
    hook = trainer.model.register_forward_hook(_nan_logit)
    # (fairseq's INFO lines too, whatever level another test left on the "fairseq" logger)
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="fairseq.trainer"):
        log = trainer.train_step([sample])
    hook.remove()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "non-finite loss" in r.getMessage()]
    assert len(warnings) == 1, caplog.text[-3000:]
    msg = warnings[0].getMessage()
    assert "train_0002.wav" in msg and "train_0000.wav" in msg and "dataset indices [2, 0]" in msg
    assert "loss scaler will skip this batch" in msg
    # fairseq skipped the batch: no update, the loss scale lowered, nothing logged as trained
    assert "gradient overflow detected" in caplog.text
    assert log is None and trainer.get_num_updates() == 0
    assert trainer.optimizer.scaler.loss_scale < scale
    # and training goes on with the next (finite) batch
    log = trainer.train_step([sample])
    assert trainer.get_num_updates() == 1 and log is not None and torch.isfinite(torch.tensor(log["loss"]))


def test_nan_without_loss_scaling_stops_with_the_utterances(corpus, one_thread, tmp_path):
    trainer, sample = _trainer(corpus, f"checkpoint.save_dir={tmp_path}")
    assert next(trainer.model.parameters()).dtype == torch.float32
    trainer.model.register_forward_hook(_nan_logit)
    with pytest.raises(FloatingPointError, match=r"train_0002\.wav.*dataset indices \[2, 0\]"):
        trainer.train_step([sample])
    assert trainer.get_num_updates() == 0
    assert (tmp_path / "crash.pt").is_file()  # fairseq's own crash dump, for inspection
