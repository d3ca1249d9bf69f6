"""Phoneme-recognition probe (SUPERB PR style) of a frozen HuBERT-family checkpoint, end to end.

Check every input, extract and cache the upstream's hidden states (:mod:`.features`), train the
head on train with early stopping on valid (:mod:`.head`), report the test PER.
"""

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..data.preflight import check_audio
from ..errors import InputError, where
from ..export.hf_model import load_upstream
from ..feature_cache import FeatureCache
from ..frames import conv_layers, conv_output_length
from ..option_types import int_list, non_negative_int, positive_float, positive_int
from .features import cache_bytes, extract_split, num_hidden_states, physical_memory_bytes
from .head import ctc_feasible, decode, phone_error_rate, train_probe
from .transcripts import UNK, UNSEEN_CHOICES, encode_transcripts, load_splits, phone_inventory

logger = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """Settings of the probe (defaults: SUPERB-PR-like, sized for small corpora).

    Each field is also a ``dicehubert-probe`` option (:mod:`dicehubert_fairseq.cli_args`).
    """

    epochs: int = field(default=30, metadata={"help": "maximum training epochs", "type": positive_int})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate", "type": positive_float})
    batch_size: int = field(default=8, metadata={"help": "utterances per update", "type": positive_int})
    patience: int = field(default=10, metadata={
        "help": "stop after this many epochs without a better valid PER, counted once the valid PER is "
                "below 1; 0: never stop early", "type": non_negative_int})
    seed: int = field(default=0, metadata={"help": "seed of the head's init and of the batch order"})
    device: str = field(default="cpu", metadata={"help": "torch device for extraction and training"})
    max_train_utterances: Optional[int] = field(default=None, metadata={
        "help": "train on the first N utterances of the training split only", "type": positive_int,
        "metavar": "N"})
    unseen: str = field(default="unk", metadata={
        "help": f"a valid/test phone that never occurs in train: 'unk' scores it as {UNK}, always an error, "
                f"with a warning naming file and line; 'error' stops", "flag": "--unseen-phones",
        "choices": UNSEEN_CHOICES})
    max_cache_gb: Optional[float] = field(default=None, metadata={
        "help": "the hidden states of all utterances are cached in memory (float32, all layers); refuse to "
                "start if they would exceed this (default: half the physical memory)", "type": positive_float,
        "metavar": "GB"})
    layers: Optional[List[int]] = field(default=None, metadata={
        "help": "hidden states the probe weighs, e.g. 0,6,12 (0 = transformer input, k = transformer layer k); "
                "one index probes that layer alone (default: all)", "type": int_list, "nargs": None,
        "metavar": "K[,K...]"})


