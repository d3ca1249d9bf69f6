"""Training survives SIGKILL and is deterministic: real ``fairseq-hydra-train`` subprocesses, CPU.

One command (the design card's, tiny student, batch size 1, a checkpoint every 4 updates, 30
updates) is run three times on the same corpus:

* ``reference``: uninterrupted;
* ``killed``: SIGKILLed right after its first checkpoints were saved (mid-epoch);
* ``resumed``: the *same command* again, in the same run directory.

Resuming must continue from ``checkpoint_last.pt``: the update count, the optimizer (Adam's
per-parameter step counts and moments), the learning-rate schedule and the position inside the
epoch (``extra_state['train_iterator']``).  Determinism: the reference and the killed run are two
fresh runs with the same seed, so their first training losses must be identical.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch

import dicehubert_fairseq  # noqa: F401  (torch.load allow-list for fairseq checkpoints)
from tests.helpers.data import tiny_model_overrides, write_corpus, write_random_labels
from tests.helpers.runs import BIN, REPO, json_rows, run, run_and_kill, subprocess_env

pytestmark = pytest.mark.e2e

N_UTT = 11          # batch size 1: 11 updates per epoch
MAX_UPDATE = 30
SAVE_EVERY = 4      # 4, 8, ..., 28: never a multiple of 11, so every save is mid-epoch
KILL_AFTER = 8      # kill once the checkpoint of update >= 8 is saved


def _command(data, labels, run_dir, seed=7):
    return [
        os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", "config/", "--config-name", "dicehubert_narrow",
        "common.user_dir=dicehubert_fairseq", f"task.data={data}", f"task.label_dir={labels}",
        "run=cpu", "common.log_format=json", "common.log_interval=1", f"common.seed={seed}",
        "task.min_sample_size=8000", "dataset.max_tokens=100000", "dataset.batch_size=1",
        "dataset.required_batch_size_multiple=1",
        "dataset.validate_interval=1000", "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=10",
        f"optimization.max_update={MAX_UPDATE}", f"checkpoint.save_interval_updates={SAVE_EVERY}",
        "checkpoint.save_interval=1000",  # no end-of-epoch saves: every checkpoint is mid-epoch
        f"hydra.run.dir={run_dir}",
    ] + tiny_model_overrides()


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _adam_steps(state):
    return sorted({int(s["step"]) for s in state["last_optimizer_state"]["state"].values()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("killresume")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": N_UTT, "valid": 2}, seconds=(0.8, 1.2), seed=11)
    write_random_labels(labels, sizes, seed=11)

    ref_dir, run_dir = str(root / "reference"), str(root / "run")
    reference = run(_command(data, labels, ref_dir))
    killed = run_and_kill(_command(data, labels, run_dir), str(root / "killed.log"), KILL_AFTER)
    last = os.path.join(run_dir, "checkpoints", "checkpoint_last.pt")
    at_kill = str(root / "checkpoint_at_kill.pt")
    shutil.copy(last, at_kill)
    resumed = run(_command(data, labels, run_dir))
    for name, log in (("reference", reference), ("resumed", resumed)):
        (root / f"{name}.log").write_text(log)
    return {
        "reference": reference, "killed": killed, "resumed": resumed, "at_kill": at_kill,
        "ref_last": os.path.join(ref_dir, "checkpoints", "checkpoint_last.pt"), "last": last,
    }


def test_killed_run_left_a_complete_mid_epoch_checkpoint(runs):
    state = _load(runs["at_kill"])
    updates = state["optimizer_history"][-1]["num_updates"]
    assert updates >= KILL_AFTER and updates % SAVE_EVERY == 0
    itr = state["extra_state"]["train_iterator"]
    assert itr["epoch"] == updates // N_UTT + 1
    assert itr["iterations_in_epoch"] == updates % N_UTT and 0 < itr["iterations_in_epoch"] < N_UTT
    # Adam state saved with it: one step per update for every parameter
    assert _adam_steps(state) == [updates]
    # the log says the kill came after that checkpoint, before the run's end
    rows = json_rows(runs["killed"], "train_inner")
    assert updates <= int(rows[-1]["num_updates"]) < MAX_UPDATE


def test_resume_continues_update_count_and_schedule(runs):
    updates = _load(runs["at_kill"])["optimizer_history"][-1]["num_updates"]
    log = runs["resumed"]
    m = re.search(r"Loaded checkpoint (\S+) \(epoch (\d+) @ (\d+) updates\)", log)
    assert m, log[-3000:]
    assert m.group(1).endswith("checkpoint_last.pt") and int(m.group(3)) == updates
    rows = json_rows(log, "train_inner")
    assert [int(r["num_updates"]) for r in rows] == list(range(updates + 1, MAX_UPDATE + 1))
    # the learning-rate schedule (warm-up, then decay) continues where it was: same lr per update
    ref_lr = {int(r["num_updates"]): r["lr"] for r in json_rows(runs["reference"], "train_inner")}
    assert all(r["lr"] == ref_lr[int(r["num_updates"])] for r in rows)
    final = _load(runs["last"])
    assert final["optimizer_history"][-1]["num_updates"] == MAX_UPDATE


def test_resume_continues_data_position(runs):
    """The interrupted epoch is finished, not restarted: it ends at the same update as uninterrupted."""
    itr = _load(runs["at_kill"])["extra_state"]["train_iterator"]
    epoch_end = {int(r["epoch"]): int(r["train_num_updates"]) for r in json_rows(runs["reference"], "train")}
    resumed_ends = {int(r["epoch"]): int(r["train_num_updates"]) for r in json_rows(runs["resumed"], "train")}
    assert itr["epoch"] in resumed_ends, runs["resumed"][-3000:]
    assert resumed_ends[itr["epoch"]] == epoch_end[itr["epoch"]] == itr["epoch"] * N_UTT
    assert f"begin training epoch {itr['epoch']}" in runs["resumed"]
    assert "begin training epoch 1\n" not in runs["resumed"] or itr["epoch"] == 1
    # the final iterator state of both runs agrees
    assert _load(runs["last"])["extra_state"]["train_iterator"] == _load(runs["ref_last"])["extra_state"]["train_iterator"]


def test_resume_continues_optimizer_state(runs):
    """Adam's step counts run on from the checkpoint (a fresh optimizer would count from 0)."""
    assert _adam_steps(_load(runs["last"])) == [MAX_UPDATE]
    assert _adam_steps(_load(runs["ref_last"])) == [MAX_UPDATE]


