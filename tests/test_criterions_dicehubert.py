"""Numerics: losses finite under fp16/bf16 CPU autocast, extreme values and all-padded rows;
a non-finite loss names the batch's utterances."""

import logging
import math
import os

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.data.files import SoftLabelWriter
from tests.helpers.config import build, compose
from tests.helpers.data import num_frames, tiny_model_overrides, write_corpus, write_random_labels


K = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(0.6, 1.2), seed=4)
    write_random_labels(labels, sizes, "km", K, 50, seed=4)
    # a soft stream beside: 'soft' (same frames, top-3 distributions)
    rng = np.random.default_rng(4)
    for split, lens in sizes.items():
        w = SoftLabelWriter(labels, split, "soft", n_clusters=K, top_k=3, meta={"temperature": 5.0})
        hard = []
        for size in lens:
            T = num_frames(size, 50)
            ids = np.stack([rng.permutation(K)[:3] for _ in range(T)])
            w.add(ids, np.tile([0.6, 0.3, 0.1], (T, 1)))
            hard.append(" ".join(map(str, ids[:, 0])))
        w.close()
        with open(os.path.join(labels, f"{split}.soft"), "w") as f:
            f.write("\n".join(hard) + "\n")
        with open(os.path.join(labels, "dict.soft.txt"), "w") as f:
            f.write("".join(f"{i} 1\n" for i in range(K)))
    cfg = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu",
                                        "task.labels=[km,soft]", "task.soft_labels=[soft]", "task.pad_audio=true",
                                        "task.min_sample_size=8000", "criterion.pred_nomask_weight=0.5",
                                        "++model.dropout=0.0", "++model.attention_dropout=0.0"]
                  + tiny_model_overrides())
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    return {"task": task, "model": model, "criterion": criterion, "ds": task.datasets["train"]}


def _batch(ds, rows=(0, 1, 2, 3)):
    return ds.collater([ds[i] for i in rows])


def _pad_out(sample, row):
    """Make utterance ``row`` of a padded batch all padding (waveform 0, every sample masked)."""
    sample["net_input"]["source"][row] = 0.0
    sample["net_input"]["padding_mask"][row] = True
    return sample


def _grads_finite(model):
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return bad


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_all_padded_row_through_model_and_criterion(world, precision, monkeypatch):
    """One utterance of the batch is nothing but padding: loss and gradients stay finite, under
    fp16/bf16 autocast too, on the unmasked-frame loss (hard and soft streams).

    Span masking is off here: fairseq's compute_mask_indices refuses a row without frames
    (``ValueError: the entire sequence is masked``), which our data path never produces (see
    test_shortest_accepted_utterance_is_never_all_padding)."""
    model, criterion = world["model"], world["criterion"]
    monkeypatch.setattr(model, "mask_prob", 0.0)
    sample = _batch(world["ds"])
    assert sample["net_input"]["padding_mask"] is not None and sample["net_input"]["padding_mask"].any()
    _pad_out(sample, 1)
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    if precision == "fp32":
        loss, sample_size, log = criterion(model, sample)
    else:
        with torch.autocast("cpu", dtype=torch.float16 if precision == "fp16" else torch.bfloat16):
            loss, sample_size, log = criterion(model, sample)
    assert torch.isfinite(loss), log
    assert {"loss_u_0", "loss_u_1"} <= set(log) and all(math.isfinite(log[k]) for k in ("loss_u_0", "loss_u_1"))
    assert log["loss_u_0"] > 0 and log["loss_u_1"] > 0
    loss.backward()
    assert _grads_finite(model) == []


def test_all_padded_row_contributes_nothing(world, monkeypatch):
    """The padded utterance's frames are never targets: its labels may be anything."""
    model, criterion = world["model"], world["criterion"]
    monkeypatch.setattr(model, "mask_prob", 0.0)
    model.eval()
    a = _pad_out(_batch(world["ds"]), 1)
    b = _pad_out(_batch(world["ds"]), 1)
    b["target_list"][0][1] = (b["target_list"][0][1] + 3) % K + 4  # other (valid) dictionary indices
    with torch.no_grad():
        la, _, log_a = criterion(model, a)
        lb, _, log_b = criterion(model, b)
    assert torch.isfinite(la) and torch.equal(la, lb) and log_a["loss_u_0"] == log_b["loss_u_0"]
    # whereas the same change on a real utterance does change the loss
    c = _pad_out(_batch(world["ds"]), 1)
    c["target_list"][0][0] = (c["target_list"][0][0] + 3) % K + 4
    with torch.no_grad():
        assert criterion(model, c)[2]["loss_u_0"] != log_a["loss_u_0"]


