"""Plugin core: registration, presets, config composition, soft-label data path, task preflight."""

import os
import shutil

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.config import build, compose
from dicehubert_fairseq.data.files import SoftLabelWriter
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.testing import num_frames, write_corpus, write_random_labels

CORE_CONFIGS = ["dicehubert_narrow", "dicehubert_shallow_l6", "dicehubert_shallow_l4", "hubert_base_scratch"]

# "without the pretraining heads" sizes from the literature (12-L Half, DistilHuBERT, ...)
PRESET_PARAMS = {
    "dicehubert_narrow": 26.87e6,
    "dicehubert_shallow_l6": 23.49e6,
    "dicehubert_shallow_l4": 30.58e6,
    "hubert_base_scratch": 94.7e6,  # HuBERT Base *with* its heads for K=500, as usually quoted
}


def test_registration():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    from dicehubert_fairseq.criterions.dicehubert import DiceHubertCriterion
    from dicehubert_fairseq.models.dicehubert_student import DiceHubertStudent
    from dicehubert_fairseq.tasks.dicehubert import DiceHubertTask

    assert TASK_REGISTRY["dicehubert"] is DiceHubertTask
    assert MODEL_REGISTRY["dicehubert_student"] is DiceHubertStudent
    assert CRITERION_REGISTRY["dicehubert"] is DiceHubertCriterion
    # fairseq's own names stay fairseq's
    assert TASK_REGISTRY["hubert_pretraining"] is not DiceHubertTask
    assert MODEL_REGISTRY["hubert"] is not DiceHubertStudent


@pytest.fixture(scope="module")
def k500(tmp_path_factory):
    """A corpus with K=500 label dictionaries for 'km' and 'mfcc' (HuBERT Base's label count)."""
    root = tmp_path_factory.mktemp("k500")
    sizes = write_corpus(str(root / "data"), {"train": 2, "valid": 2})
    write_random_labels(str(root / "labels"), sizes, "km", 500, 50)
    write_random_labels(str(root / "labels"), sizes, "mfcc", 500, 100)
    return str(root / "data"), str(root / "labels")


@pytest.mark.parametrize("name", CORE_CONFIGS)
def test_config_composes_builds_and_has_preset_size(name, k500):
    data, labels = k500
    cfg = compose(name, [f"task.data={data}", f"task.label_dir={labels}", "run=cpu"])
    # the paper's training setup
    assert cfg.task._name == "dicehubert" and cfg.criterion._name == "dicehubert"
    assert cfg.model.mask_prob == 0.8 and cfg.model.mask_length == 10
    assert cfg.optimization.lr == [0.0005] and cfg.optimization.max_update == 400000
    assert cfg.lr_scheduler.warmup_updates == 32000 and cfg.dataset.max_tokens == 1400000
    assert cfg.criterion.loss_weights == [10.0] and cfg.criterion.pred_nomask_weight == 0.0
    task, model, criterion = build(cfg)
    assert type(model).__name__ == "DiceHubertStudent"
    heads = ("label_embs_concat", "final_proj") if name != "hubert_base_scratch" else ()
    n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(heads))
    assert abs(n - PRESET_PARAMS[name]) / PRESET_PARAMS[name] < 0.01, n


def test_run_overlays_compose(k500):
    data, labels = k500
    gpu = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}"])
    assert gpu.common.fp16 and gpu.optimization.update_freq == [32]
    cpu = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu"])
    assert cpu.common.cpu and not cpu.common.fp16
    slurm = compose("dicehubert_narrow", [f"task.data={data}", f"task.label_dir={labels}", "run=slurm"])
    assert slurm.distributed_training.distributed_world_size == 32


# --------------------------------------------------------------------------- data path


def _tiny_cfg(data, labels, extra=()):
    from dicehubert_fairseq.testing import tiny_model_overrides

    return compose(
        "dicehubert_narrow",
        [f"task.data={data}", f"task.label_dir={labels}", "run=cpu", "task.min_sample_size=8000",
         ] + tiny_model_overrides()
        + list(extra),
    )


