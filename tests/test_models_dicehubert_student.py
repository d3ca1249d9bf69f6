"""Model ``dicehubert_student``: init from a teacher (never its heads), masks reproducible from (seed, update)
alone, short padded rows, label rate vs frame rate, feature heads."""

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.errors import InputError
from tests.helpers.config import FEAT_DIM, FEAT_TINY, batch_of, build, compose, feat_cfg, tiny_student_cfg
from tests.helpers.data import tiny_model_overrides, write_checkpoint, write_random_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_init_from_teacher_copies_matching_tensors(corpus, tmp_path):
    data, labels, _ = corpus
    teacher = str(tmp_path / "t.pt")
    write_checkpoint(teacher, data, labels, model_overrides={"encoder_embed_dim": 32, "encoder_layers": 3})
    state = torch.load(teacher, weights_only=True)["model"]
    cfg = tiny_student_cfg(data, labels, [f"model.init_from_teacher={teacher}", "model.encoder_layers=2"])
    _, model, _ = build(cfg)
    sd = model.state_dict()
    for name in ("feature_extractor.conv_layers.0.0.weight", "encoder.layers.1.fc1.weight"):
        assert torch.equal(sd[name], state[name]), name
    assert not torch.equal(sd["label_embs_concat"][:5], state["label_embs_concat"][:5])
    # without the flag nothing is copied
    _, fresh, _ = build(tiny_student_cfg(data, labels, ["model.encoder_layers=2"]))
    assert not torch.equal(fresh.state_dict()["encoder.layers.1.fc1.weight"], state["encoder.layers.1.fc1.weight"])


def test_init_from_teacher_leaves_final_proj_even_when_shapes_match(corpus, tmp_path):
    """The teacher's pretraining heads (``final_proj``, label embeddings) are never copied, even
    from a teacher of the student's own architecture."""
    data, labels, _ = corpus
    teacher = str(tmp_path / "teacher.pt")
    write_checkpoint(teacher, data, labels, model="dicehubert_student", task="dicehubert",
                     model_overrides={"untie_final_proj": True})
    state = torch.load(teacher, weights_only=True)["model"]
    _, model, _ = build(tiny_student_cfg(data, labels, [f"model.init_from_teacher={teacher}"]))
    student = model.state_dict()
    assert set(student) == set(state)  # the same architecture: every tensor could be copied
    for key in ("final_proj.weight", "final_proj.bias", "label_embs_concat"):
        assert student[key].shape == state[key].shape and not torch.equal(student[key], state[key]), key
    copied = [k for k in student if torch.equal(student[k], state[k])]
    assert "feature_extractor.conv_layers.0.0.weight" in copied and "encoder.layers.1.fc1.weight" in copied
    assert not any(k.startswith(("final_proj", "label_embs_concat")) for k in copied)


def _masks(model, n_calls=1, B=3, T=60):
    x = torch.zeros(B, T, model.encoder.embedding_dim)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[2, 40:] = True
    return [model.apply_mask(x.clone(), pad, None)[1] for _ in range(n_calls)]


def test_masks_depend_on_seed_and_update_only(corpus):
    """Masks are a function of (``common.seed``, update number, forward within the update) alone,
    never of numpy's global RNG (which fairseq's prefetch thread shares), the same after a resume."""
    data, labels, _ = corpus
    _, model, _ = build(tiny_student_cfg(data, labels, ["common.seed=3"]))
    _, twin, _ = build(tiny_student_cfg(data, labels, ["common.seed=3"]))
    _, other_seed, _ = build(tiny_student_cfg(data, labels, ["common.seed=4"]))
    for m in (model, twin, other_seed):
        m.set_num_updates(7)
    np.random.seed(0)
    torch.manual_seed(0)
    first, second = _masks(model, 2)  # two forwards in one update (update_freq > 1)
    np.random.seed(99)
    torch.manual_seed(99)
    np.random.rand(5)
    # same seed, same update, same forward: same masks, whatever the global RNGs hold
    t_first, t_second = _masks(twin, 2)
    assert torch.equal(first, t_first) and torch.equal(second, t_second)
    assert not torch.equal(first, second)
    assert not torch.equal(first, _masks(other_seed)[0])
    # the next update draws new masks; a model resumed at update 8 draws the same as one that got there
    model.set_num_updates(8)
    eighth = _masks(model)[0]
    assert not torch.equal(first, eighth)
    twin.set_num_updates(8)
    assert torch.equal(eighth, _masks(twin)[0])
    # still HuBERT's masks: padding never masked, about mask_prob (0.8) * T / mask_length spans of 10 frames
    assert not first[2, 40:].any()
    assert 0.3 < first[:2].float().mean() < 0.9