def test_span_masking_refuses_an_all_padded_row(world):
    """fairseq's behaviour (not silent): an utterance with no frames stops the batch with a
    ValueError naming its row.  Preflight rejects the utterances that could cause it (< 400 samples)."""
    sample = _pad_out(_batch(world["ds"]), 1)
    np.random.seed(0)
    with pytest.raises(ValueError, match="the entire sequence is masked. sz=0.*index=1"):
        world["criterion"](world["model"], sample)


def test_shortest_accepted_utterance_is_never_all_padding(world, tmp_path):
    """Preflight accepts >= 400 samples (one conv frame); padded beside a long utterance, such an
    utterance keeps unpadded frames, so fairseq's span masking always has frames to mask."""
    from dicehubert_fairseq.data.preflight import MIN_SAMPLES

    model = world["model"]
    ds = world["ds"]
    long = ds[0]
    short = dict(long, id=1, source=long["source"][:MIN_SAMPLES], label_list=[x[:1] for x in long["label_list"]])
    batch = ds.collater([long, short])
    pad = batch["net_input"]["padding_mask"]
    assert pad is not None and pad[1].any()
    with torch.no_grad():
        features = model.forward_features(batch["net_input"]["source"])
        frame_pad = model.forward_padding_mask(features.transpose(1, 2), pad)
    assert (~frame_pad[1]).sum() >= 1
    np.random.seed(0)
    with torch.no_grad():
        loss, _, log = world["criterion"](model, batch)  # span masking on: no ValueError
    assert torch.isfinite(loss)


def _nan_output(model, sample):
    """The model's real output for ``sample`` with a NaN in the first masked logit."""
    real = model.forward

    def forward(**kwargs):
        out = real(**kwargs)
        out["logit_m_list"][0] = out["logit_m_list"][0].clone()
        out["logit_m_list"][0][0, 0] = float("nan")
        return out

    return forward


def test_nan_loss_names_the_batch_utterances(world, monkeypatch):
    model, criterion, ds = world["model"], world["criterion"], world["ds"]
    sample = _batch(ds, rows=(3, 1))
    monkeypatch.setattr(model, "forward", _nan_output(model, sample))
    np.random.seed(0)
    with pytest.raises(FloatingPointError) as e:
        criterion(model, sample)
    msg = str(e.value)
    ids = sample["id"].tolist()
    assert sorted(ids) == [1, 3]
    names = [ds.audio_names[i] for i in ids]
    assert f"utterances {names} (dataset indices {ids})" in msg and "non-finite loss (nan)" in msg
    assert names == [f"train_{i:04d}.wav" for i in ids]


def test_nan_loss_under_fp16_loss_scaling_is_logged_for_fairseq_to_skip(world, monkeypatch, caplog):
    """fp16 (the model cast to half, fairseq's dynamic loss scaler): fairseq skips a batch whose
    gradients overflow and lowers the scale; the criterion must not turn that into a crash, but
    still names the utterances."""
    from dicehubert_fairseq.criterions.dicehubert import check_finite

    sample = _batch(world["ds"], rows=(2, 0))
    with caplog.at_level(logging.WARNING, logger="dicehubert_fairseq.criterions.dicehubert"):
        check_finite(torch.tensor(float("inf")), sample, scaled=True)
    assert "non-finite loss (inf)" in caplog.text and "train_0002.wav" in caplog.text
    assert "loss scaler will skip this batch" in caplog.text
    with pytest.raises(FloatingPointError, match="train_0000.wav"):
        check_finite(torch.tensor(float("inf")), sample, scaled=False)

    from dicehubert_fairseq.criterions.dicehubert import loss_scaled

    half = torch.nn.Linear(2, 2).half()
    assert loss_scaled(half) and not loss_scaled(torch.nn.Linear(2, 2))
    assert not loss_scaled(torch.nn.Linear(2, 2).bfloat16())  # bf16 has no loss scaler: raise
