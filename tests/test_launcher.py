"""The run overlays as launched: hydra's submitit launcher for real, run=slurm's settings, no GPU.

* ``run=submitit_local``: ``fairseq-hydra-train -m`` through hydra's submitit launcher (the
  code path of ``run=slurm``, with submitit's local executor): a two-value sweep gives two
  finished training runs under the sweep directory;
* ``run=slurm`` composes to the same launcher settings plus the Slurm fields, and its resources
  match fairseq's distributed settings (no Slurm here: composed, not launched);
* the default overlay ``run=gpu`` on a machine without a GPU stops in one line before anything
  is built (``task.cpu``, linked to ``common.cpu``, checked by the ``dicehubert`` task's setup).
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import dicehubert_fairseq  # noqa: F401  (torch.load allow-list for fairseq checkpoints)
from dicehubert_fairseq.testing import tiny_model_overrides, write_corpus, write_random_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CONFIG_DIR = os.path.join(REPO, "config")


def _env(**extra):
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 6, "valid": 2}, seconds=(0.8, 1.2), seed=31)
    write_random_labels(labels, sizes, "km", seed=31)
    return {"root": root, "data": data, "labels": labels}


def _compose(run):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fairseq.dataclass.initialize import hydra_init

    hydra_init("dicehubert_narrow")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("dicehubert_narrow", overrides=[f"run={run}"], return_hydra_config=True)


# ----------------------------------------------------------------------------- submitit, launched


def test_submitit_sweep_gives_two_finished_runs(corpus):
    root = corpus["root"]
    args = ["common.user_dir=dicehubert_fairseq", f"task.data={corpus['data']}", f"task.label_dir={corpus['labels']}",
            "run=submitit_local", "common.log_format=json", "common.log_interval=1", "task.min_sample_size=8000",
            "dataset.max_tokens=100000", "dataset.batch_size=1", "dataset.required_batch_size_multiple=1",
            "dataset.validate_interval=1000", "optimization.max_update=3"] + tiny_model_overrides()
    # The sweep's directories are named after its overrides (config/recipe/ssl.yaml); the tiny
    # model's long overrides would make names longer than a file name may be: left out, as a
    # user leaves out task.data.
    keys = [a.split("=", 1)[0].lstrip("+") for a in args]
    sweep_dir = str(root / "multirun")
    cmd = [os.path.join(BIN, "fairseq-hydra-train"), "-m", "--config-dir", "config/", "--config-name", "dicehubert_narrow"] + args + [
        f"hydra.sweep.dir={sweep_dir}", "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(keys) + "]",
        "model.mask_prob=0.65,0.8",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
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


# ----------------------------------------------------------------------------- run=slurm, composed


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_slurm_overlay_is_the_local_launch_plus_slurm_fields():
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    slurm, local = _compose("slurm"), _compose("submitit_local")
    assert slurm.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert local.hydra.runtime.choices["hydra/launcher"] == "submitit_local"
    s = OmegaConf.to_container(slurm.hydra.launcher, resolve=False)
    loc = OmegaConf.to_container(local.hydra.launcher, resolve=False)
    assert s.keys() - loc.keys() == _fields(SlurmQueueConf) - _fields(LocalQueueConf)
    assert loc.keys() <= s.keys()
    # the same job name, folders and limits; only the machine's resources differ
    for key in ("name", "submitit_folder", "timeout_min", "stderr_to_stdout"):
        assert s[key] == loc[key], key
    assert s["name"] == "${hydra.job.config_name}/${hydra.job.override_dirname}"
    # and the same sweep directory
    assert slurm.hydra.sweep == local.hydra.sweep


def test_slurm_resources_match_fairseqs_distributed_settings():
    """fairseq under Slurm (``_infer_slurm_init``) wants one task per GPU, world size = all tasks."""
    cfg = _compose("slurm")
    launcher, dist = cfg.hydra.launcher, cfg.distributed_training
    assert launcher.tasks_per_node == launcher.gpus_per_node == dist.nprocs_per_node
    assert launcher.nodes * launcher.tasks_per_node == dist.distributed_world_size == 32
    assert dist.distributed_port > 0 and not cfg.common.cpu
    local = _compose("submitit_local")
    assert local.common.cpu and local.distributed_training.distributed_world_size == 1
    assert local.hydra.launcher.nodes == local.hydra.launcher.tasks_per_node == 1


# ----------------------------------------------------------------------------- run=gpu without a GPU


def test_default_overlay_without_gpu_stops_in_one_line_before_building(corpus, tmp_path):
    """The README's training command typed as is (default run=gpu) where torch sees no GPU."""
    run_dir = tmp_path / "run"
    cmd = [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", "config/", "--config-name", "dicehubert_narrow",
           "common.user_dir=dicehubert_fairseq", f"task.data={corpus['data']}", f"task.label_dir={corpus['labels']}",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
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


def test_device_check_follows_common_cpu():
    """task.cpu is the run's common.cpu; only a GPU run on a machine without a GPU is stopped."""
    from dicehubert_fairseq.tasks.dicehubert import missing_gpu_message

    for run, cpu in (("cpu", True), ("cpu_torchrun", True), ("submitit_local", True), ("gpu", False), ("slurm", False)):
        cfg = _compose(run)
        assert cfg.task.cpu is cpu is cfg.common.cpu, run
        assert (missing_gpu_message(cfg.task.cpu) == "") == (cpu or torch.cuda.is_available()), run
    assert missing_gpu_message(None) == ""  # a task config from elsewhere (an old checkpoint): not checked
