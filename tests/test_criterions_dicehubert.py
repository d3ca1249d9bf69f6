"""Criterion ``dicehubert``: exactly fairseq's ``hubert`` criterion on fairseq's HuBERT (with this
plugin's task and student); numerics: losses finite under fp16/bf16 CPU autocast, extreme values and
all-padded rows; a non-finite loss names the batch's utterances, and under fp16 loss scaling
fairseq's ``Trainer`` skips the batch."""

import inspect
import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from tests.helpers.config import CONFIG_DIR, build, compose
from tests.helpers.data import tiny_model_overrides, write_corpus, write_random_labels, write_soft_labels


K = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(0.6, 1.2), seed=4)
    write_random_labels(labels, sizes, "km", K, 50, seed=4)
    # a soft stream beside: 'soft' (same frames, top-3 distributions)
    write_soft_labels(labels, sizes, "soft", n_clusters=K, seed=4,
                      probs_of=lambda _row, T: np.tile([0.6, 0.3, 0.1], (T, 1)))
    cfg = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu",
                                        "task.labels=[km,soft]", "task.soft_labels=[soft]", "task.pad_audio=true",
                                        "task.min_sample_size=8000", "criterion.pred_nomask_weight=0.5",
                                        "++model.dropout=0.0", "++model.attention_dropout=0.0"]
                  + tiny_model_overrides())
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    return {"task": task, "model": model, "criterion": criterion, "ds": task.datasets["train"],
            "data": data, "labels": labels}


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


# ----------------------------------------------------------------------------- NaN wiring under fairseq's Trainer


def _trainer(world, *extra):
    """fairseq's ``Trainer`` on a tiny student of ``world``'s corpus (label stream 'km'), and a batch of rows 2, 0."""
    from fairseq.trainer import Trainer

    cfg = compose("dicehubert_narrow", [f"task.data={world['data']}", f"task.label_dir={world['labels']}", "run=cpu",
                                        "task.min_sample_size=8000", "optimization.lr=[0.001]",
                                        "lr_scheduler.warmup_updates=2"] + tiny_model_overrides() + list(extra))
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    return Trainer(cfg, task, model, criterion), ds.collater([ds[i] for i in (2, 0)])


def _nan_logit(_module, _args, out):
    """A forward hook: a NaN in the model's first masked logit, as a half-precision overflow would give."""
    out["logit_m_list"][0] = out["logit_m_list"][0].clone()
    out["logit_m_list"][0][0, 0] = float("nan")
    return out


def test_nan_under_fp16_loss_scaling_warns_and_skips_the_batch(world, monkeypatch, caplog, one_torch_thread):
    """Through fairseq's own ``Trainer.train_step`` (model cast to half, ``FP16Optimizer``, dynamic
    loss scaler) and the criterion: a warning naming the utterances, the batch skipped."""
    # fairseq's CPU-less spots: FP16Optimizer's flattened fp32 copy asks torch.cuda for a device
    # (fp16_no_flatten_grads avoids it) and train_step's overflow handler ends in
    # `torch.tensor(0.0).cuda()`; on this CPU-only machine .cuda() is made a no-op for the test.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    trainer, sample = _trainer(world, "common.fp16=true", "common.fp16_no_flatten_grads=true")
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


def test_nan_without_loss_scaling_stops_with_the_utterances(world, one_torch_thread, tmp_path):
    trainer, sample = _trainer(world, f"checkpoint.save_dir={tmp_path}")
    assert next(trainer.model.parameters()).dtype == torch.float32
    trainer.model.register_forward_hook(_nan_logit)
    with pytest.raises(FloatingPointError, match=r"train_0002\.wav.*dataset indices \[2, 0\]"):
        trainer.train_step([sample])
    assert trainer.get_num_updates() == 0
    assert (tmp_path / "crash.pt").is_file()  # fairseq's own crash dump, for inspection


# ----------------------------------------------------------------------------- against fairseq's own HuBERT

