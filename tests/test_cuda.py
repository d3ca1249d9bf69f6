"""The CUDA path: teacher features and labels in fp16, student updates under fairseq's fp16 and
AMP, the L_feat teacher and the probe on a GPU.

Every test here is marked ``cuda`` and skipped on a machine without CUDA (CI has none);
``benchmarks/gpu/run.sh`` runs them on a GPU machine (``pytest -m cuda tests/test_cuda.py``).
Comparisons against the CPU are made in float32 with TF32 off (the ``exact_fp32`` fixture), so
that "equal" means equal up to float32 rounding; fp16 is compared by cosine and label agreement.
"""

import math
import os

import numpy as np
import pytest
import torch

from dicehubert_fairseq.data.audio import read_audio
from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.labels.cli import main as labels_main
from dicehubert_fairseq.labels.teacher import TeacherFeatureReader
from tests.helpers.config import batch_of, build, feat_cfg, tiny_student_cfg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (benchmarks/gpu/run.sh runs these on a GPU machine)"),
]

#: dropout off, so that two precisions see the same network on the same batch and masks
NO_DROPOUT = ["++model.dropout=0.0", "++model.attention_dropout=0.0", "++model.activation_dropout=0.0",
              "++model.dropout_input=0.0", "++model.dropout_features=0.0"]
#: a learning rate that moves a tiny student in a few updates (the recipe warms up over 32k)
FAST_LR = ["optimization.lr=[0.002]", "lr_scheduler.warmup_updates=2"]