def test_short_padded_rows_are_masked_without_stopping_the_run(corpus):
    """A padded row of one or two real frames: fairseq's compute_mask_indices covers all of it in
    about two draws in three and raises; the student draws again (deterministically), so no
    update stops training. A row of padding only still raises, naming the row."""
    data, labels, _ = corpus
    _, model, _ = build(tiny_student_cfg(data, labels))
    x = torch.zeros(3, 60, model.encoder.embedding_dim)
    pad = torch.zeros(3, 60, dtype=torch.bool)
    pad[1, 2:] = True  # two real frames
    pad[2, 1:] = True  # one
    masks = []
    for update in range(30):
        model.set_num_updates(update)
        m = model.apply_mask(x.clone(), pad, None)[1]
        assert not (m & pad).any() and (~m[1:] & ~pad[1:]).any(dim=1).all()  # a real frame left unmasked
        masks.append(m)
    model.set_num_updates(3)
    assert torch.equal(model.apply_mask(x.clone(), pad, None)[1], masks[3])  # redraws are deterministic
    pad[2] = True
    with pytest.raises(ValueError, match="the entire sequence is masked. sz=0.*index=2"):
        model.apply_mask(x.clone(), pad, None)


def test_checkpoint_without_task_seed_still_loads(corpus, tmp_path):
    """Checkpoints written before ``task.seed`` existed: the seed comes from their common.seed."""
    from fairseq import checkpoint_utils

    data, labels, _ = corpus
    path = str(tmp_path / "student.pt")
    write_checkpoint(path, data, labels, model="dicehubert_student", task="dicehubert")
    state = torch.load(path, weights_only=True)
    assert state["cfg"]["task"]["seed"] == state["cfg"]["common"]["seed"]
    del state["cfg"]["task"]["seed"]
    state["cfg"]["common"]["seed"] = 5
    torch.save(state, path)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    assert task.cfg.seed == 5 and models[0].seed == 5


@pytest.mark.parametrize("label_rate,conv,ok", [
    (50, None, True),                                   # k-means labels, 50 Hz student
    (100, None, True),                                  # HuBERT iteration 1: every other MFCC label
    (25, None, True),                                   # each label repeated twice
    (50, "'[(32,10,5)] + [(32,3,2)] * 4 + [(32,3,3)]'", False),  # 66.7 Hz student: ratio 0.75
    (40, None, False),                                  # ratio 0.8
])
def test_label_rate_must_fit_the_student_frame_rate(feat_world, label_rate, conv, ok):
    w = feat_world
    name = f"km{label_rate}"
    write_random_labels(w["labels"], w["sizes"], name, 20, label_rate)
    extra = [f"task.labels=[{name}]", f"task.label_rate={label_rate}"]
    if conv:
        extra.append(f"++model.conv_feature_layers={conv}")
    cfg = compose("dicehubert_narrow", [f"task.data={w['data']}", f"task.label_dir={w['labels']}"] + FEAT_TINY + extra)
    if ok:
        build(cfg)
        return
    with pytest.raises(InputError) as e:
        build(cfg)
    msg = str(e.value)
    assert f"task.label_rate={label_rate}" in msg and "expected an integer or 1/integer" in msg, msg


