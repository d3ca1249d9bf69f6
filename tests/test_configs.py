"""config/: every experiment composes and builds with its preset's size (the Conformer's as docs/ablations.md
states it); overlays and label streams change only what they name; run overlays set hydra's launcher and the
device as fairseq expects them."""

import dataclasses
import os
import re

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import OmegaConf

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.models.dicehubert_student import INIT_FROM_TEACHER_REQUIRED
from dicehubert_fairseq.tasks.dicehubert import missing_gpu_message
from fairseq.dataclass.initialize import hydra_init
from tests.helpers.config import CONFIG_DIR, build, compose
from tests.helpers.data import write_corpus, write_random_labels


CORE_CONFIGS = ["dicehubert_narrow", "dicehubert_shallow_l6", "dicehubert_shallow_l4", "hubert_base_scratch",
                "dicehubert_narrow_small"]


PRESET_PARAMS = {
    "dicehubert_narrow": 26.87e6,
    "dicehubert_shallow_l6": 23.49e6,
    "dicehubert_shallow_l4": 30.58e6,
    "hubert_base_scratch": 94.37e6,  # HuBERT Base; 94.7M as usually quoted counts its heads for K = 500
    "dicehubert_narrow_small": 23.14e6,  # at or below L/6 (asserted below)
}


@pytest.fixture(scope="module")
def k100(tmp_path_factory):
    """A corpus with K=100 label dictionaries for 'km' and 'mfcc' (the paper's K; HuBERT's iteration 1)."""
    root = tmp_path_factory.mktemp("k100")
    sizes = write_corpus(str(root / "data"), {"train": 2, "valid": 2})
    write_random_labels(str(root / "labels"), sizes, "km", 100, 50)
    write_random_labels(str(root / "labels"), sizes, "mfcc", 100, 100)
    return str(root / "data"), str(root / "labels")


@pytest.mark.parametrize("name", CORE_CONFIGS)
def test_config_composes_builds_and_has_preset_size(name, k100):
    data, labels = k100
    cfg = compose(name, [f"task.data={data}", f"task.label_dir={labels}", "run=cpu"])
    # the paper's training setup
    assert cfg.task._name == "dicehubert" and cfg.criterion._name == "dicehubert"
    assert cfg.model.mask_prob == 0.8 and cfg.model.mask_length == 10
    assert cfg.optimization.lr == [0.0005] and cfg.optimization.max_update == 400000
    assert cfg.lr_scheduler.warmup_updates == 32000 and cfg.dataset.max_tokens == 1400000
    assert cfg.criterion.loss_weights == [10.0] and cfg.criterion.pred_nomask_weight == 0.0
    task, model, criterion = build(cfg)
    assert type(model).__name__ == "DiceHubertStudent"
    heads = ("label_embs_concat", "final_proj")  # the pretraining heads, whose size follows K
    n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(heads))
    assert abs(n - PRESET_PARAMS[name]) / PRESET_PARAMS[name] < 0.01, n
    if name == "dicehubert_narrow_small":  # a narrow student no larger than L/6 (DistilHuBERT's size)
        _, l6, _ = build(compose("dicehubert_shallow_l6", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu"]))
        n_l6 = sum(p.numel() for k, p in l6.named_parameters() if not k.startswith(heads))
        assert n <= n_l6 and model.encoder.embedding_dim == 384 and len(model.encoder.layers) == 12, (n, n_l6)


def _doc_millions(pattern):
    with open(os.path.join(os.path.dirname(CONFIG_DIR), "docs", "ablations.md"), encoding="utf-8") as f:
        m = re.search(pattern, f.read())
    assert m, pattern
    return float(m.group(1)) * 1e6


def test_conformer_parameter_count_as_documented(k100):
    data, labels = k100
    heads = ("label_embs_concat", "final_proj")
    counts = {}
    for name in ("dicehubert_conformer", "dicehubert_narrow"):
        _, model, _ = build(compose(name, [f"task.data={data}", f"task.label_dir={labels}", "run=cpu"]))
        counts[name] = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(heads))
    conformer = _doc_millions(r"conformer layers x 384 \(([\d.]+)M parameters")
    narrow = _doc_millions(r"\(\d+\.\dM parameters, narrow: ([\d.]+)M\)")
    assert abs(counts["dicehubert_conformer"] - conformer) <= 0.05e6, counts
    assert abs(counts["dicehubert_narrow"] - narrow) <= 0.05e6, counts


def test_run_overlays_compose(k100):
    data, labels = k100
    gpu = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}"])
    assert gpu.common.fp16 and gpu.optimization.update_freq == [32]
    cpu = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu"])
    assert cpu.common.cpu and not cpu.common.fp16
    slurm = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=slurm"])
    assert slurm.distributed_training.distributed_world_size == 32


def _diff(a, b):
    """``{group.key}`` whose values differ between two composed configs."""
    return {f"{g}.{k}" for g in ("task", "model", "criterion", "optimization", "dataset", "common")
            for k in set(a[g]) | set(b[g]) if a[g].get(k) != b[g].get(k)}


