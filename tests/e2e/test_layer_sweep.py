"""The teacher-layer sweep of examples/librispeech: ``LAYERS="3 6 9 12"`` through 2_labels.sh, 3_train.sh
and 4_probe.sh, then examples/librispeech/layer_table.py.

* with stub CLIs that record their arguments: per layer its own k-means and label streams named after
  the layer (soft ones too; a single LAYER other than 9 no longer writes ``it2_l9_*``), the quality
  call with every layer's stream when alignments are given, one training line per layer that
  composes with the real configs (or one hydra sweep for a Slurm array), one probe per student and
  the table;
* the table script on hand-written inputs;
* (slow) the whole sweep for real on CPU: a tone corpus with frame alignments, a 12-layer random test
  teacher, labels of layers 3, 6, 9, 12, four students trained a few updates through hydra's submitit
  launcher (the Slurm array's code path, run here), probed, tabulated.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dicehubert_fairseq.labels.cli import build_parser as labels_parser
from dicehubert_fairseq.probe.cli import build_parser as probe_parser
from tests.helpers.config import compose
from tests.helpers.data import tiny_model_overrides, write_checkpoint
from tests.helpers.runs import REPO, install_stubs, subprocess_env
from tests.helpers.tones import write_tone_world

pytestmark = pytest.mark.e2e

LIBRI = os.path.join(REPO, "examples", "librispeech")
LAYERS = [3, 6, 9, 12]
TOOLS = ("dicehubert-labels", "fairseq-hydra-train", "dicehubert-probe")


def _run(script, args, env, ok=True):
    proc = subprocess.run(["bash", os.path.join(LIBRI, script)] + list(args), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, (script, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.fixture
def stubbed(tmp_path):
    """An environment with stub CLIs; ``calls()`` gives what they were called with (and empties the log)."""
    log = tmp_path / "calls.jsonl"
    env = subprocess_env(STUB_LOG=str(log), WORK=str(tmp_path / "work"), TEACHER=str(tmp_path / "teacher.pt"),
                         DEVICE="cpu", DTYPE="float32")
    env["PATH"] = install_stubs(tmp_path / "bin", TOOLS) + os.pathsep + env["PATH"]

    def calls():
        if not log.exists():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return rows

    return env, calls, tmp_path


def _labels(calls):
    return [(argv, labels_parser().parse_args(argv[1:])) for argv in calls if argv[0] == "dicehubert-labels"]


def test_labels_per_layer_named_after_layer_and_temperature(stubbed):
    env, calls, tmp = stubbed
    align = str(tmp / "valid.align")
    _run("2_labels.sh", [], dict(env, LAYERS=" ".join(map(str, LAYERS)), ALIGN=align))
    got = _labels(calls())
    fits = [ns for _, ns in got if ns.command == "fit" and not ns.mfcc]
    assert [(ns.layer, os.path.basename(ns.out)) for ns in fits] == [([L], f"l{L}_k100.joblib") for L in LAYERS]
    dumps = [ns for _, ns in got if ns.command == "dump" and not ns.mfcc]
    expected = {(f"it2_l{L}", split, None) for L in LAYERS for split in ("train", "valid")}
    expected |= {(f"it2_l{L}_t{t}", split, float(t))
                 for L in LAYERS for t in (1, 5, 10) for split in ("train", "valid")}
    assert {(ns.name, ns.split, ns.temperature if ns.soft else None) for ns in dumps} == expected
    for ns in dumps:  # every stream from its own layer's k-means, one process (CPU): no shards to merge
        layer = re.match(r"it2_l(\d+)", ns.name).group(1)
        assert ns.layer == [int(layer)] and os.path.basename(ns.km) == f"l{layer}_k100.joblib" and ns.nshard == 1
    assert not [ns for _, ns in got if ns.command == "merge"]
    check = next(ns for _, ns in got if ns.command == "check" and "mfcc" not in ns.labels)
    assert check.labels == [f"it2_l{L}" for L in LAYERS]
    (quality,) = [ns for _, ns in got if ns.command == "quality"]
    assert quality.labels == [f"it2_l{L}" for L in LAYERS] and quality.align == align and quality.split == "valid"
    assert quality.json.endswith("labels/quality_valid.json")


def test_one_layer_keeps_km_and_names_soft_streams_after_it(stubbed):
    """LAYER=6 alone: hard labels "km" (what every row reads), soft streams it2_l6_t* (not it2_l9_*);
    without ALIGN the quality stage says it is skipped."""
    env, calls, _ = stubbed
    proc = _run("2_labels.sh", [], dict(env, LAYER="6", STAGES="fit dump soft quality", TAUS="5"))
    assert "stage quality skipped: give ALIGN=" in proc.stderr
    names = {ns.name for _, ns in _labels(calls()) if ns.command == "dump"}
    assert names == {"km", "it2_l6_t5"}


def _compose_line(argv):
    """A recorded ``fairseq-hydra-train`` line, composed as fairseq-hydra-train would (hydra overrides aside)."""
    args = [a for a in argv[1:] if a != "-m"]
    assert args[:3] == ["--config-dir", "config/", "--config-name"], args
    return compose(args[3], [o for o in args[4:] if not o.startswith(("hydra.", "run="))])


def test_one_student_per_layer_locally_or_as_one_sweep(stubbed):
    env, calls, tmp = stubbed
    sweep = dict(env, LAYERS=" ".join(map(str, LAYERS)))
    _run("3_train.sh", ["dicehubert_narrow", "run=cpu"], sweep)
    lines = [c for c in calls() if c[0] == "fairseq-hydra-train"]
    assert len(lines) == len(LAYERS)
    for L, line in zip(LAYERS, lines):
        cfg = _compose_line(line)
        assert list(cfg.task.labels) == [f"it2_l{L}"] and cfg.task.label_dir.endswith("labels")
        assert f"hydra.run.dir={tmp}/work/runs/dicehubert_narrow_it2_l{L}" in line
    # the soft row: its layer's soft stream at TAU
    _run("3_train.sh", ["dicehubert_narrow_soft"], dict(sweep, TAU="5", LAYERS="6"))
    (line,) = calls()
    assert list(_compose_line(line).task.soft_labels) == ["it2_l6_t5"]
    # a Slurm array: one hydra sweep over the streams, one run directory per layer
    _run("3_train.sh", ["dicehubert_shallow_l6_init"], dict(sweep, LAUNCH="slurm"))
    (line,) = calls()
    assert "-m" in line and "run=slurm" in line
    assert "task.labels=" + ",".join(f"[it2_l{L}]" for L in LAYERS) in line
    assert "hydra.sweep.subdir=dicehubert_shallow_l6_init_${task.labels.0}" in line
    assert f"model.init_from_teacher={tmp}/teacher.pt" in line
    # a row without k-means labels has no layer to sweep
    proc = _run("3_train.sh", ["feat_narrow"], sweep, ok=False)
    assert proc.returncode == 2 and "reads none" in proc.stderr and not calls()


def test_probes_every_student_then_the_table(stubbed):
    env, calls, tmp = stubbed
    _run("4_probe.sh", ["dicehubert_narrow", "--epochs", "3"], dict(env, LAYERS=" ".join(map(str, LAYERS)),
                                                                     CKPT_NAME="checkpoint_last.pt"))
    probes = [probe_parser().parse_args(c[1:]) for c in calls() if c[0] == "dicehubert-probe"]
    assert [p.checkpoint for p in probes] == [
        f"{tmp}/work/runs/dicehubert_narrow_it2_l{L}/checkpoints/checkpoint_last.pt" for L in LAYERS]
    assert [p.json for p in probes] == [f"{tmp}/work/probe/dicehubert_narrow_it2_l{L}.json" for L in LAYERS]
    assert all(p.epochs == 3 and p.device == "cpu" for p in probes)
    table = (tmp / "work" / "probe" / "dicehubert_narrow_layers.md").read_text()
    assert table.count("| dicehubert_narrow_it2_l") == len(LAYERS)  # the stubs wrote nothing: '-' everywhere


def test_layer_table_from_quality_and_probe_results(tmp_path):
    sys.path.insert(0, LIBRI)
    try:
        import layer_table
    finally:
        sys.path.remove(LIBRI)
    quality = {"results": [{"name": "it2_l3", "phone_purity": 0.5, "cluster_purity": 0.25, "pnmi": 0.4},
                           {"name": "it2_l9", "phone_purity": 0.6, "cluster_purity": 0.3, "pnmi": 0.5}]}
    (tmp_path / "q.json").write_text(json.dumps(quality))
    (tmp_path / "row_it2_l9.json").write_text(json.dumps({"per": 0.125, "valid_per": 0.25}))
    rows = layer_table.layer_rows("row", [3, 9], 2, "", str(tmp_path / "q.json"), str(tmp_path))
    assert rows[0]["pnmi"] == 0.4 and rows[0]["per"] is None  # no probe result yet for layer 3
    assert rows[1]["pnmi"] == 0.5 and rows[1]["per"] == 0.125 and rows[1]["valid_per"] == 0.25
    lines = layer_table.markdown(rows).splitlines()
    assert lines[2] == "| 3 | it2_l3 | 0.5000 | 0.2500 | 0.4000 | row_it2_l3 | - | - |"
    assert lines[3] == "| 9 | it2_l9 | 0.6000 | 0.3000 | 0.5000 | row_it2_l9 | 0.1250 | 0.2500 |"


# ----------------------------------------------------------------------------- for real, on CPU


@pytest.mark.slow
def test_layer_sweep_end_to_end_on_cpu(tmp_path):
    """2_labels.sh (layers 3 and 12 of a random 12 x 32 test teacher, K = 8, quality against the tones'
    alignments), 3_train.sh as one sweep through hydra's submitit launcher (run=submitit_local, the
    code path of LAUNCH=slurm), 4_probe.sh and the table: every layer gets labels, a trained student,
    a probe PER and a quality row. (Two layers of the four: the same code paths in half the time.)"""
    layers = [3, 12]
    data = str(tmp_path / "data")
    world = write_tone_world(data, {"train": 24, "valid": 8, "test": 8}, seed=5, align_rate=100)
    teacher = str(tmp_path / "teacher.pt")
    write_checkpoint(teacher, data, world["labels"], model_overrides={"encoder_layers": 12}, seed=5)
    work = tmp_path / "work"
    env = subprocess_env(WORK=str(work), MANIFESTS=data, TEACHER=teacher, LAYERS=" ".join(map(str, layers)),
                         DEVICE="cpu", DTYPE="float32", K="8", PERCENT="1", STAGES="fit dump check quality",
                         ALIGN=os.path.join(data, "valid.align"))
    _run("2_labels.sh", [], env)
    labels = work / "labels"
    quality = json.loads((labels / "quality_valid.json").read_text())
    assert [r["name"] for r in quality["results"]] == [f"it2_l{L}" for L in layers]
    assert all(0 <= r["pnmi"] <= 1 and r["frames"] > 0 for r in quality["results"])

    tiny = tiny_model_overrides() + ["common.log_interval=1", "task.min_sample_size=4000", "dataset.max_tokens=64000",
                                     "dataset.disable_validation=true", "optimization.max_update=2",
                                     "lr_scheduler.warmup_updates=1"]
    # hydra names the sweep's jobs after their overrides: the long tiny ones left out of the names
    keys = ",".join(o.split("=", 1)[0].lstrip("+") for o in tiny)
    _run("3_train.sh", ["dicehubert_narrow"] + tiny + [f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"],
         dict(env, LAUNCH="submitit_local"))
    for L in layers:
        state = torch.load(work / "runs" / f"dicehubert_narrow_it2_l{L}" / "checkpoints" / "checkpoint_last.pt",
                           weights_only=True)
        assert state["cfg"]["task"]["labels"] == [f"it2_l{L}"]
        assert state["optimizer_history"][-1]["num_updates"] == 2

    _run("4_probe.sh", ["dicehubert_narrow", "--epochs", "2", "--threads", "1", "-q"],
         dict(env, PR_DATA=data, CKPT_NAME="checkpoint_last.pt"))
    table = (work / "probe" / "dicehubert_narrow_layers.md").read_text().splitlines()
    assert len(table) == 2 + len(layers)
    for L, line in zip(layers, table[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [str(L), f"it2_l{L}"] and "-" not in cells, line
        assert 0.0 <= float(cells[6]) <= 1.5  # a PER
