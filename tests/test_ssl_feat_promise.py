"""L_SSL + L_feat (criterion ``dicehubert_feat`` with ``ssl_weight > 0``), checked from outside.

* one student forward per batch serves both losses (the model is called once);
* ``sample_size`` is the number of masked, non-padded frames (L_SSL's, masked frames only);
* L_feat is recomputed here, independently of the criterion's code: the heads applied by hand
  to the layer states of *that masked forward*, the teacher's layers from fairseq's own
  ``HubertModel.extract_features`` on the unmasked waveform, and DistilHuBERT's
  L1 + lambda * (-log sigmoid(cos)) written out, averaged over real frames and target layers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.config import build, compose
from dicehubert_fairseq.testing import tiny_model_overrides, write_checkpoint, write_corpus, write_random_labels

DIM = 32
COS_WEIGHT, FEAT_WEIGHT, SSL_WEIGHT = 0.7, 0.5, 1.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sslfeat")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(0.7, 1.5), seed=51)
    write_random_labels(labels, sizes, "km", 20, 50, seed=51)
    teacher = str(root / "teacher.pt")
    write_checkpoint(teacher, data, labels, model_overrides={"encoder_layers": 12}, seed=52)
    return {"data": data, "labels": labels, "teacher": teacher}


def test_one_masked_forward_serves_both_losses(world):
    from fairseq import checkpoint_utils

    tiny = [o for o in tiny_model_overrides(dim=DIM) if not o.startswith("++model.encoder_layers=")]
    cfg = compose("ssl_feat_shallow_l6", [
        f"task.data={world['data']}", f"task.label_dir={world['labels']}", "run=cpu",
        f"criterion.teacher_checkpoint={world['teacher']}", f"++model.feat_teacher_dim={DIM}",
        "task.min_sample_size=8000", "task.pad_audio=true", "task.max_sample_size=40000",
        f"criterion.cos_weight={COS_WEIGHT}", f"criterion.feat_weight={FEAT_WEIGHT}",
        f"criterion.ssl_weight={SSL_WEIGHT}",
    ] + tiny)
    task, model, criterion = build(cfg)
    assert criterion.cfg.pred_nomask_weight == 0  # L_SSL on masked frames only (the recipe)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["net_input"]["padding_mask"].any(), "the test needs a padded batch"

    calls, outputs = [], []
    pre = model.register_forward_pre_hook(lambda _m, _args: calls.append(1))
    post = model.register_forward_hook(lambda _m, _args, out: outputs.append(out))
    model.eval()  # no dropout: the heads can be re-applied exactly
    try:
        with torch.no_grad():
            loss, sample_size, log = criterion(model, batch)
    finally:
        pre.remove()
        post.remove()
    assert len(calls) == 1, f"{len(calls)} student forwards for one batch"
    out = outputs[0]

    pad, masked = out["padding_mask"], out["mask_indices"]
    assert masked.any() and pad.any()
    assert sample_size == int((masked & ~pad).sum())

    # L_feat by hand: heads on the masked forward's layer states, teacher layers from fairseq
    states = out["layer_states"]
    teacher = checkpoint_utils.load_model_ensemble_and_task([world["teacher"]])[0][0].eval()
    src, src_pad = batch["net_input"]["source"], batch["net_input"]["padding_mask"]
    layers = list(model.feat_target_layers)
    assert layers == [4, 8, 12]
    real = ~pad
    per_layer = []
    with torch.no_grad():
        for head, k in zip(model.feat_heads, layers):
            pred = F.linear(states[-1], head.weight, head.bias).double()  # DistilHuBERT: heads on the last layer
            target, _ = teacher.extract_features(src, padding_mask=src_pad, mask=False, output_layer=k)
            T = min(pred.shape[1], target.shape[1])
            pred, target = pred[:, :T][real[:, :T]], target[:, :T].double()[real[:, :T]]
            l1 = (pred - target).abs().mean(-1).mean()
            cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
            term = -torch.log(torch.sigmoid(cos)).mean()
            per_layer.append((l1 + COS_WEIGHT * term).item())
            assert log[f"feat_loss_L{k}"] / log["feat_frames"] == pytest.approx(per_layer[-1], rel=1e-5)
    feat = sum(per_layer) / len(per_layer)
    assert log["feat_loss"] / log["feat_frames"] == pytest.approx(feat, rel=1e-5)
    ssl = log["loss_m_0"] + log.get("loss_features_pen", 0.0)
    assert loss.item() == pytest.approx(SSL_WEIGHT * ssl + FEAT_WEIGHT * feat * sample_size, rel=1e-5)
    assert math.isfinite(loss.item()) and FEAT_WEIGHT * feat * sample_size > 0.01 * loss.item()

    # the states were the masked forward's: an unmasked forward gives other states (and other L_feat)
    with torch.no_grad():
        unmasked, _ = model.extract_features(src, padding_mask=src_pad, mask=False)
    assert unmasked.shape == states[-1].shape
    assert not torch.allclose(unmasked[real], states[-1][real], atol=1e-4)
    # (and the masked frames are where they differ most: the mask embedding replaced their input)
    gap = (unmasked - states[-1]).abs().mean(-1)
    assert gap[masked & real].mean() > gap[~masked & real].mean()