@pytest.mark.parametrize("name,overrides,expected", [
    ("dicehubert_narrow", ["task.labels=[it2_l6]"], {"task.labels": ["it2_l6"]}),
    ("dicehubert_narrow_soft", [], {"task.soft_labels": ["km"]}),
    ("dicehubert_narrow_soft", ["task.labels=[it2_l9_t5]"],
     {"task.labels": ["it2_l9_t5"], "task.soft_labels": ["it2_l9_t5"]}),
    ("dicehubert_narrow", ["+data=mfcc"], {"task.labels": ["mfcc"], "task.label_rate": 100, "model.label_rate": 100}),
    ("dicehubert_narrow_multilayer", [], {"task.labels": ["it2_l6", "it2_l9", "it2_l12"],
                                          "criterion.label_weights": [1.0, 1.0, 1.0]}),
])
def test_label_streams_and_data_overlays_change_only_what_they_name(name, overrides, expected):
    """A label stream is named by a task.labels override; data/ overlays change only their keys
    (data/soft.yaml: the streams of task.labels are soft)."""
    base = compose("dicehubert_narrow", ["task.data=D", "task.label_dir=L"])
    cfg = compose(name, ["task.data=D", "task.label_dir=L"] + overrides)
    assert _diff(base, cfg) == set(expected)
    for key, value in expected.items():
        group, _, field = key.partition(".")
        assert cfg[group][field] == value, key


#: The published recipe each L_feat row follows by default: (per-layer loss, starts from the
#: teacher, hidden width of the prediction heads; 0: linear). Layer-to-layer rows: FitHuBERT (MSE,
#: linear projections, random init); heads on the last layer: DistilHuBERT (L1 + 1 * cos, MLP heads
#: at the student's width, conv front end and first layers copied from the teacher).
FEAT_ROWS = {
    "feat_narrow": ("mse", False, 0),
    "ssl_feat_narrow": ("mse", False, 0),
    "feat_shallow_l6": ("l1_cos", True, 768),
    "feat_shallow_l4": ("l1_cos", True, 768),
    "ssl_feat_shallow_l6": ("l1_cos", True, 768),
    "ssl_feat_shallow_l4": ("l1_cos", True, 768),
}


def test_every_feat_row_is_checked_below():
    import glob
    import os

    from tests.helpers.config import CONFIG_DIR

    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*feat_*.yaml"))}
    assert names == set(FEAT_ROWS)


@pytest.mark.parametrize("name", sorted(FEAT_ROWS))
def test_feat_rows_follow_their_published_recipe(name):
    loss, init, hidden = FEAT_ROWS[name]
    paths = ["task.data=D", "task.label_dir=L", "criterion.teacher_checkpoint=TEACHER"]
    cfg = compose(name, paths)
    assert cfg.criterion._name == "dicehubert_feat"
    assert cfg.criterion.feat_loss == loss and cfg.criterion.cos_weight == 1.0
    assert cfg.model.init_from_teacher == ("TEACHER" if init else None)  # DistilHuBERT: the criterion's teacher
    assert cfg.model.feat_head_hidden_dim == hidden
    off = compose(name, paths + ["model.init_from_teacher=null", "criterion.feat_loss=l1_cos"])
    assert off.model.init_from_teacher is None and off.criterion.feat_loss == "l1_cos"


def test_tiny_feat_overlay_is_layer_to_layer_with_mse():
    """examples/tiny's feat_narrow (feat=tiny_layer_to_layer) is FitHuBERT-style like feat_narrow."""
    cfg = compose("feat_narrow", ["task.data=D", "criterion.teacher_checkpoint=T", "model=tiny_narrow",
                                  "feat=tiny_layer_to_layer"])
    assert cfg.criterion.feat_loss == "mse" and cfg.model.feat_head_hidden_dim == 0
    assert cfg.model.feat_student_layers == cfg.model.feat_target_layers == list(range(1, 13))
    assert cfg.model.init_from_teacher is None



@pytest.mark.parametrize("name,overrides,targets,sources,dim", [
    ("maskdistil_narrow", [], list(range(1, 13)), list(range(1, 13)), 768),
    ("maskdistil_shallow_l6", [], [6, 12], [1, 2], 768),
    # examples/tiny: the 12 x 96 tiny narrow student and the 12 x 192 tiny teacher
    ("maskdistil_narrow", ["model=tiny_narrow", "feat=tiny_mask_layer_to_layer"], list(range(1, 13)),
     list(range(1, 13)), 192),
])
def test_masking_distillation_rows_follow_maskhubert(name, overrides, targets, sources, dim):
    """MSE, masked student input with the recipe's spans (the DiceHuBERT rows' masks), per-frame weights
    1 and 1, the last layer 1 and every other 0.1, linear projections, random init, no labels."""
    cfg = compose(name, ["task.data=D", "criterion.teacher_checkpoint=T"] + overrides)
    base = compose("dicehubert_narrow", ["task.data=D", "task.label_dir=L"] + overrides[:1])
    c, m = cfg.criterion, cfg.model
    assert c._name == "dicehubert_feat" and c.mask_distil and c.ssl_weight == 0.0 and c.feat_loss == "mse"
    assert (c.masked_weight, c.unmasked_weight) == (1.0, 1.0)
    assert list(c.feat_layer_weights) == [0.1] * (len(targets) - 1) + [1.0]
    assert list(m.feat_target_layers) == targets and list(m.feat_student_layers) == sources
    assert m.feat_teacher_dim == dim and m.feat_head_hidden_dim == 0 and m.init_from_teacher is None
    assert list(cfg.task.labels) == [] and cfg.task.label_dir is None
    for key in ("mask_prob", "mask_length", "mask_selection", "no_mask_overlap"):
        assert m[key] == base.model[key], key



