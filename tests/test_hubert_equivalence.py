"""End to end against fairseq's own HuBERT: task ``dicehubert`` + model ``dicehubert_student`` +
criterion ``dicehubert`` compute exactly what fairseq's ``hubert_pretraining`` + ``hubert`` +
``hubert`` compute.

One config (``config/tiny_teacher.yaml``, the tiny example's teacher) is composed twice: as it is
(this plugin) and with fairseq's task, model and criterion names. fairseq's model is built, its
state dict loaded into the student, both masks are fixed to one draw (fairseq's own ``hubert``
model masks from OS entropy), and one batch goes through each criterion: the batches, the
arguments of the span masking, the loss, the sample size, every logged loss, the correct/count
of every stream, the reduced accuracies and the gradients must agree -- with fairseq's HuBERT
Base loss settings, with the tiny teacher's (untied projections, unmasked frames in the loss),
and with two label streams on padded audio.
"""

import inspect
import math

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.config import build, compose
from dicehubert_fairseq.testing import write_corpus, write_random_labels

FAIRSEQ = ["task._name=hubert_pretraining", "model._name=hubert", "criterion._name=hubert"]
TOL = 1e-5

CASES = {
    # fairseq's hubert_base_librispeech.yaml loss: masked frames only, feature penalty 10, tied projection
    "hubert_base_loss": ["criterion.pred_nomask_weight=0.0", "criterion.loss_weights=[10.0]",
                         "model.untie_final_proj=false"],
    # the tiny teacher as configured (run/tiny.yaml: unmasked frames weigh 1, no feature penalty)
    "tiny_teacher": [],
    # two label streams, untied projections, unmasked-frame weight 0.5, padded batch
    "two_streams_padded": ["task.labels=[km,km2]", "model.untie_final_proj=true",
                           "criterion.pred_nomask_weight=0.5", "criterion.loss_weights=[10.0]",
                           "task.pad_audio=true"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(1.0, 2.0), seed=31)
    write_random_labels(labels, sizes, "km", 20, 50, seed=31)
    write_random_labels(labels, sizes, "km2", 12, 50, seed=32)
    return data, labels


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("case", list(CASES))
def test_dicehubert_computes_fairseqs_hubert(case, corpus, monkeypatch, one_thread):
    data, labels = corpus
    overrides = [f"task.data={data}", f"task.label_dir={labels}", "task.random_crop=false",
                 "++model.mask_channel_prob=0.1"] + CASES[case]
    ref_task, ref_model, ref_crit = build(compose("tiny_teacher", overrides + FAIRSEQ))
    task, model, crit = build(compose("tiny_teacher", overrides))
    assert type(ref_model).__name__ == "HubertModel" and type(ref_crit).__name__ == "HubertCriterion"
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
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=TOL)
    for key, value in ref_log.items():
        if key.startswith(("loss_u_", "correct_u_", "count_u_")) and crit.cfg.pred_nomask_weight == 0:
            continue  # fairseq logs the unmasked frames' loss even at weight 0; we do not compute it
        assert key in log, key
        if key.startswith(("correct_", "count_", "ntokens", "nsentences", "sample_size")):
            assert log[key] == value, key
        else:
            assert math.isclose(log[key], value, rel_tol=TOL, abs_tol=TOL), (key, log[key], value)
    streams = len(task.cfg.labels)
    assert {f"loss_m_{i}" for i in range(streams)} <= set(log)
    # the accuracies both print (fairseq names them correct_m_i, we acc_m_i; ours are rounded to 4 digits)
    ref_metrics, metrics = _reduced(ref_crit, ref_log), _reduced(crit, log)
    for i in range(streams):
        assert abs(metrics[f"acc_m_{i}"] - ref_metrics[f"correct_m_{i}"]) <= 5e-5
        if crit.cfg.pred_nomask_weight > 0:
            assert abs(metrics[f"acc_u_{i}"] - ref_metrics[f"correct_u_{i}"]) <= 5e-5
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
