"""Every experiment in config/ and every row of docs/ablations.md trains, for real, on CPU.

One parametrised test: each top-level config file (globbed, so new rows are covered without
editing this file) and each command line of the docs table, with its overlays, is composed
exactly as ``fairseq-hydra-train`` composes it, made tiny, and trained for 5 updates by
fairseq's own ``train.main`` in this process (a subprocess per row would spend most of its
time importing fairseq). Labels, soft labels and a 12-layer teacher are generated on demand
for whatever each row asks for. Each row's task, model and criterion must also carry what the
row claims (:func:`row_claims`, from the row's name and command line alone): the encoder layer
class, the teacher's weights under init-from-teacher (never its ``final_proj``), the label
streams, soft targets in the batch and the model's output, the criterion's weights and heads.
"""

import glob
import os
import re
import shlex

import pytest
import torch
from omegaconf import OmegaConf

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.models.dicehubert_student import INIT_FROM_TEACHER_REQUIRED
from fairseq import checkpoint_utils
from tests.helpers.config import CONFIG_DIR, build, compose
from tests.helpers.data import (
    HUBERT_CONV, tiny_model_overrides, write_checkpoint, write_corpus, write_random_labels, write_soft_labels,
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
            write_soft_labels(world["labels"], world["sizes"], name, n_clusters=K, label_rate=cfg.task.label_rate,
                              seed=i, temperature=1.0)
        else:
            write_random_labels(world["labels"], world["sizes"], name, K, cfg.task.label_rate, seed=i)


def is_missing(node, key):
    """True if ``node.key`` exists and is ``???`` (``key in node`` is False for those), or is the
    placeholder ``init/teacher.yaml`` leaves until a teacher is given."""
    return OmegaConf.is_missing(node, key) or node.get(key) == INIT_FROM_TEACHER_REQUIRED


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
    tiny = tiny_model_overrides(layers=layers, dim=TINY_DIM)
    if probe.model.conv_feature_layers != HUBERT_CONV:  # the row's change is its conv front end: kept
        tiny = [o for o in tiny if not o.startswith("++model.conv_feature_layers=")]
    tiny = tiny + [
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
        # the published recipe the row follows, as the run saved it: layer-to-layer rows are
        # FitHuBERT (MSE, random init, linear projections), heads on the last layer DistilHuBERT
        # (L1 + cos with lambda 1, init from the criterion's teacher, MLP heads); the row's own
        # overrides may turn either off
        given = dict(o.partition("=")[::2] for o in overrides)
        saved_model, saved_crit = state["cfg"]["model"], state["cfg"]["criterion"]
        fithubert = bool(cfg.model.feat_student_layers)
        assert saved_crit["feat_loss"] == given.get("criterion.feat_loss", "mse" if fithubert else "l1_cos")
        assert saved_crit["cos_weight"] == 1.0
        init = None if fithubert or given.get("model.init_from_teacher") == "null" else world["teacher"]
        assert saved_model["init_from_teacher"] == init
        mlp = not fithubert and given.get("model.feat_head_hidden_dim") != "0"
        assert any(k.startswith("feat_heads.0.2.") for k in state["model"]) == mlp
    check_row_claims(name, overrides, cfg, world)


# --------------------------------------------------------------------------- what each row claims


def row_claims(name, overrides):
    """What a row changes, from its name and command line alone (the docs table's "What it
    changes"), so that a config file that silently lost its change fails the test."""
    ov = dict(o.split("=", 1) for o in overrides)
    mask_distil = name.startswith("maskdistil_")
    feat_only = name.startswith("feat_") or mask_distil
    multilayer = "multilayer" in name
    if feat_only:
        labels = []
    elif "task.labels" in ov:
        labels = ov["task.labels"].strip("[]").split(",")
    elif name in ("scratch_narrow", "hubert_base_scratch") or ov.get("+data") == "mfcc":
        labels = ["mfcc"]
    elif multilayer:
        labels = ["it2_l6", "it2_l9", "it2_l12"]
    else:
        labels = ["km"]
    weights = ov.get("criterion.label_weights")
    return {
        "conformer": name == "dicehubert_conformer",
        "conv": name == "dicehubert_conv_narrow",  # no attention anywhere
        # conv front-end channels: the rows that set their own keep them, the others get the tiny 32
        "front_end": {"dicehubert_narrow_small": 192, "tiny_teacher": 64}.get(name, 32),
        # DistilHuBERT's rows (heads on the last layer) initialise from the teacher by default
        "init": (name.endswith("_init") or "+init" in ov
                 or (name.startswith(("feat_shallow", "ssl_feat_shallow")) and ov.get("model.init_from_teacher") != "null")),
        "labels": labels,
        "label_rate": 100 if labels == ["mfcc"] else 50,
        "soft": name.endswith("_soft"),
        "label_weights": [float(w) for w in weights.strip("[]").split(",")] if weights else [1.0] * len(labels),
        "feat": name.startswith(("feat_", "ssl_feat_")) or mask_distil,
        "ssl": not feat_only,
        "feat_weight": float(ov.get("criterion.feat_weight", 1.0)),
        # (teacher layers, student layers reading them; None: the last layer for every head)
        "feat_layers": ((list(range(1, 13)), list(range(1, 13))) if name in ("feat_narrow", "ssl_feat_narrow",
                                                                             "maskdistil_narrow")
                        else ([6, 12], [1, 2]) if name == "maskdistil_shallow_l6" else ([4, 8, 12], None)),
        # masking distillation (MaskHuBERT): masked student input, layer weights 0.1 ... 1 summed
        "mask_distil": mask_distil,
    }


def check_row_claims(name, overrides, cfg, world):
    """The task, model and criterion built from the row's config carry what the row claims."""
    from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer
    from fairseq.modules import MultiheadAttention
    from fairseq.modules.conformer_layer import ConformerWav2Vec2EncoderLayer

    from dicehubert_fairseq.models._conv_encoder import ConvBlock

    claims = row_claims(name, overrides)
    task, model, criterion = build(cfg)
    # encoder layers
    layer_class = (ConformerWav2Vec2EncoderLayer if claims["conformer"] else ConvBlock if claims["conv"]
                   else TransformerSentenceEncoderLayer)
    assert {type(layer) for layer in model.encoder.layers} == {layer_class}, name
    assert any(isinstance(m, MultiheadAttention) for m in model.modules()) != claims["conv"], name
    assert {block[0].out_channels for block in model.feature_extractor.conv_layers} == {claims["front_end"]}, name
    # initialisation from the teacher: conv front end and first layer copied, heads never
    teacher = torch.load(world["teacher"], weights_only=True)["model"]
    student = model.state_dict()
    for key in ("feature_extractor.conv_layers.0.0.weight", "encoder.layers.0.fc1.weight"):
        same = key in student and student[key].shape == teacher[key].shape and torch.equal(student[key], teacher[key])
        assert same == claims["init"], (name, key)
    if claims["init"] and claims["ssl"]:
        assert student["final_proj.weight"].shape == teacher["final_proj.weight"].shape  # it could be copied,
        assert not torch.equal(student["final_proj.weight"], teacher["final_proj.weight"])  # but it is not
    # label streams (names, rate, soft), projections and weights
    assert list(task.cfg.labels) == claims["labels"], name
    assert list(task.cfg.soft_labels) == (claims["labels"] if claims["soft"] else []), name
    if claims["labels"]:
        assert task.cfg.label_rate == claims["label_rate"]
        # one projection per stream (every preset unties them, as fairseq's HuBERT Base recipe)
        assert model.untie_final_proj and len(model.num_classes) == len(claims["labels"])
        task.load_dataset("train")
        ds = task.datasets["train"]
        batch = ds.collater([ds[i] for i in range(2)])
        assert len(batch["target_list"]) == len(claims["labels"])
        soft = batch.get("soft_target_list") or [None] * len(claims["labels"])
        assert [s is not None for s in soft] == [claims["soft"]] * len(claims["labels"]), name
        model.eval()
        with torch.no_grad():
            out = model(target_list=batch["target_list"], soft_target_list=batch.get("soft_target_list"),
                        **batch["net_input"])
        assert len(out["logit_m_list"]) == len(claims["labels"])
        assert [s is not None for s in out["soft_m_list"]] == [claims["soft"]] * len(claims["labels"]), name
    # the criterion
    assert (cfg.criterion._name == "dicehubert_feat") == claims["feat"], name
    if claims["ssl"]:
        assert criterion.label_weights == claims["label_weights"], name
    if claims["feat"]:
        assert (criterion.cfg.ssl_weight > 0) == claims["ssl"], name
        assert criterion.cfg.feat_weight == claims["feat_weight"], name
        targets, sources = claims["feat_layers"]
        assert list(model.feat_target_layers) == targets, name
        assert model.feat_student_layers == (sources or [len(model.encoder.layers)] * len(targets)), name
        check_mask_distil(claims["mask_distil"], task, model, criterion)


def check_mask_distil(on, task, model, criterion):
    """Masking distillation reaches the loss: the student's input is masked, the masked teacher's
    and the clean teacher's terms are logged per layer, and the last layer weighs 10 times the others."""
    assert bool(criterion.cfg.mask_distil) == on
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(2)])
    inputs = criterion.model_inputs(batch)
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
        _, _, log = criterion.compute_loss(model, out, batch)
    last = criterion.target_layers[-1]
    assert out["mask_indices"].any() == (on or criterion.cfg.ssl_weight > 0)  # L_feat alone: clean input
    assert (f"feat_masked_L{last}" in log and f"feat_unmasked_L{last}" in log) == on
    if on:
        assert criterion.layer_weights[-1] == 1.0 and set(criterion.layer_weights[:-1]) == {0.1}


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
