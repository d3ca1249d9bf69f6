"""Distributed training in two CPU processes: ``torchrun`` + ``fairseq-hydra-train`` + ``run=cpu_torchrun``.

Every run here is a real ``torchrun --standalone --nproc_per_node 2`` of the README's command
(gloo backend, ``env://`` initialisation from torchrun's environment; see
``config/run/cpu_torchrun.yaml`` and ``dicehubert_fairseq/_distributed.py``).

**Equality with one process.** With ``dataset.batch_size=1``, fairseq gives rank r the batches
r, r + 2, r + 4, ... of the epoch's (seeded, rank-independent) batch order, so update u of a
world-size-2 run sees batches 2u and 2u + 1, exactly the two batches that one process with
``optimization.update_freq=[2]`` accumulates for its update u. The two runs must then compute
the same gradients, up to the order of a float sum. That only holds if nothing else random
differs between them, and two things would:

* span masks are drawn from numpy's global RNG, which fairseq seeds once per process with
  ``common.seed`` (not + rank): rank 1 draws its first mask from the state that one process
  uses for batch 0, not batch 1;
* dropout draws from torch's RNG, reseeded by fairseq to ``seed + num_updates`` at each update:
  rank 1 starts batch 1 from that seed, one process starts it after batch 0's draws.

So the comparison runs with ``model.mask_prob=0`` (no masks at all) and every dropout at 0, and
trains on the unmasked frames (``criterion.pred_nomask_weight=1``): the loss is still HuBERT's
prediction loss plus the feature penalty, and the whole run is then a function of the data.
Masked training in two processes is exercised by the other tests (default masking).

Tolerance: gradients (from Adam's first moment after update 1, ``exp_avg = (1 - beta1) * g``) and
parameters after the last update agree within ``rtol=1e-5`` of each tensor's largest magnitude;
measured here: identical to the last bit (two-term sums are commutative, and fairseq's /2 and x2
around the all-reduce are exact).
"""

import os
import re
import time

import pytest
import torch

import dicehubert_fairseq  # noqa: F401  (torch.load allow-list for fairseq checkpoints)
from tests.helpers.data import (
    tiny_model_overrides, write_checkpoint, write_corpus, write_random_labels, write_soft_labels,
)
from tests.helpers.runs import BIN, json_rows, run, run_and_kill

pytestmark = pytest.mark.e2e

N_UTT = 10           # batch size 1, 2 ranks: 5 updates per epoch
MAX_UPDATE = 12
SAVE_EVERY = 3       # 3, 6, 9, 12: 3, 6 and 9 are mid-epoch
KILL_AFTER = 6
TOL = 1e-5

# Everything random but the data switched off (see the module docstring).
DATA_ONLY = [
    "model.mask_prob=0.0", "model.dropout=0.0", "model.attention_dropout=0.0", "model.activation_dropout=0.0",
    "model.dropout_input=0.0", "model.dropout_features=0.0", "model.encoder_layerdrop=0.0",
    "criterion.pred_masked_weight=0.0", "criterion.pred_nomask_weight=1.0",
]


def _train_args(world, run_dir, config="dicehubert_narrow", max_update=MAX_UPDATE, extra=()):
    """fairseq-hydra-train's arguments; ``world`` carries task.data/label_dir (and a teacher)."""
    return [
        "--config-dir", "config/", "--config-name", config, "common.user_dir=dicehubert_fairseq",
        f"task.data={world['data']}", f"task.label_dir={world['labels']}",
        "common.log_format=json", "common.log_interval=1", "common.seed=7",
        "task.min_sample_size=8000", "dataset.max_tokens=100000", "dataset.batch_size=1",
        "dataset.required_batch_size_multiple=1", "dataset.validate_interval=1000",
        "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=4", f"optimization.max_update={max_update}",
        f"checkpoint.save_interval_updates={SAVE_EVERY}", "checkpoint.save_interval=1000",
        f"hydra.run.dir={run_dir}",
    ] + tiny_model_overrides() + list(extra)


def torchrun(args, nproc=2):
    """``torchrun --standalone`` (a free port of its own) of ``fairseq-hydra-train args``."""
    return [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "--no-python",
            os.path.join(BIN, "fairseq-hydra-train")] + list(args)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": N_UTT, "valid": 2}, seconds=(0.8, 1.2), seed=21)
    write_random_labels(labels, sizes, "km", seed=21)
    write_soft_labels(labels, sizes, "kmsoft", n_clusters=20, seed=22)
    teacher = str(root / "teacher.pt")  # 2 layers x 32, fairseq's format
    write_checkpoint(teacher, data, labels, seed=3)
    return {"root": root, "data": data, "labels": labels, "teacher": teacher}


