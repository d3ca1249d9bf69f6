"""Tiny synthetic corpora and checkpoints for tests, benchmarks and smoke runs (no network).

The audio here is not speech (sums of random tones and noise): enough to exercise every code
path and to measure speed.  ``examples/tiny`` synthesises real speech with espeak-ng.
"""

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import torch
from omegaconf import OmegaConf

import dicehubert_fairseq  # noqa: F401  (registers our task/model)
from dicehubert_fairseq.data.files import SoftLabelWriter, write_dictionary
from dicehubert_fairseq.frames import conv_layers, conv_output_length
from fairseq import tasks
from fairseq.dataclass.configs import FairseqConfig
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import MODEL_DATACLASS_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY

#: HuBERT's conv front end (fairseq's default ``conv_feature_layers``, 50 Hz at 16 kHz).
HUBERT_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"


def write_corpus(
    directory: str,
    splits: Dict[str, int] = None,
    seconds: Sequence[float] = (1.0, 2.5),
    sample_rate: int = 16000,
    seed: int = 0,
) -> Dict[str, List[int]]:
    """Write ``{split}.tsv`` and 16-bit mono wavs of random lengths under ``directory``.

    Args:
        directory: output directory (wavs go to ``directory/wav``).
        splits: utterances per split, default ``{"train": 8, "valid": 4}``.
        seconds: (min, max) duration of an utterance.

    Returns:
        the number of samples of each utterance, per split.
    """
    splits = splits or {"train": 8, "valid": 4}
    rng = np.random.default_rng(seed)
    wav_dir = os.path.join(directory, "wav")
    os.makedirs(wav_dir, exist_ok=True)
    sizes = {}
    for split, n in splits.items():
        rows = []
        for i in range(n):
            size = int(rng.uniform(*seconds) * sample_rate)
            t = np.arange(size) / sample_rate
            freqs = rng.uniform(100, 3000, size=3)
            wav = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs) / 4
            wav += 0.05 * rng.standard_normal(size)
            name = f"{split}_{i:04d}.wav"
            sf.write(os.path.join(wav_dir, name), wav.astype(np.float32), sample_rate, subtype="PCM_16")
            rows.append(f"{name}\t{size}")
        with open(os.path.join(directory, f"{split}.tsv"), "w") as f:
            f.write(os.path.abspath(wav_dir) + "\n" + "\n".join(rows) + "\n")
        sizes[split] = [int(r.split("\t")[1]) for r in rows]
    return sizes


def num_frames(num_samples: int, label_rate: float, sample_rate: int = 16000) -> int:
    """Frames of HuBERT's conv front end (50 Hz) or of a 25 ms/10 ms MFCC (100 Hz)."""
    if label_rate == 50:
        return conv_output_length(num_samples, conv_layers(HUBERT_CONV))
    return conv_output_length(num_samples, [(400, int(round(sample_rate / label_rate)))])


def write_random_labels(
    label_dir: str,
    sizes: Dict[str, List[int]],
    name: str = "km",
    n_clusters: int = 20,
    label_rate: float = 50,
    seed: int = 0,
) -> None:
    """Random hard labels ``{split}.{name}`` with the right lengths, and ``dict.{name}.txt``."""
    rng = np.random.default_rng(seed)
    os.makedirs(label_dir, exist_ok=True)
    for split, lens in sizes.items():
        with open(os.path.join(label_dir, f"{split}.{name}"), "w") as f:
            for size in lens:
                f.write(" ".join(map(str, rng.integers(0, n_clusters, num_frames(size, label_rate)))) + "\n")
    write_dictionary(os.path.join(label_dir, f"dict.{name}.txt"), n_clusters)


