"""Same seed, same run: random crops and span masks depend only on (seed, epoch, utterance) and
(seed, update), never on an RNG shared between fairseq's prefetch thread and the training thread.

fairseq's data iterator collates batches in a background thread (``dataset.data_buffer_size``,
on by default); fairseq's ``HubertDataset`` crops with numpy's global RNG there, and a mask seed
drawn from that same RNG in the training thread makes the order of draws a race: two runs of one
command logged different losses from the first log line.  Here:

* the dataset: a crop is a function of (``common.seed``, epoch, dataset index) alone -- not of
  the batch it is in, of numpy's global RNG, or of the thread that collates it;
* the student: masks are a function of (``common.seed``, update number, forward within the
  update) alone, the same after a resume as in an uninterrupted run;
* end to end: two fresh ``fairseq-hydra-train`` runs of the tiny recipe (random crops, several
  utterances per batch, prefetching on) log identical losses for 42 updates (3 epochs), for a student row
  and for the tiny teacher's config.
"""

import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.config import build, compose
from dicehubert_fairseq.testing import tiny_model_overrides, write_corpus, write_random_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
#: 3 epochs of the 60-utterance corpus below (14 batches each): stopping mid-epoch leaves fairseq's
#: prefetch thread collating while the interpreter exits, which once aborted a run at exit
#: ("terminate called without an active exception", fairseq's daemon thread, not the training)
UPDATES = 42


# ----------------------------------------------------------------------------- the dataset's crops


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """Utterances of 1.2-2.5 s (all longer than the 1 s crops below), 'km' labels at 50 Hz and
    'mfcc' labels at 100 Hz."""
    root = tmp_path_factory.mktemp("determinism")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 60, "valid": 2}, seconds=(1.2, 2.5), seed=21)
    write_random_labels(labels, sizes, "km", 20, 50, seed=21)
    write_random_labels(labels, sizes, "mfcc", 20, 100, seed=22)
    return {"data": data, "labels": labels, "sizes": sizes}


def _dataset(corpus, seed=1, extra=()):
    cfg = compose("dicehubert_narrow", [f"task.data={corpus['data']}", f"task.label_dir={corpus['labels']}",
                                        "run=cpu", f"common.seed={seed}", "task.max_sample_size=16000",
                                        "task.min_sample_size=8000"] + tiny_model_overrides() + list(extra))
    task, _, _ = build(cfg)
    task.load_dataset("train")
    return task.datasets["train"]


def _crops(ds, indices):
    """``{index: (cropped waveform, cropped labels)}`` of one batch of ``indices``."""
    batch = ds.collater([ds[i] for i in indices])
    return {int(i): (batch["net_input"]["source"][r], batch["target_list"][0][r])
            for r, i in enumerate(batch["id"].tolist())}


def test_crops_depend_on_seed_epoch_and_utterance_only(long_corpus):
    ds = _dataset(long_corpus)
    assert ds.random_crop and all(s > ds.max_sample_size for s in ds.sizes), "every utterance must be cropped"
    ds.set_epoch(1)
    np.random.seed(0)
    a = _crops(ds, [0, 1, 2, 3])
    # another batch composition, order, global numpy state and thread: the same crops
    np.random.seed(12345)
    np.random.rand(17)
    box = {}
    worker = threading.Thread(target=lambda: box.update(_crops(ds, [3, 7, 0])))
    worker.start()
    worker.join()
    for i in (0, 3):
        assert torch.equal(a[i][0], box[i][0]), i
        # the labels start at the same frame (fairseq cuts a batch's labels to its shortest)
        n = min(len(a[i][1]), len(box[i][1]))
        assert n >= 48 and torch.equal(a[i][1][:n], box[i][1][:n]), i
    # the crops are random: not all at the start, not all the same offset
    full = {i: ds.get_audio(i) for i in range(4)}
    starts = []
    for i, (wav, _) in a.items():
        hits = [s for s in range(len(full[i]) - len(wav) + 1) if torch.equal(full[i][s:s + len(wav)], wav)]
        assert hits, i
        starts.append(hits[0])
    assert len(set(starts)) > 1 and max(starts) > 0, starts
    # another epoch or another seed: other crops
    ds.set_epoch(2)
    b = _crops(ds, [0, 1, 2, 3])
    assert sum(not torch.equal(a[i][0], b[i][0]) for i in a) >= 3
    other = _dataset(long_corpus, seed=2)
    other.set_epoch(1)
    c = _crops(other, [0, 1, 2, 3])
    assert sum(not torch.equal(a[i][0], c[i][0]) for i in a) >= 3
    # and a fresh dataset with the same seed and epoch crops the same again
    again = _dataset(long_corpus)
    again.set_epoch(1)
    d = _crops(again, [0, 1, 2, 3])
    assert all(torch.equal(a[i][0], d[i][0]) for i in a)


# ----------------------------------------------------------------------------- the student's masks


def _masks(model, n_calls=1, B=3, T=60):
    x = torch.zeros(B, T, model.encoder.embedding_dim)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[2, 40:] = True
    return [model.apply_mask(x.clone(), pad, None)[1] for _ in range(n_calls)]