def test_ssl_forward_unchanged_by_the_feature_heads(feat_world):
    cfg = [f"task.data={feat_world['data']}", f"task.label_dir={feat_world['labels']}"] + FEAT_TINY
    task, plain, _ = build(compose("dicehubert_narrow", cfg))
    _, with_heads, _ = build(compose("dicehubert_narrow", cfg + ["++model.feat_target_layers=[4,8,12]"]))
    assert with_heads.load_state_dict(plain.state_dict(), strict=False).missing_keys == [
        f"feat_heads.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    batch = batch_of(task, 3)
    assert plain.feat_heads is None and not any(k.startswith("feat_heads") for k in plain.state_dict())
    fixed = {}

    def apply_mask(x, padding_mask, target_list):  # the same span mask for both models
        m = fixed.setdefault("m", torch.rand(x.shape[:2]) < 0.5)[:, : x.size(1)]
        x = x.clone()
        x[m] = plain.mask_emb
        return x, m

    outs = []
    for model in (plain, with_heads):
        model.eval()
        model.apply_mask = apply_mask
        outs.append(model(target_list=batch["target_list"], **batch["net_input"]))
    for key in ("logit_m_list", "logit_u_list", "target_m_list"):
        assert all(torch.equal(a, b) for a, b in zip(outs[0][key], outs[1][key]))
    assert "layer_states" not in outs[0] and len(outs[1]["layer_states"]) == 12 and len(outs[1]["feat_preds"]) == 3


@pytest.mark.parametrize("name,depth", [("feat_shallow_l6", 2), ("feat_shallow_l4", 3), ("ssl_feat_shallow_l6", 2)])
def test_distilhubert_rows_start_from_the_teachers_first_layers(feat_world, name, depth):
    """DistilHuBERT's initialisation, on by default in its rows (s3prl's distiller copies the conv
    front end, the positional convolution and the first ``encoder_layers`` teacher layers): every
    tensor of the front end and of encoder layers 1..depth equals the teacher's; the pretraining
    and distillation heads keep their own init; ``model.init_from_teacher=null`` turns it off."""
    w = feat_world
    cfg = feat_cfg(w, name)
    assert cfg.model.encoder_layers == depth and cfg.model.init_from_teacher == w["teacher"]
    teacher = torch.load(w["teacher"], weights_only=True)["model"]  # 12 layers
    _, model, _ = build(cfg)
    sd = model.state_dict()
    front = [n for n in sd if n.startswith(("feature_extractor.", "layer_norm.", "encoder.pos_conv."))]
    assert len(front) > 5
    for n in front:
        assert torch.equal(sd[n], teacher[n]), n
    for i in range(depth):
        layer = [n for n in sd if n.startswith(f"encoder.layers.{i}.")]
        assert len(layer) > 10 and all(torch.equal(sd[n], teacher[n]) for n in layer), i
    assert not any(n.startswith(f"encoder.layers.{depth}.") for n in sd)  # the student's depth, no more
    heads = [n for n in sd if n.startswith(("feat_heads.", "final_proj.", "label_embs_concat"))]
    assert any(n.startswith("feat_heads.") for n in heads)
    assert name.startswith("feat_") or "label_embs_concat" in heads  # L_SSL + L_feat: the label heads too
    for n in heads:  # never the teacher's (same name and shape for the label heads of the same stream)
        assert n not in teacher or teacher[n].shape != sd[n].shape or not torch.equal(sd[n], teacher[n]), n
    _, fresh, _ = build(feat_cfg(w, name, ["model.init_from_teacher=null"]))
    for n in ("feature_extractor.conv_layers.0.0.weight", "encoder.layers.0.fc1.weight"):
        assert not torch.equal(fresh.state_dict()[n], teacher[n]), n


def test_distilhubert_rows_have_its_prediction_heads(feat_world):
    """DistilHuBERT's heads are linear -> GELU -> linear at the student's width (s3prl's distiller:
    ``Linear(D, D * n)`` -> GELU -> ``SplitLinear``, one MLP per target layer); FitHuBERT's
    layer-to-layer projections are linear."""
    from torch import nn

    _, model, _ = build(feat_cfg(feat_world, "feat_shallow_l6"))
    assert len(model.feat_heads) == 3
    for head in model.feat_heads:
        assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[2].out_features) == (FEAT_DIM, FEAT_DIM, FEAT_DIM)  # student width, teacher dim
    _, linear, _ = build(feat_cfg(feat_world, "feat_shallow_l6", ["model.feat_head_hidden_dim=0"]))
    assert all(type(h) is nn.Linear for h in linear.feat_heads)
    _, narrow, _ = build(feat_cfg(feat_world, "feat_narrow"))
    assert len(narrow.feat_heads) == 12 and all(type(h) is nn.Linear for h in narrow.feat_heads)


@pytest.mark.parametrize("extra,fragment", [
    (["++model.mask_selection=uniform"], "model.mask_selection=uniform"),
    (["++model.no_mask_overlap=true"], "model.no_mask_overlap=true"),
    (["++model.mask_channel_prob=0.1", "++model.mask_channel_selection=uniform"],
     "model.mask_channel_selection=uniform"),
])
def test_span_masks_fairseq_cannot_draw_are_refused_when_built(corpus, extra, fragment):
    """fairseq's compute_mask_indices calls numpy's Generator.randint (and np.int) for these: an
    AttributeError at the first batch, hours into a job; refused when the model is built instead."""
    from fairseq.data.data_utils import compute_mask_indices

    data, labels, _ = corpus
    with pytest.raises(InputError, match="cannot draw") as e:
        build(tiny_student_cfg(data, labels, extra))
    assert fragment in str(e.value)
    with pytest.raises(AttributeError, match="randint|np.int"):  # what it guards against (fairseq's own function)
        compute_mask_indices((1, 100), None, 0.8, 10, "uniform" if "selection" in fragment else "static",
                             no_overlap="overlap" in fragment)
    # without masking they are never drawn: not refused
    build(tiny_student_cfg(data, labels, ["model.mask_prob=0.0", "++model.mask_selection=uniform"]))


def test_init_rows_stop_without_a_teacher(corpus):
    """``dicehubert_shallow_l6_init`` (init/teacher.yaml) without ``model.init_from_teacher``: the build stops
    with what to give, instead of training a randomly initialised student (``???`` there was dropped)."""
    data, labels, _ = corpus
    cfg = compose("dicehubert_shallow_l6_init", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu",
                                                  "task.min_sample_size=8000"] + tiny_model_overrides())
    with pytest.raises(InputError, match=r"give model.init_from_teacher=PATH"):
        build(cfg)
