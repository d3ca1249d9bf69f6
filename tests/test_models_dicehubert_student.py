"""Model ``dicehubert_student``: init from a teacher, reproducible masks, label rate vs frame rate, feature heads."""

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.errors import InputError
from tests.helpers.config import FEAT_TINY, batch_of, build, compose, tiny_student_cfg
from tests.helpers.data import write_checkpoint, write_random_labels

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


def test_masks_follow_the_numpy_seed(corpus):
    """fairseq's compute_mask_indices uses OS entropy unless seeded; our student is reproducible."""
    data, labels, _ = corpus
    _, model, _ = build(tiny_student_cfg(data, labels))
    x = torch.zeros(3, 50, 32)
    pad = torch.zeros(3, 50, dtype=torch.bool)
    pad[2, 30:] = True

    def masks(seed):
        np.random.seed(seed)
        return model.apply_mask(x.clone(), pad, None)[1]

    a, b, c = masks(5), masks(5), masks(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not a[2, 30:].any()  # padding never masked
    # about mask_prob (0.8) * T / mask_length spans of 10 frames: a large share of frames
    assert 0.3 < a[:2].float().mean() < 0.9


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
