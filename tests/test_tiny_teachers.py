"""examples/tiny's pretrained teachers: the committed checkpoints load and match their checksums;
a corrupt or missing one stops ``run.sh`` before any work, with a message naming the file."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dicehubert_fairseq.checkpoint import load_model
from tests.helpers.data import write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "examples", "tiny")
SHIPPED = os.path.join(TINY, "teachers")
NAMES = ("teacher_n1", "teacher_n2")


def run(*cmd, **env):
    full = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for k in [k for k in full if k.startswith("TINY_")]:
        full.pop(k)
    full.update(env)
    return subprocess.run(list(cmd), cwd=REPO, env=full, capture_output=True, text=True, timeout=600)


def test_shipped_teachers_match_their_checksums_and_load():
    proc = run(sys.executable, os.path.join(TINY, "teachers.py"), "verify")
    assert proc.returncode == 0, proc.stderr
    assert "checksums match" in proc.stdout
    with open(os.path.join(SHIPPED, "teachers.json")) as f:
        info = json.load(f)
    total = 0
    for name in NAMES:
        path = os.path.join(SHIPPED, f"{name}.pt")
        total += os.path.getsize(path)
        with open(path + ".sha256") as f:
            digest = f.read().split()[0]
        assert digest == info["teachers"][name]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        model, cfg = load_model(path)  # fairseq's own `hubert`, weights stored in float16
        assert cfg.model._name == "hubert" and len(model.encoder.layers) == info["teachers"][name]["layers"] == 12
        assert model.encoder.layers[0].self_attn.k_proj.weight.shape == (192, 192)
        t = info["teachers"][name]
        assert 1 <= t["best_transformer_layer"] <= 12 and len(t["layers_on_tune_valid"]) == 13
        assert t["curve"] and all(0 <= p["masked_acc"] <= 1 for p in t["curve"])
    assert total <= 25e6  # the bound on what the teachers add to the repository


@pytest.fixture
def fake_teachers(tmp_path, tiny_teacher):
    """A teachers directory of two small checkpoints with their checksums."""
    d = tmp_path / "teachers"
    d.mkdir()
    for name in NAMES:
        shutil.copy(tiny_teacher, d / f"{name}.pt")
        digest = hashlib.sha256((d / f"{name}.pt").read_bytes()).hexdigest()
        (d / f"{name}.pt.sha256").write_text(f"{digest}  {name}.pt\n")
    (d / "teachers.json").write_text(json.dumps({"teachers": {n: {"best_transformer_layer": 1} for n in NAMES}}))
    return d


def test_verify_accepts_intact_teachers(fake_teachers):
    proc = run(sys.executable, os.path.join(TINY, "teachers.py"), "verify", "--dir", str(fake_teachers))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("damage", ["flip a byte", "delete the checkpoint", "delete the checksum"])
def test_a_damaged_teacher_stops_the_run_before_any_work(tmp_path, fake_teachers, damage):
    path = fake_teachers / "teacher_n2.pt"
    if damage == "flip a byte":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01
        path.write_bytes(bytes(data))
        expected = f"{path}: SHA-256 "
    elif damage == "delete the checkpoint":
        path.unlink()
        expected = f"{path}: missing"
    else:
        (fake_teachers / "teacher_n2.pt.sha256").unlink()
        expected = f"{path}.sha256: missing"
    work = tmp_path / "work"
    proc = run("bash", os.path.join(TINY, "run.sh"), str(work), TINY_TEACHER_DIR=str(fake_teachers))
    assert proc.returncode == 1
    assert expected in proc.stderr and "TINY_TEACHER=train" in proc.stderr, proc.stderr
    assert not (work / "train.tsv").exists() and not (work / "models").exists()  # nothing synthesised or trained


def test_a_changed_teacher_fails_every_load_too(fake_teachers, tiny_corpus):
    """Past run.sh: dicehubert-labels (any loader) checks the checksum file beside the checkpoint."""
    path = fake_teachers / "teacher_n1.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    proc = run(os.path.join(os.path.dirname(sys.executable), "dicehubert-labels"), "fit", "--manifest-dir",
               tiny_corpus["data"], "--split", "train", "--checkpoint", str(path), "--layer", "1", "--n-clusters", "2",
               "--out", str(fake_teachers / "km.joblib"))
    assert proc.returncode == 1 and f"{path}: SHA-256 " in proc.stderr, proc.stderr


def test_pack_writes_fp16_teachers_their_checksums_and_the_record(tmp_path, tiny_teacher):
    """``teachers.py pack`` on a finished train_teachers.sh WORKDIR (the layout its stages write):
    fp16 fairseq checkpoints that verify and load, teachers.json with the curves, targets' K, layers
    and times, and the README generated from it."""
    w = tmp_path / "work"
    for name, labels, k in (("teacher_n1", "mfcc", 7), ("teacher_n2", "it1", 9)):
        (w / name / "checkpoints").mkdir(parents=True)
        shutil.copy(tiny_teacher, w / name / "checkpoints" / "checkpoint_last.pt")
        (w / "labels" / labels).mkdir(parents=True)
        (w / "labels" / labels / f"dict.{labels}.txt").write_text("".join(f"{i} 1\n" for i in range(k)))
        (w / "probe").mkdir(exist_ok=True)
        rows = [{"layer": 0, "valid_per": 0.9, "per": 0.9}, {"layer": 1, "valid_per": 0.7, "per": 0.71, "pnmi": 0.3},
                {"layer": 2, "valid_per": 0.6, "per": 0.62, "pnmi": 0.35}]
        (w / "probe" / f"{name}.layers.json").write_text(json.dumps(
            {"layers": rows, "best_layer": 2, "best_transformer_layer": 2}))
        (w / "logs").mkdir(exist_ok=True)
        (w / "logs" / f"{name}.log").write_text("".join(
            f"[2026-12-06 20:00:00,000][train_inner][INFO] - epoch 001: loss={9 - u / 1000}, correct_m_0={u / 1e4}, "
            f"correct_u_0={u / 2e4}, loss_m_0={9 - u / 1000}, num_updates={u}, lr=0.0005\n" for u in (1000, 2000)))
        (w / ".done").mkdir(exist_ok=True)
        (w / ".done" / name).write_text("123\n")
    out = tmp_path / "shipped"
    proc = run(sys.executable, os.path.join(TINY, "teachers.py"), "pack", str(w), "--dir", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = run(sys.executable, os.path.join(TINY, "teachers.py"), "verify", "--dir", str(out))
    assert proc.returncode == 0 and "checksums match" in proc.stdout, proc.stderr
    info = json.loads((out / "teachers.json").read_text())
    for name, k in (("teacher_n1", 7), ("teacher_n2", 9)):
        t = info["teachers"][name]
        assert t["target_clusters"] == k and t["train_seconds"] == 123 and t["best_transformer_layer"] == 2
        assert [p["update"] for p in t["curve"]] == [1000, 2000] and t["curve"][1]["masked_acc"] == pytest.approx(0.2)
        assert [r["layer"] for r in t["layers_on_tune_valid"]] == [0, 1, 2]
        path = out / f"{name}.pt"
        assert t["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        model, cfg = load_model(str(path))
        assert cfg.model._name == "hubert" and os.path.basename(cfg.task.data) == cfg.task.data
        state = torch.load(str(path), weights_only=False)
        assert all(v.dtype == torch.float16 for v in state["model"].values() if v.is_floating_point())
    readme = (out / "README.md").read_text()
    assert "K=7" in readme and "K=9" in readme and "| 2000 | 0.200 | 0.100 | 0.200 | 0.100 |" in readme
