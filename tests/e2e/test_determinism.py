"""Same seed, same run: two fresh ``fairseq-hydra-train`` runs with random crops, several utterances per
batch and fairseq's data prefetching on log identical losses.

fairseq's data iterator collates batches in a background thread (``dataset.data_buffer_size``,
on by default); fairseq's ``HubertDataset`` crops with numpy's global RNG there, and a mask seed
drawn from that same RNG in the training thread made the order of draws a race: two runs of one
command logged different losses from the first log line.  Crops now depend on (seed, epoch,
utterance) alone (``tests/test_data_dataset.py``) and the student's masks on (seed, update,
forward) alone (``tests/test_models_dicehubert_student.py``); here, end to end, for a student row
and for the tiny teacher's config, 42 updates (3 epochs).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.data import tiny_model_overrides, write_corpus, write_random_labels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
#: 3 epochs of the 60-utterance corpus below (14 batches each): stopping mid-epoch leaves fairseq's
#: prefetch thread collating while the interpreter exits, which once aborted a run at exit
#: ("terminate called without an active exception", fairseq's daemon thread, not the training)
UPDATES = 42

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """60 utterances of 1.2-2.5 s (all longer than the 1 s crops below), 'km' labels at 50 Hz and
    'mfcc' labels at 100 Hz."""
    root = tmp_path_factory.mktemp("determinism")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 60, "valid": 2}, seconds=(1.2, 2.5), seed=21)
    write_random_labels(labels, sizes, "km", 20, 50, seed=21)
    write_random_labels(labels, sizes, "mfcc", 20, 100, seed=22)
    return {"data": data, "labels": labels}


def _env():
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"  # one thread each, as in the reproduction
    env["MKL_NUM_THREADS"] = "1"
    return env


def _train(row, corpus, run_dir):
    """The tiny recipe (``run=tiny``), 1 s crops, four utterances per batch, :data:`UPDATES`
    updates ending on an epoch boundary. Prefetching stays on (fairseq's default
    ``dataset.data_buffer_size``)."""
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
    keys = [k for k in first[0] if k.startswith(("loss", "correct_", "gnorm"))]
    assert "loss" in keys and "gnorm" in keys and "correct_m_0" in keys
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    assert len({r["loss"] for r in first}) > 5  # real, changing numbers