@pytest.fixture
def corpus(tmp_path):
    sizes = write_corpus(str(tmp_path / "data"), {"train": 6, "valid": 2}, seed=3)
    write_random_labels(str(tmp_path / "labels"), sizes, "km", 12, 50, seed=3)
    return str(tmp_path / "data"), str(tmp_path / "labels"), sizes


def _write_soft(labels, sizes, name="km", k=3, K=12, seed=0):
    rng = np.random.default_rng(seed)
    for split, lens in sizes.items():
        w = SoftLabelWriter(labels, split, name, n_clusters=K, top_k=k, meta={"temperature": 5.0})
        hard_lines = []
        for size in lens:
            T = num_frames(size, 50)
            ids = np.stack([rng.permutation(K)[:k] for _ in range(T)])
            p = rng.dirichlet(np.ones(k), size=T)
            order = np.argsort(-p, axis=1)
            ids, p = np.take_along_axis(ids, order, 1), np.take_along_axis(p, order, 1)
            w.add(ids, p)
            hard_lines.append(" ".join(map(str, ids[:, 0])))
        w.close()
        with open(os.path.join(labels, f"{split}.{name}"), "w") as f:
            f.write("\n".join(hard_lines) + "\n")


def test_soft_labels_reach_the_criterion(corpus):
    data, labels, sizes = corpus
    _write_soft(labels, sizes)
    cfg = _tiny_cfg(data, labels, ["task.soft_labels=[km]"])
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(3)])
    hard = batch["target_list"][0]
    ids, probs = batch["soft_target_list"][0]
    d = task.dictionaries[0]
    valid = hard != d.pad()
    assert valid.any()
    assert ids.shape == hard.shape + (3,) and probs.shape == ids.shape
    # hard target = most likely soft class; probabilities sum to one on real frames, 0 on padding
    assert torch.equal(hard[valid], ids[valid][:, 0])
    np.testing.assert_allclose(probs[valid].sum(-1).numpy(), 1.0, atol=1e-5)
    assert (probs[~valid] == 0).all()
    # dictionary indices: cluster c is symbol str(c)
    assert {d[i] for i in ids[valid].flatten().tolist()} <= {str(c) for c in range(12)}
    model.train()
    loss, sample_size, log = criterion(model, batch)
    assert torch.isfinite(loss) and sample_size > 0 and "loss_m_0" in log
    loss.backward()
    assert model.label_embs_concat.grad.abs().sum() > 0


def test_hard_and_soft_streams_together(corpus):
    data, labels, sizes = corpus
    _write_soft(labels, sizes, name="kmsoft")
    shutil.copy(os.path.join(labels, "dict.km.txt"), os.path.join(labels, "dict.kmsoft.txt"))
    cfg = _tiny_cfg(data, labels, ["task.labels=[km,kmsoft]", "task.soft_labels=[kmsoft]",
                                   "model.untie_final_proj=true", "criterion.label_weights=[1.0,0.5]"])
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(2)])
    assert batch["soft_target_list"][0] is None and batch["soft_target_list"][1] is not None
    loss, _, log = criterion(model, batch)
    assert {"loss_m_0", "loss_m_1", "correct_m_0", "correct_m_1"} <= set(log)
    expected = log["loss_m_0"] + 0.5 * log["loss_m_1"] + log["loss_features_pen"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_labels_must_be_listed_in_labels(corpus):
    data, labels, _ = corpus
    with pytest.raises(InputError, match="soft_labels"):
        build(_tiny_cfg(data, labels, ["task.soft_labels=[nope]"]))


def test_init_from_teacher_copies_matching_tensors(corpus, tmp_path):
    from dicehubert_fairseq.testing import write_checkpoint

    data, labels, _ = corpus
    teacher = str(tmp_path / "t.pt")
    write_checkpoint(teacher, data, labels, model_overrides={"encoder_embed_dim": 32, "encoder_layers": 3})
    state = torch.load(teacher, weights_only=True)["model"]
    cfg = _tiny_cfg(data, labels, [f"model.init_from_teacher={teacher}", "model.encoder_layers=2"])
    _, model, _ = build(cfg)
    sd = model.state_dict()
    for name in ("feature_extractor.conv_layers.0.0.weight", "encoder.layers.1.fc1.weight"):
        assert torch.equal(sd[name], state[name]), name
    assert not torch.equal(sd["label_embs_concat"][:5], state["label_embs_concat"][:5])
    # without the flag nothing is copied
    _, fresh, _ = build(_tiny_cfg(data, labels, ["model.encoder_layers=2"]))
    assert not torch.equal(fresh.state_dict()["encoder.layers.1.fc1.weight"], state["encoder.layers.1.fc1.weight"])


# --------------------------------------------------------------------------- preflight


def _load(data, labels, extra=()):
    task, _, _ = build(_tiny_cfg(data, labels, extra))
    task.load_dataset("train")


def _expect(data, labels, *fragments, extra=()):
    with pytest.raises(InputError) as e:
        _load(data, labels, extra)
    for frag in fragments:
        assert frag in str(e.value), str(e.value)


def test_preflight_accepts_good_data(corpus):
    data, labels, _ = corpus
    _load(data, labels)


def test_preflight_label_line_count(corpus):
    data, labels, _ = corpus
    path = os.path.join(labels, "train.km")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-1]) + "\n")
    _expect(data, labels, path, "5 lines", "6 utterances")


