"""The design card's command, for real: fairseq-hydra-train subprocesses on a tiny corpus."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.data import tiny_model_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.e2e


def _env():
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # must work without it
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return env


def hydra_train(data, labels, run_dir, *extra, user_dir="dicehubert_fairseq", config_dir="config/", cwd=REPO):
    cmd = [
        os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", config_dir, "--config-name", "dicehubert_narrow",
        f"common.user_dir={user_dir}", f"task.data={data}", f"task.label_dir={labels}",
        "run=cpu", "common.log_format=json", "common.log_interval=1", "common.seed=7",
        "task.min_sample_size=8000", "dataset.max_tokens=100000", "dataset.validate_interval=100",
        "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=4",
        f"hydra.run.dir={run_dir}",
    ] + tiny_model_overrides() + list(extra)
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def train_inner(log):
    rows = []
    for line in log.splitlines():
        if "[train_inner]" in line and " - {" in line:
            rows.append(json.loads(line.split(" - ", 1)[1]))
    return rows


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """24 updates with the design card's command, from the repo root, relative user dir."""
    run = tmp_path_factory.mktemp("train") / "run"
    log = hydra_train(tiny_corpus["data"], tiny_corpus["labels"], str(run), "optimization.max_update=24",
                      "checkpoint.save_interval_updates=12")
    return {"log": log, "run": str(run)}


def test_design_card_command_trains_and_loss_goes_down(trained):
    rows = train_inner(trained["log"])
    assert len(rows) >= 20
    assert int(rows[-1]["num_updates"]) == 24
    losses = [float(r["loss_m_0"]) for r in rows]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.3, losses
    # fairseq's hubert criterion's names: correct_m_0 is the accuracy, count_m_0 the masked frames
    assert 0 <= float(rows[-1]["correct_m_0"]) <= 1 and float(rows[-1]["count_m_0"]) > 1
    assert os.path.isfile(os.path.join(trained["run"], "checkpoints", "checkpoint_last.pt"))


RELOAD = r"""
import json, sys, torch
import dicehubert_fairseq
from fairseq import checkpoint_utils
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]])
m = models[0].eval()
x = torch.randn(1, 16000)
with torch.no_grad():
    feats, _ = m.extract_features(x, padding_mask=None, mask=False, output_layer=None)
print(json.dumps({"cls": type(m).__name__, "task": type(task).__name__, "shape": list(feats.shape),
                  "num_updates": torch.load(sys.argv[1], weights_only=True)["optimizer_history"][-1]["num_updates"]}))
"""


@pytest.mark.parametrize("which", ["checkpoint_last.pt", "checkpoint_best.pt"])
def test_checkpoint_reloads_in_fresh_process(trained, which, tmp_path):
    path = os.path.join(trained["run"], "checkpoints", which)
    proc = subprocess.run([sys.executable, "-c", RELOAD, path], cwd=str(tmp_path), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["cls"] == "DiceHubertStudent" and info["task"] == "DiceHubertTask"
    assert info["shape"][0] == 1 and info["shape"][2] == 32  # tiny embed dim
    assert info["num_updates"] == 24 or which == "checkpoint_best.pt"


def test_without_plugin_import_fairseq_refuses_the_checkpoint(trained, tmp_path):
    """The bug we fix: torch >= 2.6 refuses fairseq's pickled Dictionary unless allow-listed."""
    code = "import sys, torch; torch.load(sys.argv[1])"
    path = os.path.join(trained["run"], "checkpoints", "checkpoint_last.pt")
    proc = subprocess.run([sys.executable, "-c", code, path], env=_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "fairseq.data.dictionary.Dictionary" in proc.stderr


def test_resume_from_checkpoint_last(tiny_corpus, tmp_path):
    run = str(tmp_path / "run")
    first = hydra_train(tiny_corpus["data"], tiny_corpus["labels"], run, "optimization.max_update=6",
                        "checkpoint.save_interval_updates=3")
    assert int(train_inner(first)[-1]["num_updates"]) == 6
    second = hydra_train(tiny_corpus["data"], tiny_corpus["labels"], run, "optimization.max_update=10",
                         "checkpoint.save_interval_updates=3")
    assert "Loaded checkpoint" in second and "@ 6 updates" in second
    rows = train_inner(second)
    assert int(rows[0]["num_updates"]) == 7 and int(rows[-1]["num_updates"]) == 10


def test_absolute_user_dir_from_elsewhere(tiny_corpus, tmp_path):
    log = hydra_train(tiny_corpus["data"], tiny_corpus["labels"], str(tmp_path / "run"), "optimization.max_update=2",
                      user_dir=os.path.join(REPO, "dicehubert_fairseq"), config_dir=os.path.join(REPO, "config"),
                      cwd=str(tmp_path))
    assert int(train_inner(log)[-1]["num_updates"]) == 2


def test_bad_input_stops_before_training(tiny_corpus, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for name in os.listdir(tiny_corpus["labels"]):
        (labels / name).write_text(open(os.path.join(tiny_corpus["labels"], name)).read())
    lines = (labels / "train.km").read_text().splitlines()
    (labels / "train.km").write_text("\n".join(lines[:-2]) + "\n")
    cmd_ok = True
    try:
        hydra_train(tiny_corpus["data"], str(labels), str(tmp_path / "run"), "optimization.max_update=2")
    except AssertionError as e:
        cmd_ok = False
        msg = str(e)
    assert not cmd_ok
    assert f"{labels}/train.km: 6 lines, but" in msg and "8 utterances" in msg
    assert "begin training epoch" not in msg
    assert "Traceback" not in msg and "nothing was trained" in msg