@pytest.fixture
def exact_fp32():
    """float32 on the GPU without TF32 (cuDNN convolutions use TF32 by default)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.fixture(scope="module")
def utts(tiny_corpus):
    m = read_manifest(os.path.join(tiny_corpus["data"], "train.tsv"))
    return m, [read_audio(m, i) for i in range(len(m))]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame cosine similarity of two ``(T, D)`` arrays."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


# ------------------------------------------------------------------------ teacher features


@pytest.mark.parametrize("layer", [1, 2])
def test_teacher_features_cuda_fp32_equal_cpu(tiny_teacher, utts, layer, exact_fp32):
    _, wavs = utts
    cpu = TeacherFeatureReader(tiny_teacher, layer).features(wavs)  # one batch of 8 lengths
    reader = TeacherFeatureReader(tiny_teacher, layer, device="cuda")
    assert next(reader.model.parameters()).is_cuda
    gpu = reader.features(wavs)
    for c, g in zip(cpu, gpu):
        assert g.shape == c.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, c, atol=1e-4, rtol=1e-3)


def test_teacher_features_cuda_fp16_close_to_cpu_fp32(tiny_teacher, utts):
    _, wavs = utts
    cpu = TeacherFeatureReader(tiny_teacher, 2).features(wavs)
    reader = TeacherFeatureReader(tiny_teacher, 2, device="cuda", dtype="float16")
    assert {p.dtype for p in reader.model.parameters()} == {torch.float16}  # the model runs in half
    gpu = reader.features(wavs)
    cos = np.concatenate([_cosines(g.astype(np.float64), c.astype(np.float64)) for c, g in zip(cpu, gpu)])
    for c, g in zip(cpu, gpu):
        assert g.shape == c.shape and g.dtype == np.float32 and np.isfinite(g).all()
    assert cos.min() > 0.995 and cos.mean() > 0.9995, (cos.min(), cos.mean())
    # and not bit-identical: the comparison above would pass trivially if fp16 were ignored
    assert max(float(np.abs(g - c).max()) for c, g in zip(cpu, gpu)) > 0


def _labels(path):
    with open(path) as f:
        return [list(map(int, line.split())) for line in f]


def test_labels_cli_cuda_fp16_agree_with_cpu_fp32(tiny_corpus, tiny_teacher, tmp_path):
    """dicehubert-labels fit + dump --device cuda --dtype float16: the same frames as on the CPU
    in float32 and (with the same k-means model) nearly all the same labels."""
    data = tiny_corpus["data"]
    src = ["--manifest-dir", data, "--checkpoint", tiny_teacher, "--layer", "2", "--no-progress"]
    fit = ["fit", *src, "--split", "train", "--n-clusters", "8", "--seed", "0"]
    gpu = ["--device", "cuda", "--dtype", "float16"]
    assert labels_main(fit + ["--out", str(tmp_path / "cpu.joblib")]) == 0
    assert labels_main(fit + gpu + ["--out", str(tmp_path / "gpu.joblib")]) == 0
    for split in ("train", "valid"):
        dump = ["dump", *src, "--split", split, "--km", str(tmp_path / "cpu.joblib")]
        assert labels_main(dump + ["--label-dir", str(tmp_path / "cpu_lab")]) == 0
        assert labels_main(dump + gpu + ["--label-dir", str(tmp_path / "gpu_lab")]) == 0
        cpu, gpu_lab = _labels(tmp_path / "cpu_lab" / f"{split}.km"), _labels(tmp_path / "gpu_lab" / f"{split}.km")
        assert [len(x) for x in gpu_lab] == [len(x) for x in cpu] and len(cpu) == len(tiny_corpus["sizes"][split])
        a, b = np.concatenate(cpu), np.concatenate(gpu_lab)
        assert (a == b).mean() >= 0.95, (a == b).mean()
        assert len(set(b.tolist())) > 1  # real labels, not one cluster
    # k-means fitted on fp16 GPU features: as good on the CPU features as the CPU fit
    from dicehubert_fairseq.labels.fit import load_kmeans
    from dicehubert_fairseq.labels.kmeans import objective_of

    feats = np.concatenate(TeacherFeatureReader(tiny_teacher, 2).features(
        [read_audio(read_manifest(os.path.join(data, "train.tsv")), i) for i in range(8)]))
    obj = {k: objective_of(load_kmeans(str(tmp_path / f"{k}.joblib"))[0].cluster_centers_, feats)
           for k in ("cpu", "gpu")}
    assert obj["gpu"] <= 1.10 * obj["cpu"], obj


# --------------------------------------------------------------------------- student updates


def _train(cfg, steps: int, n: int = 4):
    """``steps`` fairseq Trainer updates of ``cfg`` on one fixed batch of ``n`` utterances.

    Returns:
        ``(trainer, losses, initial parameters)``; ``losses[i]`` is update ``i``'s logged loss.
    """
    from fairseq.trainer import Trainer

    torch.manual_seed(0)
    task, model, criterion = build(cfg)
    initial = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, task, model, criterion)
    np.random.seed(0)  # the crop (the collater draws from numpy) ...
    sample = batch_of(task, n)
    losses = []
    np.random.seed(1)  # ... and the masks (compute_mask_indices): the same for every precision
    for _ in range(steps):
        out = trainer.train_step([sample])
        losses.append(float(out["loss"]))
    return trainer, losses, initial


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_student_updates_on_cuda(corpus, precision):
    """fairseq's fp16 path (model and criterion cast to half, FP16Optimizer's dynamic loss scaler)
    and AMP (fp32 weights, autocast, GradScaler) train the student: finite losses, the same first
    loss as fp32 on the GPU, a loss that goes down on a fixed batch, parameters that move."""
    from fairseq.optim import AMPOptimizer, FP16Optimizer

    data, labels, _ = corpus
    base = ["common.cpu=false", *NO_DROPOUT, *FAST_LR]
    _, ref, _ = _train(tiny_student_cfg(data, labels, base), 1)
    cfg = tiny_student_cfg(data, labels, base + [f"common.{precision}=true"])
    trainer, losses, initial = _train(cfg, 25)
    model = trainer.model
    assert next(model.parameters()).is_cuda
    if precision == "fp16":
        assert isinstance(trainer.optimizer, FP16Optimizer)
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        scale = trainer.optimizer.scaler.loss_scale
    else:
        assert isinstance(trainer.optimizer, AMPOptimizer)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        scale = trainer.optimizer.scaler.get_scale()
    assert math.isfinite(scale) and scale > 0
    assert all(math.isfinite(x) for x in losses), losses
    # the first update's loss, before any step, is fp32's up to half-precision rounding
    assert losses[0] == pytest.approx(ref[0], rel=0.02), (losses[0], ref[0])
    # skipped (overflowing) updates are not counted: most of the 25 must have been applied
    assert trainer.get_num_updates() >= 20, trainer.get_num_updates()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v.float().cpu(), initial[k])]
    assert len(moved) > len(initial) // 2


def test_feat_teacher_follows_student_to_cuda_fp16(feat_world):
    """L_feat under fp16: the frozen teacher is moved to the GPU and to half at the first batch,
    and the updates are finite."""
    cfg = feat_cfg(feat_world, "feat_shallow_l6", ["common.cpu=false", "common.fp16=true", *FAST_LR])
    trainer, losses, _ = _train(cfg, 4, n=2)
    teacher = trainer.criterion.teacher
    assert {(p.device.type, p.dtype) for p in teacher.parameters()} == {("cuda", torch.float16)}
    assert all(math.isfinite(x) for x in losses), losses
    assert trainer.get_num_updates() >= 2
    # the teacher is still kept out of the criterion's state (and so out of checkpoints)
    assert not any(k.startswith("_teacher") for k in trainer.criterion.state_dict())


# ------------------------------------------------------------------------------------- probe


def test_probe_features_on_cuda_equal_cpu(tones, exact_fp32):
    from dicehubert_fairseq.checkpoint import load_model
    from dicehubert_fairseq.probe.features import extract_split

    manifest = read_manifest(os.path.join(tones["data"], "valid.tsv"))
    cpu = extract_split(load_model(tones["ckpt"])[0], manifest, limit=4)
    gpu = extract_split(load_model(tones["ckpt"], "cuda")[0], manifest, device="cuda", limit=4)
    assert gpu.feats.device.type == "cpu" and gpu.feats.shape == cpu.feats.shape
    assert torch.equal(gpu.offsets, cpu.offsets)
    torch.testing.assert_close(gpu.feats, cpu.feats, atol=1e-4, rtol=1e-3)


def test_probe_runs_on_cuda(tones):
    from dicehubert_fairseq.probe.run import ProbeConfig, run_probe

    cfg = dict(epochs=30, max_train_utterances=24)  # on the CPU: test PER 0.50 (0.94 after 3 epochs)
    cpu = run_probe(tones["ckpt"], tones["data"], cfg=ProbeConfig(**cfg))
    gpu = run_probe(tones["ckpt"], tones["data"], cfg=ProbeConfig(device="cuda", **cfg))
    assert sum(gpu["layer_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert len(gpu["layer_weights"]) == len(cpu["layer_weights"])
    assert gpu["per"] < 0.8, gpu["per"]  # the head learned on the GPU
    # same features and init; only float rounding of the CTC head's training differs
    assert abs(gpu["per"] - cpu["per"]) <= 0.15, (gpu["per"], cpu["per"])