def test_preflight_label_length(corpus):
    data, labels, _ = corpus
    path = os.path.join(labels, "train.km")
    lines = open(path).read().splitlines()
    lines[2] = lines[2] + " 1" * 40
    open(path, "w").write("\n".join(lines) + "\n")
    _expect(data, labels, f"{path}:3:", "label_rate 50")


def test_preflight_label_not_in_dictionary(corpus):
    data, labels, _ = corpus
    path = os.path.join(labels, "train.km")
    lines = open(path).read().splitlines()
    toks = lines[1].split()
    toks[0] = "12"  # K=12: ids 0..11
    lines[1] = " ".join(toks)
    open(path, "w").write("\n".join(lines) + "\n")
    _expect(data, labels, f"{path}:2:", "'12'", "dict.km.txt")


@pytest.mark.parametrize("content,fragment", [(None, "not found"), ("", "empty"), ("0 1\n0 1\n", "duplicate")])
def test_preflight_dictionary(corpus, content, fragment):
    data, labels, _ = corpus
    path = os.path.join(labels, "dict.km.txt")
    if content is None:
        os.unlink(path)
    else:
        open(path, "w").write(content)
    _expect(data, labels, path, fragment)


def test_preflight_missing_audio(corpus):
    data, labels, _ = corpus
    os.unlink(os.path.join(data, "wav", "train_0003.wav"))
    _expect(data, labels, "train.tsv:5:", "train_0003.wav not found")


def test_preflight_missing_dirs(corpus, tmp_path):
    data, labels, _ = corpus
    _expect(str(tmp_path / "nope"), labels, "task.data=", "not found")
    with pytest.raises(InputError, match="task.label_dir"):
        _load(data, str(tmp_path / "nolabels"))


def test_preflight_reports_every_problem(corpus):
    data, labels, _ = corpus
    os.unlink(os.path.join(data, "wav", "train_0001.wav"))
    os.unlink(os.path.join(data, "wav", "train_0004.wav"))
    with pytest.raises(InputError) as e:
        _load(data, labels)
    assert "train_0001.wav" in str(e.value) and "train_0004.wav" in str(e.value)


# --------------------------------------------------------------------------- torch.load allow-list


def test_allow_list_covers_fairseq_checkpoint_contents(tmp_path):
    import argparse

    from fairseq.data import Dictionary

    d = Dictionary()
    d.add_symbol("0")
    state = {"args": argparse.Namespace(arch="hubert", lr=[0.0005]), "task_state": {"dictionaries": [d]},
             "extra_state": {"val_loss": np.float64(1.5), "best": np.float32(2.0), "arr": np.arange(3)}}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["args"].arch == "hubert" and loaded["task_state"]["dictionaries"][0].index("0") == 4
    assert float(loaded["extra_state"]["val_loss"]) == 1.5
    assert loaded["extra_state"]["arr"].tolist() == [0, 1, 2]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_allow_list_still_refuses_arbitrary_code(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    from dicehubert_fairseq.checkpoint import load_state

    with pytest.raises(InputError, match="cannot be loaded safely"):
        load_state(str(path))