def write_soft_labels(
    label_dir: str,
    sizes: Dict[str, List[int]],
    name: str = "km",
    n_clusters: int = 12,
    top_k: int = 3,
    label_rate: float = 50,
    seed: int = 0,
    temperature: float = 5.0,
    probs_of: Optional[Callable[[int, int], np.ndarray]] = None,
) -> Dict[str, List[Tuple[np.ndarray, np.ndarray]]]:
    """Random soft labels of stream ``name``, their arg-max as its hard labels ``{split}.{name}``,
    and ``dict.{name}.txt``.

    Args:
        probs_of: ``probs_of(row, T)`` gives the ``(T, top_k)`` probabilities of manifest row
            ``row`` (most likely first); default: random, sorted.

    Returns:
        per split, per manifest row, the ``((T, top_k) cluster ids, (T, top_k) probabilities)`` written.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(label_dir, exist_ok=True)
    written = {}
    for split, lens in sizes.items():
        w = SoftLabelWriter(label_dir, split, name, n_clusters=n_clusters, top_k=top_k,
                            meta={"temperature": temperature})
        rows, lines = [], []
        for row, size in enumerate(lens):
            T = num_frames(size, label_rate)
            ids = np.stack([rng.permutation(n_clusters)[:top_k] for _ in range(T)])
            if probs_of is None:
                p = np.sort(rng.dirichlet(np.ones(top_k), size=T), axis=1)[:, ::-1]
            else:
                p = probs_of(row, T)
            w.add(ids, p)
            rows.append((ids, p))
            lines.append(" ".join(map(str, ids[:, 0])))
        w.close()
        with open(os.path.join(label_dir, f"{split}.{name}"), "w") as f:
            f.write("\n".join(lines) + "\n")
        written[split] = rows
    write_dictionary(os.path.join(label_dir, f"dict.{name}.txt"), n_clusters)
    return written


def tiny_model_overrides(layers: int = 2, dim: int = 32, conv_dim: int = 32) -> List[str]:
    """Hydra overrides (``++key=value``: set or add) that make any model config tiny (CPU tests)."""
    conv = f"'[({conv_dim},10,5)] + [({conv_dim},3,2)] * 4 + [({conv_dim},2,2)] * 2'"
    return [
        f"++model.encoder_layers={layers}",
        f"++model.encoder_embed_dim={dim}",
        f"++model.encoder_ffn_embed_dim={dim * 2}",
        "++model.encoder_attention_heads=2",
        f"++model.conv_feature_layers={conv}",
        "++model.final_dim=16",
        "++model.conv_pos=16",
        "++model.conv_pos_groups=4",
        "++model.encoder_layerdrop=0.0",
    ]


def write_checkpoint(
    path: str,
    data: str,
    label_dir: str,
    labels: Sequence[str] = ("km",),
    label_rate: float = 50,
    model: str = "hubert",
    task: str = "hubert_pretraining",
    model_overrides: Optional[dict] = None,
    seed: int = 0,
) -> None:
    """Write a randomly initialised checkpoint in exactly the format fairseq's trainer saves.

    (``cfg``, ``model``, ``task_state`` with the label ``Dictionary``, ``args=None``,
    ``optimizer_history``, ``extra_state``), so loaders are tested on the real format.
    """
    torch.manual_seed(seed)
    cfg = OmegaConf.structured(FairseqConfig)
    OmegaConf.set_struct(cfg, False)
    cfg.task = merge_with_parent(
        TASK_DATACLASS_REGISTRY[task](),
        OmegaConf.create({"_name": task, "data": data, "label_dir": label_dir,
                          "labels": list(labels), "label_rate": label_rate}),
    )
    m = {"_name": model, "label_rate": label_rate, "encoder_layers": 2, "encoder_embed_dim": 32,
         "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2,
         "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
         "final_dim": 16, "conv_pos": 16, "conv_pos_groups": 4}
    m.update(model_overrides or {})
    cfg.model = merge_with_parent(MODEL_DATACLASS_REGISTRY[model](), OmegaConf.create(m))
    t = tasks.setup_task(cfg.task)
    net = t.build_model(cfg.model)
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": net.state_dict(),
        "task_state": t.state_dict(),
        "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "extra_state": {"epoch": 1, "val_loss": None},
        "last_optimizer_state": None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)


def perturb_checkpoint(path: str, normalize: bool = False, seed: int = 0) -> None:
    """Add noise to every float tensor of a checkpoint, in place (BatchNorm variances kept positive).

    Fresh LayerNorm/GroupNorm gains are all 1 and biases 0, so a tensor mapped to the wrong place
    by a converter would go unseen; after this every parameter is distinct.  Also sets
    ``task.normalize``.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for k, v in state["model"].items():
        if v.is_floating_point():
            noise = 0.1 * torch.randn(v.shape, generator=g)
            v.copy_((v + noise).abs() + 0.5 if k.endswith("running_var") else v + noise)
    state["cfg"]["task"]["normalize"] = normalize
    torch.save(state, path)