def fair_pairs():
    """``(L_feat row, L_SSL row, isolates)`` of docs/ablations.md's "Fair pairs" table, each row a
    ``(config, overrides)``."""
    rows, inside = [], False
    with open(os.path.join(os.path.dirname(CONFIG_DIR), "docs", "ablations.md"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                inside = line.strip() == "## Fair pairs: which comparisons isolate the loss"
            elif inside and line.startswith("| `"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                feat, ssl = (c.strip("`").split() for c in cells[:2])
                rows.append(((feat[0], feat[1:]), (ssl[0], ssl[1:]), cells[4].startswith("yes")))
    return rows


#: Model settings that are the L_feat heads' (or the initialisation's), not the student's.
NOT_THE_STUDENT = ("feat_target_layers", "feat_student_layers", "feat_teacher_dim", "feat_head_hidden_dim",
                   "init_from_teacher", "label_rate")


def test_fair_pairs_isolate_the_loss_where_the_table_says_so():
    """Same student (every model setting but the heads) and same initialisation exactly where the table
    says the pair isolates the loss; every L_feat row has such a pair, one of them the default."""
    paths = ["task.data=D", "task.label_dir=L", "criterion.teacher_checkpoint=T"]
    pairs = fair_pairs()
    assert len(pairs) >= 12
    isolated = set()
    for (feat, feat_ov), (ssl, ssl_ov), isolates in pairs:
        a = compose(feat, paths + feat_ov)
        b = compose(ssl, paths[:2] + ssl_ov)
        if b.model.init_from_teacher == INIT_FROM_TEACHER_REQUIRED:  # the *_init rows: a teacher on the line
            b = compose(ssl, paths[:2] + ssl_ov + ["model.init_from_teacher=T"])
        assert a.criterion._name == "dicehubert_feat" and b.criterion._name == "dicehubert", (feat, ssl)
        student = {k: v for k, v in a.model.items() if k not in NOT_THE_STUDENT}
        same_student = student == {k: v for k, v in b.model.items() if k not in NOT_THE_STUDENT}
        same_init = (a.model.init_from_teacher is None) == (b.model.init_from_teacher is None)
        assert same_student, (feat, ssl)
        assert (same_student and same_init) == isolates, (feat, feat_ov, ssl, a.model.init_from_teacher,
                                                          b.model.init_from_teacher)
        if isolates:
            isolated.add(feat)
    import glob

    # every row with a frozen teacher on the fly (an L_feat overlay in its defaults) has its pair
    feat_rows = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
                 if re.search(r"^  - feat: ", open(p).read(), re.M)}
    assert feat_rows and feat_rows == isolated


# ----------------------------------------------------------------------------- run overlays, as hydra launches them


def _with_hydra(run):
    """``dicehubert_narrow`` with ``run=<run>``, hydra's own settings included (its launcher), unresolved."""
    hydra_init("dicehubert_narrow")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose("dicehubert_narrow", overrides=[f"run={run}"], return_hydra_config=True)


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_slurm_overlay_is_the_local_launch_plus_slurm_fields():
    slurm, local = _with_hydra("slurm"), _with_hydra("submitit_local")
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
    cfg = _with_hydra("slurm")
    launcher, dist = cfg.hydra.launcher, cfg.distributed_training
    assert launcher.tasks_per_node == launcher.gpus_per_node == dist.nprocs_per_node
    assert launcher.nodes * launcher.tasks_per_node == dist.distributed_world_size == 32
    assert dist.distributed_port > 0 and not cfg.common.cpu
    local = _with_hydra("submitit_local")
    assert local.common.cpu and local.distributed_training.distributed_world_size == 1
    assert local.hydra.launcher.nodes == local.hydra.launcher.tasks_per_node == 1


def test_device_check_follows_common_cpu():
    """task.cpu is the run's common.cpu; only a GPU run on a machine without a GPU is stopped."""
    for run, cpu in (("cpu", True), ("cpu_torchrun", True), ("submitit_local", True), ("gpu", False), ("slurm", False)):
        cfg = _with_hydra(run)
        assert cfg.task.cpu is cpu is cfg.common.cpu, run
        assert (missing_gpu_message(cfg.task.cpu) == "") == (cpu or torch.cuda.is_available()), run
    assert missing_gpu_message(None) == ""  # a task config from elsewhere (an old checkpoint): not checked