#: Cases of :func:`test_dicehubert_computes_fairseqs_hubert`: overrides of config/tiny_teacher.yaml.
EQUIVALENCE_CASES = {
    # fairseq's hubert_base_librispeech.yaml loss: masked frames only, feature penalty 10, tied projection;
    # and fairseq's log_keys (a field both configs have): the feature penalty logged as it is
    "hubert_base_loss": ["criterion.pred_nomask_weight=0.0", "criterion.loss_weights=[10.0]",
                         "model.untie_final_proj=false", "++criterion.log_keys=[features_pen]"],
    # the tiny teacher as configured (run/tiny.yaml: unmasked frames weigh 1, no feature penalty)
    "tiny_teacher": [],
    # two label streams, untied projections, unmasked-frame weight 0.5, padded batch
    "two_streams_padded": ["task.labels=[km,km2]", "model.untie_final_proj=true",
                           "criterion.pred_nomask_weight=0.5", "criterion.loss_weights=[10.0]",
                           "task.pad_audio=true"],
}


@pytest.fixture(scope="module")
def equivalence_world(tmp_path_factory):
    """A corpus with streams 'km' (K=20) and 'km2' (K=12), and a config directory in which
    ``tiny_teacher`` is composed on fairseq's own recipe (``recipe/hubert``: task
    ``hubert_pretraining``, model ``hubert``, criterion ``hubert``) instead of ``recipe/ssl``."""
    root = tmp_path_factory.mktemp("equivalence")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(1.0, 2.0), seed=31)
    write_random_labels(labels, sizes, "km", 20, 50, seed=31)
    write_random_labels(labels, sizes, "km2", 12, 50, seed=32)
    fairseq_config = str(root / "config")
    shutil.copytree(CONFIG_DIR, fairseq_config)
    path = os.path.join(fairseq_config, "tiny_teacher.yaml")
    with open(path) as f:
        text = f.read()
    assert text.count("  - recipe/ssl\n") == 1
    with open(path, "w") as f:
        f.write(text.replace("  - recipe/ssl\n", "  - recipe/hubert\n"))
    return {"data": data, "labels": labels, "fairseq_config": fairseq_config}