def test_resumed_trainer_loads_the_checkpoint_optimizer_exactly(runs, tmp_path):
    """What fairseq's train.py does on restart (checkpoint_utils.load_checkpoint into a Trainer),
    with the killed run's saved config: Adam's step, exp_avg and exp_avg_sq equal the file's."""
    from omegaconf import OmegaConf

    from fairseq import checkpoint_utils, tasks
    from fairseq.trainer import Trainer

    state = _load(runs["at_kill"])
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    shutil.copy(runs["at_kill"], save_dir / "checkpoint_last.pt")
    cfg = OmegaConf.create(state["cfg"])
    cfg.checkpoint.save_dir = str(save_dir)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    _extra, epoch_itr = checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)
    itr = state["extra_state"]["train_iterator"]
    assert trainer.get_num_updates() == state["optimizer_history"][-1]["num_updates"]
    assert (epoch_itr.epoch, epoch_itr.iterations_in_epoch) == (itr["epoch"], itr["iterations_in_epoch"])
    loaded = trainer.optimizer.state_dict()["state"]
    saved = state["last_optimizer_state"]["state"]
    assert loaded.keys() == saved.keys() and len(saved) > 10
    for k in saved:
        assert int(loaded[k]["step"]) == int(saved[k]["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[k][name], saved[k][name]), (k, name)
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, state["model"][name]), name


def test_same_seed_same_first_losses(runs):
    """Two fresh runs with the same seed (reference and killed) log identical losses."""
    ref = json_rows(runs["reference"], "train_inner")
    killed = json_rows(runs["killed"], "train_inner")
    n = len(killed)
    assert n >= KILL_AFTER
    keys = ("num_updates", "loss", "loss_m_0", "correct_m_0", "loss_features_pen", "lr", "gnorm")
    assert [[r[k] for k in keys] for r in killed] == [[r[k] for k in keys] for r in ref[:n]]
    # and they are real, changing numbers, not a constant
    assert len({r["loss_m_0"] for r in ref[:n]}) > 1


def test_resumed_run_logs_the_uninterrupted_runs_losses(runs):
    """Masks follow (seed, update) and crops (seed, epoch, utterance), fairseq reseeds torch per
    update: the run resumed after SIGKILL logs, update for update, what the reference logged."""
    ref = {int(r["num_updates"]): r for r in json_rows(runs["reference"], "train_inner")}
    rows = json_rows(runs["resumed"], "train_inner")
    assert rows
    keys = ("loss", "loss_m_0", "correct_m_0", "loss_features_pen", "gnorm")
    assert [[r[k] for k in keys] for r in rows] == [[ref[int(r["num_updates"])][k] for k in keys] for r in rows]


# ----------------------------------------------------------------------------- a truncated checkpoint_last.pt


@pytest.fixture(scope="module")
def truncated_last(tmp_path_factory):
    """8 updates (checkpoint_1_8.pt, then fairseq *copies* it to checkpoint_last.pt), then
    checkpoint_last.pt cut short: what a SIGKILL during that copy leaves behind."""
    root = tmp_path_factory.mktemp("truncated")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": N_UTT, "valid": 2}, seconds=(0.8, 1.2), seed=11)
    write_random_labels(labels, sizes, seed=11)
    run_dir = str(root / "run")
    cmd = [c for c in _command(data, labels, run_dir) if not c.startswith("optimization.max_update=")]
    run(cmd + ["optimization.max_update=8"])
    ckpts = os.path.join(run_dir, "checkpoints")
    last = os.path.join(ckpts, "checkpoint_last.pt")
    with open(last, "rb") as f:
        data_bytes = f.read()
    with open(last, "wb") as f:
        f.write(data_bytes[: len(data_bytes) // 3])
    return {"cmd": cmd, "ckpts": ckpts}


@pytest.mark.slow
def test_interval_checkpoint_is_intact_and_resumes(truncated_last):
    """The documented recovery: checkpoint_{epoch}_{updates}.pt is written atomically by fairseq
    (temporary name, then rename); restart from it with checkpoint.restore_file."""
    intact = os.path.join(truncated_last["ckpts"], "checkpoint_1_8.pt")
    assert _load(intact)["optimizer_history"][-1]["num_updates"] == 8
    log = run(truncated_last["cmd"] + ["optimization.max_update=10", f"checkpoint.restore_file={intact}"])
    assert re.search(r"Loaded checkpoint \S+checkpoint_1_8\.pt \(epoch 1 @ 8 updates\)", log), log[-3000:]
    assert [int(r["num_updates"]) for r in json_rows(log, "train_inner")] == [9, 10]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "DEFECT (fairseq, not fixable from the plugin): checkpoint_utils.save_checkpoint writes "
    "checkpoint_{E}_{U}.pt atomically but then fills checkpoint_last.pt with a plain, non-atomic "
    "PathManager.copy; a SIGKILL during that copy leaves a truncated checkpoint_last.pt, and the "
    "restart dies with a bare RuntimeError traceback from torch.load (PytorchStreamReader ... "
    "central directory). Recovery: checkpoint.restore_file=<save_dir>/checkpoint_{E}_{U}.pt."))
def test_restart_with_a_truncated_checkpoint_last_says_what_to_do(truncated_last):
    proc = subprocess.run(truncated_last["cmd"] + ["optimization.max_update=10"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "checkpoint_last.pt" in out and "Traceback" not in out
