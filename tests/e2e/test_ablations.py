"""Every experiment in config/ and every row of docs/ablations.md trains, for real, on CPU.

One parametrised test: each top-level config file (globbed, so new rows are covered without
editing this file) and each command line of the docs table, with its overlays, is composed
exactly as ``fairseq-hydra-train`` composes it, made tiny, and trained for 5 updates by
fairseq's own ``train.main`` in this process (a subprocess per row would spend most of its
time importing fairseq). Labels, soft labels and a 12-layer teacher are generated on demand
for whatever each row asks for.
"""

import glob
import os
import re
import shlex

import pytest
import torch
from omegaconf import OmegaConf

import dicehubert_fairseq  # noqa: F401
from fairseq import checkpoint_utils
from tests.helpers.config import CONFIG_DIR, build, compose
from tests.helpers.data import (
    tiny_model_overrides, write_checkpoint, write_corpus, write_random_labels, write_soft_labels,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "ablations.md")
EXPERIMENTS = sorted(os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
#: Placeholders of the docs' command lines.
PLACEHOLDERS = ("DATA", "LABELS", "TEACHER")
K = 20  # clusters of every generated label stream
TEACHER_LAYERS = 12
TINY_DIM = 32

pytestmark = pytest.mark.e2e


def doc_commands():
    """``(config name, overrides)`` of every command line in the docs table (placeholders kept)."""
    rows = []
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            m = re.search(r"`(fairseq-hydra-train [^`]+)`\s*\|\s*$", line)
            if not m:
                continue
            argv = shlex.split(m.group(1))
            name = argv[argv.index("--config-name") + 1]
            rest = argv[argv.index("--config-name") + 2:]
            rows.append((name, tuple(a for a in rest if not a.startswith("common.user_dir="))))
    return rows


def cases():
    """Every docs row, as typed there, then every experiment file the docs do not list."""
    found, seen = [], set()
    for name, overrides in doc_commands():
        extra = tuple(o for o in overrides if o.partition("=")[2] not in PLACEHOLDERS)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        found.append(pytest.param(name, overrides, True, id=" ".join((name,) + extra)))
    listed = {name for name, _ in seen}
    for name in EXPERIMENTS:
        if name not in listed:  # test_docs_table_lists_every_experiment fails for these too
            found.append(pytest.param(name, (), False, id=name))
    return found


# --------------------------------------------------------------------------- data on demand


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny corpus, a label directory filled on demand, and a 12-layer x 32 hubert teacher."""
    root = tmp_path_factory.mktemp("ablations")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 8, "valid": 2}, seconds=(0.6, 1.2), seed=1)
    write_random_labels(labels, sizes, "km", K, 50)
    teacher = str(root / "teacher.pt")
    write_checkpoint(teacher, data, labels, model_overrides={"encoder_layers": TEACHER_LAYERS})
    return {"root": root, "data": data, "labels": labels, "sizes": sizes, "teacher": teacher}


def ensure_labels(world, cfg):
    for i, name in enumerate(cfg.task.labels):
        soft = name in cfg.task.get("soft_labels", [])
        done = f"train.{name}.soft.json" if soft else f"dict.{name}.txt"
        if os.path.isfile(os.path.join(world["labels"], done)):
            continue
        if soft:
            write_soft_labels(world["labels"], world["sizes"], name, K, label_rate=cfg.task.label_rate, seed=i)
        else:
            write_random_labels(world["labels"], world["sizes"], name, K, cfg.task.label_rate, seed=i)


def is_missing(node, key):
    """True if ``node.key`` exists and is ``???`` (``key in node`` is False for those)."""
    return OmegaConf.is_missing(node, key)


def substitute(overrides, world):
    values = {"DATA": world["data"], "LABELS": world["labels"], "TEACHER": world["teacher"]}
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        out.append(f"{key}={values.get(value, value)}")
    return out


def tiny_config(name, overrides, world, run_dir, from_docs=True, updates=5):
    """The row's config made tiny, labels generated for what it reads.

    Two layers of 32 dims, unless the row maps student layers to teacher layers (then the
    preset's depth, so the mapping stays the row's). A docs row must give every path its config
    leaves at ``???``; an experiment missing from the docs gets them filled in.
    """
    base = [f"checkpoint.save_dir={run_dir}"] + substitute(overrides, world)
    probe = compose(name, base)
    if not from_docs:
        base += [f"task.data={world['data']}"]
        if probe.task.labels:
            base.append(f"task.label_dir={world['labels']}")
        for group, key in (("criterion", "teacher_checkpoint"), ("model", "init_from_teacher")):
            if is_missing(probe[group], key):
                base.append(f"{group}.{key}={world['teacher']}")
    mapped = list(probe.model.get("feat_student_layers") or [])
    layers = max(mapped) if mapped else min(probe.model.encoder_layers, 2)
    tiny = tiny_model_overrides(layers=layers, dim=TINY_DIM) + [
        "run=cpu", "common.log_interval=1", "common.seed=1",
        "task.min_sample_size=8000", "dataset.max_tokens=48000", "dataset.disable_validation=true",
        f"optimization.max_update={updates}", "lr_scheduler.warmup_updates=2",
    ]
    if "feat_teacher_dim" in probe.model:
        tiny.append(f"++model.feat_teacher_dim={TINY_DIM}")
    cfg = compose(name, base + tiny)
    for group, key in (("task", "data"), ("task", "label_dir"), ("criterion", "teacher_checkpoint"),
                       ("model", "init_from_teacher")):
        assert not is_missing(cfg[group], key), f"{name} {overrides}: {group}.{key} is ??? and not given"
    ensure_labels(world, cfg)
    return cfg


def train(cfg):
    """fairseq's training entry point (``fairseq_cli.train.main``), in this process.

    One torch thread: these models are tiny, and on a shared 2-core machine a second thread
    mostly spin-waits.
    """
    from fairseq import distributed_utils
    from fairseq_cli.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distributed_utils.call_main(cfg, main)
    finally:
        torch.set_num_threads(threads)
    return torch.load(os.path.join(cfg.checkpoint.save_dir, "checkpoint_last.pt"), weights_only=True)


@pytest.mark.parametrize("name,overrides,from_docs", cases())
def test_every_row_trains(name, overrides, from_docs, world, tmp_path):
    cfg = tiny_config(name, overrides, world, str(tmp_path / "ckpt"), from_docs)
    state = train(cfg)
    assert state["optimizer_history"][-1]["num_updates"] == 5
    assert state["cfg"]["model"]["_name"] == cfg.model._name
    # whatever the row, no teacher weights travel with the student
    assert state.get("criterion") is None  # fairseq saves a criterion only when it has parameters
    assert not any("teacher" in k for k in state["model"])
    if cfg.criterion._name == "dicehubert_feat":
        assert any(k.startswith("feat_heads.") for k in state["model"])


# --------------------------------------------------------------------------- the table itself


def other_experiments():
    """Config names listed under the docs' "Other experiment files" heading (not ablation rows)."""
    names, inside = set(), False
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                inside = line.strip() == "## Other experiment files"
            elif inside and line.startswith("* `"):
                names.add(line.split("`")[1])
    return names


def test_docs_table_lists_every_experiment():
    listed = {name for name, _ in doc_commands()} | other_experiments()
    missing = sorted(set(EXPERIMENTS) - listed)
    assert not missing, f"docs/ablations.md has no row for {missing} (nor lists it under 'Other experiment files')"


def test_trained_feat_checkpoint_holds_the_student_only_and_resumes(world, tmp_path):
    w = world
    overrides = ("task.data=DATA", "task.label_dir=LABELS", "criterion.teacher_checkpoint=TEACHER")
    cfg = tiny_config("ssl_feat_shallow_l6", overrides, w, str(tmp_path / "ckpt"), updates=5)
    state = train(cfg)
    _, fresh, _ = build(cfg)
    assert set(state["model"]) == set(fresh.state_dict())  # student + heads, nothing else
    assert state.get("criterion") is None
    teacher_sd = torch.load(w["teacher"], weights_only=True)["model"]
    assert len(teacher_sd) > len(state["model"])
    # the student reloads in this process like any fairseq checkpoint
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([os.path.join(cfg.checkpoint.save_dir,
                                                                               "checkpoint_last.pt")])
    assert models[0].feat_heads is not None and len(models[0].feat_heads) == 3
    # and training resumes from checkpoint_last.pt (the teacher is loaded again, not restored)
    resumed = train(tiny_config("ssl_feat_shallow_l6", overrides, w, str(tmp_path / "ckpt"), updates=7))
    assert resumed["optimizer_history"][-1]["num_updates"] == 7