def _fixed_masks(monkeypatch, *models):
    """Make every model's ``compute_mask_indices`` draw one fixed mask; record the arguments."""
    from fairseq.data.data_utils import compute_mask_indices

    signature = inspect.signature(compute_mask_indices)
    calls = []

    def fixed(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        for key in ("seed", "epoch", "indices"):  # how the draw is seeded: fixed below
            call.pop(key)
        calls.append(call)
        B = call["shape"][0]
        return compute_mask_indices(**call, seed=1234, epoch=len(calls) % 2, indices=torch.arange(B))

    for model in models:
        monkeypatch.setitem(type(model).apply_mask.__globals__, "compute_mask_indices", fixed)
    return calls


def _reduced(criterion, logging_output):
    from fairseq.logging import metrics

    with metrics.aggregate(new_root=True) as agg:
        criterion.reduce_metrics([logging_output])
        return agg.get_smoothed_values()


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_dicehubert_computes_fairseqs_hubert(case, equivalence_world, monkeypatch, one_torch_thread):
    """Task ``dicehubert`` + model ``dicehubert_student`` + criterion ``dicehubert`` compute exactly
    what fairseq's ``hubert_pretraining`` + ``hubert`` + ``hubert`` compute.

    ``config/tiny_teacher.yaml`` is composed twice: as it is (this plugin) and on fairseq's own
    recipe. fairseq's model is built, its state dict loaded into the student, both masks are fixed
    to one draw (fairseq's own ``hubert`` model masks from OS entropy), and one batch goes through
    each criterion: the batches, the arguments of the span masking, the loss, the sample size,
    every logged loss, the correct/count of every stream, the reduced accuracies and the
    gradients must agree.
    """
    w = equivalence_world
    overrides = [f"task.data={w['data']}", f"task.label_dir={w['labels']}", "task.random_crop=false",
                 "++model.mask_channel_prob=0.1"] + EQUIVALENCE_CASES[case]
    ref_task, ref_model, ref_crit = build(compose("tiny_teacher", overrides, config_dir=w["fairseq_config"]))
    task, model, crit = build(compose("tiny_teacher", overrides))
    assert type(ref_model).__name__ == "HubertModel" and type(ref_crit).__name__ == "HubertCriterion"
    assert type(ref_task).__name__ == "HubertPretrainingTask"
    assert type(model).__name__ == "DiceHubertStudent" and type(crit).__name__ == "DiceHubertCriterion"
    model.load_state_dict(ref_model.state_dict())  # strict: the very same parameters

    # the same batch from both datasets
    batches = []
    for t in (ref_task, task):
        t.load_dataset("train")
        ds = t.datasets["train"]
        batches.append(ds.collater([ds[i] for i in range(3)]))
    ref_batch, batch = batches
    assert torch.equal(ref_batch["id"], batch["id"])
    for key in ("source", "padding_mask"):
        assert torch.equal(ref_batch["net_input"][key], batch["net_input"][key]), key
    assert len(batch["target_list"]) == len(task.cfg.labels)
    for a, b in zip(ref_batch["target_list"], batch["target_list"]):
        assert torch.equal(a, b)
    if task.cfg.pad_audio:
        assert batch["net_input"]["padding_mask"].any(), "the case needs a padded batch"

    calls = _fixed_masks(monkeypatch, ref_model, model)
    ref_model.train()
    model.train()
    ref_loss, ref_size, ref_log = ref_crit(ref_model, ref_batch)
    loss, size, log = crit(model, batch)

    # fairseq's span masking, called with the same arguments (time and channel masks)
    assert len(calls) == 4
    for ref_call, call in zip(calls[:2], calls[2:]):
        assert ref_call.keys() == call.keys()
        for key, value in ref_call.items():
            same = torch.equal(value, call[key]) if torch.is_tensor(value) else value == call[key]
            assert same, key
    assert calls[0]["min_masks"] == 2 and calls[0]["mask_prob"] == 0.8

    assert size == ref_size > 0
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-5)
    assert ("features_pen" in ref_log) == ("++criterion.log_keys=[features_pen]" in overrides)
    for key, value in ref_log.items():
        assert key in log, key
        if key.startswith(("correct_", "count_", "ntokens", "nsentences", "sample_size")):
            assert log[key] == value, key
        else:
            assert math.isclose(log[key], value, rel_tol=1e-5, abs_tol=1e-5), (key, log[key], value)
    streams = len(task.cfg.labels)
    assert {f"loss_m_{i}" for i in range(streams)} <= set(log)
    # the accuracies both print under fairseq's names (ours rounded to 4 digits)
    ref_metrics, metrics = _reduced(ref_crit, ref_log), _reduced(crit, log)
    for i in range(streams):
        # unmasked accuracy too, also at pred_nomask_weight 0 (logged, not in the loss)
        assert abs(metrics[f"correct_m_{i}"] - ref_metrics[f"correct_m_{i}"]) <= 5e-5
        assert abs(metrics[f"correct_u_{i}"] - ref_metrics[f"correct_u_{i}"]) <= 5e-5
    assert metrics["loss"] == ref_metrics["loss"]

    # and the same gradients
    ref_loss.backward()
    loss.backward()
    ours = dict(model.named_parameters())
    diff, norm = 0.0, 0.0
    for name, p in ref_model.named_parameters():
        assert (p.grad is None) == (ours[name].grad is None), name
        if p.grad is not None:
            diff += (ours[name].grad - p.grad).double().pow(2).sum().item()
            norm += p.grad.double().pow(2).sum().item()
    assert norm > 0 and math.sqrt(diff / norm) < 1e-5, math.sqrt(diff / norm)


def test_config_extends_fairseqs_hubert_criterion_config_with_our_defaults():
    """The fields fairseq's ``hubert`` criterion has are its own (one definition, same names);
    ours differ only in the default feature-penalty weight and add one weight per stream."""
    import dataclasses

    from fairseq.criterions.hubert_criterion import HubertCriterionConfig

    from dicehubert_fairseq.criterions.dicehubert import DiceHubertCriterionConfig

    assert issubclass(DiceHubertCriterionConfig, HubertCriterionConfig)
    ours = {f.name: f for f in dataclasses.fields(DiceHubertCriterionConfig)}
    assert set(ours) == {f.name for f in dataclasses.fields(HubertCriterionConfig)} | {"label_weights"}
    cfg = DiceHubertCriterionConfig()
    assert (cfg.pred_masked_weight, cfg.pred_nomask_weight, cfg.loss_weights, cfg.log_keys, cfg.label_weights) == (
        1.0, 0.0, [10.0], [], [])