@pytest.fixture(scope="module")
def reference(world):
    """World size 2, uninterrupted, data-only randomness, a checkpoint after every update;
    each rank is given its own checkpoint.save_dir to show which ranks write."""
    run_dir = str(world["root"] / "ws2")
    args = _train_args(world, run_dir, extra=DATA_ONLY + [
        "run=cpu_torchrun", f"checkpoint.save_dir={run_dir}/checkpoints_rank${{oc.env:RANK}}",
        "checkpoint.save_interval_updates=1", "checkpoint.keep_interval_updates=-1",
    ])
    start = time.time()
    log = run(torchrun(args))
    (world["root"] / "ws2.log").write_text(log)
    return {"log": log, "dir": run_dir, "ckpt": os.path.join(run_dir, "checkpoints_rank0"),
            "seconds": time.time() - start}


@pytest.fixture(scope="module")
def single_update_freq_2(world):
    run_dir = str(world["root"] / "ws1_uf2")
    args = _train_args(world, run_dir, extra=DATA_ONLY + [
        "run=cpu", "optimization.update_freq=[2]", "checkpoint.save_interval_updates=1",
        "checkpoint.keep_interval_updates=-1",
    ])
    log = run([os.path.join(BIN, "fairseq-hydra-train")] + args)
    (world["root"] / "ws1_uf2.log").write_text(log)
    return {"log": log, "ckpt": os.path.join(run_dir, "checkpoints")}