def run_probe(
    checkpoint: str,
    data: str,
    train_split: str = "train",
    valid_split: str = "valid",
    test_split: str = "test",
    cfg: Optional[ProbeConfig] = None,
) -> Dict[str, object]:
    """Probe a frozen checkpoint for phone recognition: extract, train, test.

    Every input (manifests, transcripts, unseen phones, audio headers, checkpoint) is checked
    before any feature is extracted.

    Args:
        checkpoint: fairseq ``hubert`` or ``dicehubert_student`` checkpoint, or a Hugging Face
            HuBERT directory (e.g. from ``dicehubert-export --to hf``).
        data: directory with ``{split}.tsv`` and ``{split}.phn`` for the three splits.
        train_split / valid_split / test_split: split names.
        cfg: training settings.

    Returns:
        a JSON-ready dict: ``per`` (test), ``valid_per``, ``layer_weights`` (softmaxed, one per
        hidden state probed), ``layers`` (the hidden states probed, ``cfg.layers`` or all), ``epochs``, ``best_epoch``, ``checkpoint``, ``num_phones``, ``phones``,
        ``num_layers``, ``utterances``, ``frames``, ``unseen_phones``, ``history``,
        ``seconds``, ``config``.

    Raises:
        InputError: bad data or checkpoint, with file:line messages.
    """
    cfg = cfg or ProbeConfig()
    if cfg.unseen not in UNSEEN_CHOICES:
        raise ValueError(f"unseen must be one of {UNSEEN_CHOICES}, got {cfg.unseen!r}")
    t0 = time.perf_counter()
    splits = load_splits(data, [train_split, valid_split, test_split])
    train, valid, test = splits[train_split], splits[valid_split], splits[test_split]
    n_train = len(train) if cfg.max_train_utterances is None else min(cfg.max_train_utterances, len(train))
    if n_train < 1:
        raise InputError([f"{train.manifest.path}: max_train_utterances must be at least 1, got {n_train}"])
    # the first n_train rows, shortest first: the probe's batches are then views of the cache
    rows = sorted(range(n_train), key=train.manifest.sizes.__getitem__)
    train = train.subset(rows)
    phones = phone_inventory(train.transcripts)
    train_ids, _ = encode_transcripts(train, phones)
    problems, unseen_counts, encoded = [], {}, {}
    for split in (valid, test):
        try:
            encoded[split.name], counts = encode_transcripts(split, phones, cfg.unseen)
            unseen_counts[split.name] = counts
        except InputError as e:
            problems.extend(e.problems)
    if problems:
        raise InputError(problems)

    model, model_cfg = load_upstream(checkpoint, cfg.device)  # a fairseq checkpoint or an HF directory
    n_states = num_hidden_states(model)
    probed = list(range(n_states)) if cfg.layers is None else list(cfg.layers)
    if not probed or len(set(probed)) != len(probed) or any(not 0 <= k < n_states for k in probed):
        raise InputError([f"{checkpoint}: layers {probed}: expected distinct hidden-state indices in "
                          f"0..{n_states - 1} (0 = transformer input, k = layer k; the model has "
                          f"{n_states - 1} layers)"])
    task_cfg = model_cfg.get("task", {}) if hasattr(model_cfg, "get") else {}
    sample_rate = int(task_cfg.get("sample_rate", 16000) or 16000)
    normalize = bool(task_cfg.get("normalize", False))
    for split in (train, valid, test):
        problems.extend(check_audio(split.manifest, sample_rate, headers=True))
    if problems:
        raise InputError(problems)
    unique = {(s.name, *s.manifest.names): s.manifest for s in (train, valid, test)}
    need = cache_bytes(model, list(unique.values()), len(probed))
    memory = physical_memory_bytes()
    limit = cfg.max_cache_gb * 2**30 if cfg.max_cache_gb is not None else (memory / 2 if memory else None)
    if limit is not None and need > limit:
        raise InputError([f"{data}: the probe caches the hidden states of every utterance in memory: "
                          f"{need / 2**30:.1f} GiB for these splits, over the limit of {limit / 2**30:.1f} GiB "
                          f"(use --max-train-utterances, smaller splits, or raise --max-cache-gb)"])
    layers = conv_layers(model)
    frames = [conv_output_length(size, layers) for size in train.manifest.sizes]
    infeasible = [i for i, (n, t) in enumerate(zip(frames, train_ids)) if not ctc_feasible(n, t)]
    if infeasible:
        i = infeasible[0]
        logger.warning(f"{where(train.phn_path, rows[i] + 1)}: {len(train_ids[i])} phones for "
                       f"{train.manifest.names[i]}, more than CTC can align to its {frames[i]} frames; "
                       f"{len(infeasible)} such training utterance(s) add no loss")
    t_load = time.perf_counter()
    seconds = sum(sum(m.sizes) for m in unique.values()) / sample_rate
    logger.info(f"extracting {len(probed)} hidden states of {sum(len(m) for m in unique.values())} "
                f"utterances ({seconds / 60:.1f} min of audio, {need / 2**20:.0f} MiB cached)")

    caches: Dict[Tuple[str, ...], FeatureCache] = {}
    key = lambda split: (split.name, *split.manifest.names)  # noqa: E731
    for split in (train, valid, test):
        if key(split) not in caches:
            caches[key(split)] = extract_split(model, split.manifest, cfg.device, normalize, sample_rate,
                                               desc=split.name, layers=probed)
    del model
    train_cache, valid_cache, test_cache = (caches[key(s)] for s in (train, valid, test))
    t_extract = time.perf_counter()
    logger.info(f"cached {train_cache.feats.shape[0]} hidden states x {train_cache.feats.shape[2]} dims of "
                f"{sum(c.feats.shape[1] for c in caches.values())} frames in {t_extract - t_load:.1f}s")

    head, info = train_probe(train_cache, train_ids, valid_cache, encoded[valid_split],
                             len(phones) + 1, cfg)
    t_train = time.perf_counter()
    with torch.no_grad():
        per = phone_error_rate(encoded[test_split], decode(head, test_cache))
        weights = head.layer_weights().tolist()
    t_end = time.perf_counter()
    logger.info(f"test PER {per:.4f}; valid PER {info['valid_per']:.4f} at epoch {info['best_epoch']} of "
                f"{info['epochs']}; trained in {t_train - t_extract:.1f}s")
    return {
        "per": per,
        "valid_per": info["valid_per"],
        "layer_weights": weights,
        "layers": probed,
        "epochs": info["epochs"],
        "best_epoch": info["best_epoch"],
        "checkpoint": os.path.abspath(checkpoint),
        "data": os.path.abspath(data),
        "splits": {"train": train_split, "valid": valid_split, "test": test_split},
        "num_phones": len(phones),
        "phones": phones,
        "num_layers": len(weights),
        "utterances": {"train": len(train), "valid": len(valid), "test": len(test)},
        "frames": {"train": int(train_cache.feats.shape[1]), "valid": int(valid_cache.feats.shape[1]),
                   "test": int(test_cache.feats.shape[1])},
        "unseen_phones": unseen_counts,
        "history": info["history"],
        "seconds": {"load": t_load - t0, "extract": t_extract - t_load, "train": t_train - t_extract,
                    "test": t_end - t_train, "total": t_end - t0},
        "config": asdict(cfg),
    }
