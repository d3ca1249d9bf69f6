"""The run overlays as launched: hydra's submitit launcher for real, and the default overlay without a GPU.

* ``run=submitit_local``: ``fairseq-hydra-train -m`` through hydra's submitit launcher (the
  code path of ``run=slurm``, with submitit's local executor): a two-value sweep gives two
  finished training runs under the sweep directory (``run=slurm``'s settings, composed, are
  tested in ``tests/test_configs.py``);
* the default overlay ``run=gpu`` on a machine without a GPU stops in one line before anything
  is built (``task.cpu``, linked to ``common.cpu``, checked by the ``dicehubert`` task's setup).
"""

import os
import subprocess

import pytest
import torch

import dicehubert_fairseq  # noqa: F401  (torch.load allow-list for fairseq checkpoints)
from tests.helpers.data import tiny_model_overrides, write_corpus, write_random_labels
from tests.helpers.runs import BIN, REPO, subprocess_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def launch_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 6, "valid": 2}, seconds=(0.8, 1.2), seed=31)
    write_random_labels(labels, sizes, "km", seed=31)
    return {"root": root, "data": data, "labels": labels}


# ----------------------------------------------------------------------------- submitit, launched


def test_submitit_sweep_gives_two_finished_runs(launch_corpus):
    root = launch_corpus["root"]
    args = ["common.user_dir=dicehubert_fairseq", f"task.data={launch_corpus['data']}",
            f"task.label_dir={launch_corpus['labels']}",
            "run=submitit_local", "common.log_format=json", "common.log_interval=1", "task.min_sample_size=8000",
            "dataset.max_tokens=100000", "dataset.batch_size=1", "dataset.required_batch_size_multiple=1",
            "dataset.validate_interval=1000", "optimization.max_update=3"] + tiny_model_overrides()
    # The sweep's directories are named after its overrides (config/recipe/hubert.yaml); the tiny
    # model's long overrides would make names longer than a file name may be: left out, as a
    # user leaves out task.data.
    keys = [a.split("=", 1)[0].lstrip("+") for a in args]
    sweep_dir = str(root / "multirun")
    cmd = [os.path.join(BIN, "fairseq-hydra-train"), "-m", "--config-dir", "config/", "--config-name", "dicehubert_narrow"] + args + [
        f"hydra.sweep.dir={sweep_dir}", "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(keys) + "]",
        "model.mask_prob=0.65,0.8",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Submitit 'local' sweep output dir" in out
    runs = sorted(d for d in os.listdir(sweep_dir) if d.startswith("model."))
    assert runs == ["model.mask_prob-0.65", "model.mask_prob-0.8"]
    for run, mask_prob in zip(runs, (0.65, 0.8)):
        state = torch.load(os.path.join(sweep_dir, run, "checkpoints", "checkpoint_last.pt"), weights_only=True)
        assert state["optimizer_history"][-1]["num_updates"] == 3
        assert state["cfg"]["model"]["mask_prob"] == mask_prob
    # each run was a submitit job of its own: its own folder, its logs, its pickled result
    jobs = [d for d in os.listdir(os.path.join(sweep_dir, "submitit")) if d.isdigit()]
    assert len(jobs) == 2
    for job in jobs:
        files = os.listdir(os.path.join(sweep_dir, "submitit", job))
        assert f"{job}_0_result.pkl" in files and f"{job}_0_log.out" in files
        with open(os.path.join(sweep_dir, "submitit", job, f"{job}_0_log.out")) as f:
            assert "Job completed successfully" in f.read()


# ----------------------------------------------------------------------------- run=gpu without a GPU


def test_default_overlay_without_gpu_stops_in_one_line_before_building(launch_corpus, tmp_path):
    """The README's training command typed as is (default run=gpu) where torch sees no GPU."""
    run_dir = tmp_path / "run"
    cmd = [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", "config/", "--config-name", "dicehubert_narrow",
           "common.user_dir=dicehubert_fairseq", f"task.data={launch_corpus['data']}",
           f"task.label_dir={launch_corpus['labels']}",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dicehubert: this run trains on a GPU") and "add run=cpu" in last, last
    assert "Traceback" not in proc.stderr + proc.stdout
    # nothing was built: fairseq stopped at the task (no task, model or criterion logged, no checkpoint)
    out = proc.stdout + proc.stderr
    assert "'_name': 'dicehubert_student'" in out  # fairseq printed the config: it did start
    for built in ("task: DiceHubertTask", "model: DiceHubertStudent", "criterion: DiceHubertCriterion",
                  "num. shared model params"):
        assert built not in out, built
    assert not list(run_dir.glob("checkpoints/*.pt"))