def _assert_close(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        scale = max(a[k].abs().max().item(), 1e-12)
        err = (a[k] - b[k]).abs().max().item()
        assert err <= TOL * scale, f"{what} {k}: max |diff| {err:.3g} > {TOL} x {scale:.3g}"


def test_two_processes_train_as_one_process_with_update_freq_2(reference, single_update_freq_2):
    ws2, ws1 = json_rows(reference["log"], "train_inner"), json_rows(single_update_freq_2["log"], "train_inner")
    assert [int(r["num_updates"]) for r in ws2] == list(range(1, MAX_UPDATE + 1))
    # both ranks' batch in every update's statistics (batch size 1 per rank), as update_freq=2's two batches
    assert all(int(r["bsz"]) == 2 for r in ws2) and all(int(r["bsz"]) == 2 for r in ws1)
    keys = ("num_updates", "loss", "loss_u_0", "loss_features_pen", "wpb", "lr", "gnorm")
    assert [[r[k] for k in keys] for r in ws2] == [[r[k] for k in keys] for r in ws1]
    assert len({r["loss_u_0"] for r in ws2}) > 1  # real, changing numbers

    # the first update's gradients, from Adam's first moment: exp_avg = (1 - beta1) * grad
    first = [_load(os.path.join(d, "checkpoint_1_1.pt")) for d in (reference["ckpt"], single_update_freq_2["ckpt"])]
    grads = [{k: s["exp_avg"] / 0.1 for k, s in f["last_optimizer_state"]["state"].items()} for f in first]
    assert len(grads[1]) > 10 and sum(g.abs().sum().item() for g in grads[1].values()) > 0
    # fairseq's legacy DDP (ddp_backend no_c10d) all-reduces a zero gradient for a parameter the
    # forward did not use (mask_emb, without masks), where one process has no gradient at all
    unused = grads[0].keys() - grads[1].keys()
    assert len(unused) == 1 and all(not grads[0][k].any() for k in unused)
    _assert_close({k: grads[0][k] for k in grads[1]}, grads[1], "gradient of update 1")
    # and every parameter after the last update (but mask_emb: Adam's weight decay shrinks it on
    # the zero gradient of the two-process run, and it takes no part in a forward without masks)
    last = [_load(os.path.join(d, "checkpoint_last.pt")) for d in (reference["ckpt"], single_update_freq_2["ckpt"])]
    assert [f["optimizer_history"][-1]["num_updates"] for f in last] == [MAX_UPDATE, MAX_UPDATE]
    params = [{k: v for k, v in f["model"].items() if k != "mask_emb"} for f in last]
    _assert_close(params[0], params[1], f"parameter after update {MAX_UPDATE}")


def test_only_rank_0_writes_checkpoints(reference):
    written = sorted(os.listdir(reference["ckpt"]))
    assert "checkpoint_last.pt" in written and f"checkpoint_1_{SAVE_EVERY}.pt" in written
    rank1 = os.path.join(reference["dir"], "checkpoints_rank1")
    assert not os.path.isdir(rank1) or not os.listdir(rank1), os.listdir(rank1)
    # the two processes did run as ranks 0 and 1 of one gloo group
    for rank in (0, 1):
        assert f"distributed init (rank {rank}): env://" in reference["log"]


# ----------------------------------------------------------------------------- each objective, world size 2


VARIANTS = {
    "soft": ("dicehubert_narrow", ["task.labels=[kmsoft]", "task.soft_labels=[kmsoft]"]),
    "two_streams": ("dicehubert_narrow", ["task.labels=[km,kmsoft]", "task.soft_labels=[kmsoft]",
                                          "criterion.label_weights=[1.0,0.5]"]),
    "feat": ("feat_narrow", []),
    "ssl_feat": ("ssl_feat_narrow", ["criterion.feat_weight=0.5"]),
}
FEAT = ["++model.feat_target_layers=[1,2]", "++model.feat_student_layers=[1,2]", "++model.feat_teacher_dim=32"]
EXPECTED_KEYS = {
    "soft": {"loss_m_0"}, "two_streams": {"loss_m_0", "loss_m_1"},
    "feat": {"feat_loss"}, "ssl_feat": {"loss_m_0", "feat_loss"},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_objective_trains_in_two_processes(world, variant, tmp_path):
    config, extra = VARIANTS[variant]
    if config != "dicehubert_narrow":
        extra = extra + FEAT + [f"criterion.teacher_checkpoint={world['teacher']}"]
    run_dir = str(tmp_path / "run")
    log = run(torchrun(_train_args(world, run_dir, config, max_update=3, extra=["run=cpu_torchrun"] + extra)))
    rows = json_rows(log, "train_inner")
    assert [int(r["num_updates"]) for r in rows] == [1, 2, 3]
    assert all(int(r["bsz"]) == 2 for r in rows)
    assert EXPECTED_KEYS[variant] <= set(rows[-1]), rows[-1]
    state = _load(os.path.join(run_dir, "checkpoints", "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 3


# ----------------------------------------------------------------------------- SIGKILL and resume


@pytest.fixture(scope="module")
def killed_and_resumed(world):
    run_dir = str(world["root"] / "killed")
    cmd = torchrun(_train_args(world, run_dir, extra=DATA_ONLY + ["run=cpu_torchrun"]))
    killed = run_and_kill(cmd, str(world["root"] / "killed.log"), KILL_AFTER)
    last = os.path.join(run_dir, "checkpoints", "checkpoint_last.pt")
    at_kill = _load(last)
    resumed = run(cmd)
    (world["root"] / "resumed.log").write_text(resumed)
    return {"killed": killed, "resumed": resumed, "at_kill": at_kill, "last": _load(last)}


@pytest.mark.slow
def test_sigkilled_two_process_run_resumes_from_checkpoint_last(killed_and_resumed, reference):
    at_kill = killed_and_resumed["at_kill"]
    updates = at_kill["optimizer_history"][-1]["num_updates"]
    assert updates >= KILL_AFTER and updates % SAVE_EVERY == 0 and updates < MAX_UPDATE
    killed_rows = json_rows(killed_and_resumed["killed"], "train_inner")
    assert int(killed_rows[-1]["num_updates"]) < MAX_UPDATE  # the kill came before the end
    resumed = killed_and_resumed["resumed"]
    m = re.search(r"Loaded checkpoint (\S+) \(epoch (\d+) @ (\d+) updates\)", resumed)
    assert m and m.group(1).endswith("checkpoint_last.pt") and int(m.group(3)) == updates, resumed[-3000:]
    rows = json_rows(resumed, "train_inner")
    assert [int(r["num_updates"]) for r in rows] == list(range(updates + 1, MAX_UPDATE + 1))
    # Same optimizer state on both ranks: the resumed updates are the uninterrupted run's, number
    # for number (a fresh optimizer, a restarted epoch or a rank left at its initial weights would
    # change the all-reduced loss and gradient norm).
    ref = {int(r["num_updates"]): r for r in json_rows(reference["log"], "train_inner")}
    keys = ("loss", "loss_u_0", "lr", "gnorm", "wpb")
    assert [[r[k] for k in keys] for r in rows] == [[ref[int(r["num_updates"])][k] for k in keys] for r in rows]
    final = killed_and_resumed["last"]
    assert final["optimizer_history"][-1]["num_updates"] == MAX_UPDATE
    assert {int(s["step"]) for s in final["last_optimizer_state"]["state"].values()} == {MAX_UPDATE}
    uninterrupted = _load(os.path.join(reference["ckpt"], "checkpoint_last.pt"))
    _assert_close(final["model"], uninterrupted["model"], "parameter after resume")
    assert final["extra_state"]["train_iterator"] == uninterrupted["extra_state"]["train_iterator"]