def test_masks_depend_on_seed_and_update_only(long_corpus):
    cfg = compose("dicehubert_narrow", [f"task.data={long_corpus['data']}",
                                        f"task.label_dir={long_corpus['labels']}", "run=cpu", "common.seed=3"]
                  + tiny_model_overrides())
    _, model, _ = build(cfg)
    _, twin, _ = build(cfg)
    _, other_seed, _ = build(compose("dicehubert_narrow", [f"task.data={long_corpus['data']}",
                                                          f"task.label_dir={long_corpus['labels']}", "run=cpu",
                                                          "common.seed=4"] + tiny_model_overrides()))
    for m in (model, twin, other_seed):
        m.set_num_updates(7)
    np.random.seed(0)
    torch.manual_seed(0)
    first, second = _masks(model, 2)  # two forwards in one update (update_freq > 1)
    np.random.seed(99)
    torch.manual_seed(99)
    np.random.rand(5)
    # same seed, same update, same forward: same masks, whatever the global RNGs hold
    t_first, t_second = _masks(twin, 2)
    assert torch.equal(first, t_first) and torch.equal(second, t_second)
    assert not torch.equal(first, second)
    assert not torch.equal(first, _masks(other_seed)[0])
    # the next update draws new masks; a model resumed at update 8 draws the same as one that got there
    model.set_num_updates(8)
    eighth = _masks(model)[0]
    assert not torch.equal(first, eighth)
    twin.set_num_updates(8)
    assert torch.equal(eighth, _masks(twin)[0])
    # still HuBERT's masks: padding never masked, about mask_prob * T / mask_length spans
    assert not first[2, 40:].any()
    assert 0.3 < first[:2].float().mean() < 0.9


def test_short_padded_rows_are_masked_without_stopping_the_run(long_corpus):
    """A padded row of one or two real frames: fairseq's compute_mask_indices covers all of it in
    about two draws in three and raises; the student draws again (deterministically), so no
    update stops training. A row of padding only still raises, naming the row."""
    cfg = compose("dicehubert_narrow", [f"task.data={long_corpus['data']}",
                                        f"task.label_dir={long_corpus['labels']}", "run=cpu"]
                  + tiny_model_overrides())
    _, model, _ = build(cfg)
    x = torch.zeros(3, 60, model.encoder.embedding_dim)
    pad = torch.zeros(3, 60, dtype=torch.bool)
    pad[1, 2:] = True  # two real frames
    pad[2, 1:] = True  # one
    masks = []
    for update in range(30):
        model.set_num_updates(update)
        m = model.apply_mask(x.clone(), pad, None)[1]
        assert not (m & pad).any() and (~m[1:] & ~pad[1:]).any(dim=1).all()  # a real frame left unmasked
        masks.append(m)
    model.set_num_updates(3)
    assert torch.equal(model.apply_mask(x.clone(), pad, None)[1], masks[3])  # redraws are deterministic
    pad[2] = True
    with pytest.raises(ValueError, match="the entire sequence is masked. sz=0.*index=2"):
        model.apply_mask(x.clone(), pad, None)


# ----------------------------------------------------------------------------- two fresh runs


def _env():
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"  # one thread each, as in the reproduction
    env["MKL_NUM_THREADS"] = "1"
    return env


def _train(row, corpus, run_dir):
    """The tiny recipe (``run=tiny``), 1 s crops, four utterances per batch, :data:`UPDATES`
    updates ending on an epoch boundary.

    Prefetching stays on (fairseq's default ``dataset.data_buffer_size``)."""
    cmd = [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", "config/"] + row + [
        "common.user_dir=dicehubert_fairseq", f"task.data={corpus['data']}", f"task.label_dir={corpus['labels']}",
        "run=tiny", "common.seed=1", "common.log_format=json", "common.log_interval=1",
        f"optimization.max_update={UPDATES}", "task.max_sample_size=16000", "task.min_sample_size=8000",
        "dataset.max_tokens=64000", "checkpoint.no_save=true", f"hydra.run.dir={run_dir}",
    ] + tiny_model_overrides()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = [json.loads(line.split(" - ", 1)[1]) for line in out.splitlines()
            if "[train_inner]" in line and " - {" in line]
    buffer = re.search(r"'data_buffer_size': (\d+)", out)  # fairseq logs its config at start
    assert buffer and int(buffer.group(1)) > 0, "prefetching must be on"
    epochs = [json.loads(line.split(" - ", 1)[1]) for line in out.splitlines() if "[train][INFO] - {" in line]
    assert [int(e["train_num_updates"]) for e in epochs] == [UPDATES // 3 * k for k in (1, 2, 3)], epochs
    return rows


ROWS = {
    "scratch_narrow": ["--config-name", "scratch_narrow", "model=tiny_narrow"],
    "tiny_teacher": ["--config-name", "tiny_teacher", "+data=mfcc"],
}


@pytest.mark.parametrize("row", list(ROWS))
def test_two_fresh_runs_log_identical_losses(row, long_corpus, tmp_path):
    first = _train(ROWS[row], long_corpus, str(tmp_path / "a"))
    second = _train(ROWS[row], long_corpus, str(tmp_path / "b"))
    assert [int(r["num_updates"]) for r in first] == list(range(1, UPDATES + 1))
    assert all(int(r["bsz"]) >= 3 for r in first), [r["bsz"] for r in first]  # several utterances a batch
    keys = [k for k in first[0] if k.startswith(("loss", "acc_", "gnorm"))]
    assert "loss" in keys and "gnorm" in keys
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    assert len({r["loss"] for r in first}) > 5  # real, changing numbers


def test_checkpoint_without_task_seed_still_loads(long_corpus, tmp_path):
    """Checkpoints written before ``task.seed`` existed: the seed comes from their common.seed."""
    from fairseq import checkpoint_utils

    from dicehubert_fairseq.testing import write_checkpoint

    path = str(tmp_path / "student.pt")
    write_checkpoint(path, long_corpus["data"], long_corpus["labels"], model="dicehubert_student", task="dicehubert")
    state = torch.load(path, weights_only=True)
    assert state["cfg"]["task"]["seed"] == state["cfg"]["common"]["seed"]
    del state["cfg"]["task"]["seed"]
    state["cfg"]["common"]["seed"] = 5
    torch.save(state, path)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    assert task.cfg.seed == 5 and models[0].seed == 5
