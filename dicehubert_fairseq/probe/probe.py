"""Phoneme-recognition probe (SUPERB PR style) of a frozen HuBERT-family upstream.

The upstream (a fairseq ``hubert`` or our ``dicehubert_student`` checkpoint) is frozen, so the
hidden states of every utterance are extracted once, in one forward pass, and cached in memory:

* hidden state 0: the conv front end's features after its layer norm and ``post_extract_proj``
  (the transformer's input, as s3prl's HuBERT upstream takes it);
* hidden states 1..L: the output of every transformer layer.

Each hidden state is layer-normalised (no affine; s3prl's ``Featurizer(normalize=True)``) when
cached.  The probe learns a softmax-weighted sum of the ``L + 1`` states, a ``LayerNorm`` and a
linear head trained with CTC (blank = index 0) over the phone set of ``{train}.phn``; it keeps
the epoch with the lowest valid PER (early stopping with patience) and reports the test PER.
``ProbeConfig.layers`` (``--layers``) restricts the sum to chosen hidden states; one index
probes that layer alone (per-layer PER: which layer carries the most phonetic information).

Transcripts: ``{split}.phn`` beside ``{split}.tsv``, one line per manifest row, phones separated
by white space.  A phone of valid/test that never occurs in train cannot be predicted; by default
(``unseen="unk"``) it becomes ``<unk>`` in the reference, where it always counts as an error, and
a warning names the file and line; with ``unseen="error"`` it is an :class:`InputError`.

PER is corpus level: the sum of the Levenshtein distances between greedy CTC hypotheses and
references over the sum of the reference lengths.
"""

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..data.files import Manifest, read_manifest
from ..data.preflight import check_audio
from ..errors import InputError, where

logger = logging.getLogger(__name__)

#: CTC blank index; phones are ``1..P``.
BLANK = 0
#: Reference id of a valid/test phone unseen in train: never predicted, always an error.
UNK_ID = -1
UNK = "<unk>"
#: Problems listed per file before the rest are only counted.
MAX_REPORTED = 20
UNSEEN_CHOICES = ("unk", "error")


# ---------------------------------------------------------------------------------------------
# metrics


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1).

    Args:
        ref: reference sequence (any comparable items).
        hyp: hypothesis sequence.

    Returns:
        the minimum number of edits turning ``hyp`` into ``ref``.
    """
    ref, hyp = list(ref), list(hyp)
    if len(ref) < len(hyp):  # keep the DP row short
        ref, hyp = hyp, ref
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i]
        for j, h in enumerate(hyp, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def phone_error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Corpus-level phone error rate: ``sum(edit_distance) / sum(len(ref))``.

    Args:
        refs: reference phone sequences, one per utterance.
        hyps: hypothesis sequences, aligned with ``refs``.

    Returns:
        the PER (0 is perfect; it can exceed 1 with many insertions).

    Raises:
        ValueError: different numbers of references and hypotheses, or no reference phones.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("phone error rate undefined: the references hold no phones")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def ctc_greedy_decode(frame_ids: Sequence[int], blank: int = BLANK) -> List[int]:
    """Best-path CTC decoding of per-frame argmax ids: collapse repeats, then drop blanks.

    Args:
        frame_ids: ``(T,)`` per-frame class ids (a list, numpy array or 1-D tensor).
        blank: the blank id.

    Returns:
        the decoded label sequence, e.g. ``[0, 3, 3, 0, 3, 5, 5] -> [3, 3, 5]``.
    """
    ids = np.asarray(frame_ids).reshape(-1)
    if ids.size == 0:
        return []
    keep = np.ones(ids.size, dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    keep &= ids != blank
    return ids[keep].tolist()


# ---------------------------------------------------------------------------------------------
# transcripts


@dataclass
class PhoneSplit:
    """A manifest and its phone transcripts.

    Attributes:
        name: split name, e.g. ``train``.
        manifest: the parsed ``{split}.tsv``.
        phn_path: the ``{split}.phn`` file.
        transcripts: one list of phone symbols per manifest row.
    """

    name: str
    manifest: Manifest
    phn_path: str
    transcripts: List[List[str]]

    def __len__(self) -> int:
        return len(self.manifest)

    def subset(self, rows: Sequence[int]) -> "PhoneSplit":
        """The manifest rows ``rows`` (0-based) in that order, with their transcripts."""
        m = self.manifest
        manifest = Manifest(m.path, m.root, [m.names[i] for i in rows], [m.sizes[i] for i in rows])
        return PhoneSplit(self.name, manifest, self.phn_path, [self.transcripts[i] for i in rows])


def read_transcripts(path: str, manifest: Manifest) -> List[List[str]]:
    """Read ``{split}.phn``: one line per row of ``manifest``, phones separated by white space.

    Raises:
        InputError: missing file, a line count different from the manifest's rows, or empty
            lines (each named by file and line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError([f"{path}: phone transcripts not found (expected one line of space-separated "
                          f"phones per row of {manifest.path})"])
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    problems: List[str] = []
    transcripts = []
    empty = 0
    for lineno, line in enumerate(lines, start=1):
        phones = line.split()
        transcripts.append(phones)
        if not phones and lineno <= len(manifest):
            empty += 1
            if empty <= MAX_REPORTED:
                problems.append(f"{where(path, lineno)}: empty transcript for {manifest.names[lineno - 1]} "
                                f"(expected at least one phone)")
    if empty > MAX_REPORTED:
        problems.append(f"{path}: ... and {empty - MAX_REPORTED} more empty transcripts")
    if len(lines) != len(manifest):
        problems.append(f"{path}: {len(lines)} lines, but {manifest.path} lists {len(manifest)} utterances "
                        f"(expected one transcript line per manifest row)")
    if problems:
        raise InputError(problems)
    return transcripts


def load_split(data: str, split: str) -> PhoneSplit:
    """``{data}/{split}.tsv`` and ``{data}/{split}.phn``, checked (not the audio itself).

    Raises:
        InputError: every problem with the manifest or the transcripts.
    """
    manifest = read_manifest(os.path.join(data, f"{split}.tsv"))
    phn = os.path.join(data, f"{split}.phn")
    return PhoneSplit(split, manifest, phn, read_transcripts(phn, manifest))


def phone_inventory(transcripts: Sequence[Sequence[str]]) -> List[str]:
    """Sorted phone symbols of a split; the class id of ``phones[i]`` is ``i + 1`` (0 is blank)."""
    return sorted({p for t in transcripts for p in t})


def encode_transcripts(
    split: PhoneSplit, phones: Sequence[str], unseen: str = "unk"
) -> Tuple[List[List[int]], Dict[str, int]]:
    """Map a split's transcripts to class ids ``1..P`` of ``phones``.

    Args:
        split: transcripts to encode.
        phones: the phone inventory (of the training split).
        unseen: ``"unk"``: a phone not in ``phones`` becomes :data:`UNK_ID` (never predicted, so
            always an error) with a warning naming file and line; ``"error"``: raise.

    Returns:
        ``(ids, unseen_counts)``: per utterance its id list, and occurrences per unseen phone.

    Raises:
        InputError: ``unseen == "error"`` and a phone is not in ``phones``.
    """
    if unseen not in UNSEEN_CHOICES:
        raise ValueError(f"unseen must be one of {UNSEEN_CHOICES}, got {unseen!r}")
    index = {p: i + 1 for i, p in enumerate(phones)}
    encoded: List[List[int]] = []
    counts: Dict[str, int] = {}
    first: Dict[str, int] = {}
    for lineno, phs in enumerate(split.transcripts, start=1):
        ids = []
        for p in phs:
            i = index.get(p)
            if i is None:
                counts[p] = counts.get(p, 0) + 1
                first.setdefault(p, lineno)
                i = UNK_ID
            ids.append(i)
        encoded.append(ids)
    if counts:
        listed = sorted(first, key=first.get)
        msgs = [f"{where(split.phn_path, first[p])}: phone {p!r} does not occur in the training transcripts "
                f"({counts[p]} occurrence(s) in this file)" for p in listed[:MAX_REPORTED]]
        if len(listed) > MAX_REPORTED:
            msgs.append(f"{split.phn_path}: ... and {len(listed) - MAX_REPORTED} more unseen phones")
        if unseen == "error":
            raise InputError(msgs)
        for m in msgs:
            logger.warning(m + f"; scored as {UNK}, always an error")
    return encoded, counts


# ---------------------------------------------------------------------------------------------
# upstream features


def num_hidden_states(model: nn.Module) -> int:
    """Hidden states the probe weighs: the transformer input plus one per transformer layer."""
    return len(model.encoder.layers) + 1


@torch.inference_mode()
def extract_hidden_states(model: nn.Module, source: torch.Tensor, normalize_waveform: bool = False) -> torch.Tensor:
    """All hidden states of a HuBERT-family model for one utterance, in one forward pass.

    Follows ``HubertModel.forward`` (no masking, no padding) and keeps every layer's output
    from ``TransformerEncoder.extract_features``'s ``layer_results``.

    Args:
        model: a fairseq ``HubertModel`` (or subclass) in eval mode.
        source: ``(S,)`` or ``(1, S)`` waveform.
        normalize_waveform: layer-normalise the waveform first (the task's ``normalize``, as
            fairseq's ``HubertDataset`` does for models trained with it).

    Returns:
        ``(L + 1, T, D)``: hidden state 0 is the projected conv features (the transformer
        input), ``1..L`` the transformer layers' outputs.
    """
    x = source.reshape(1, -1).float()
    if normalize_waveform:
        x = F.layer_norm(x, x.shape)
    features = model.forward_features(x).transpose(1, 2)  # (1, T, C)
    features = model.layer_norm(features)
    if model.post_extract_proj is not None:
        features = model.post_extract_proj(features)  # (1, T, D)
    _, layer_results = model.encoder.extract_features(features, padding_mask=None)
    n_layers = len(model.encoder.layers)
    if len(layer_results) != n_layers:
        raise RuntimeError(f"the encoder returned {len(layer_results)} layer results for {n_layers} layers")
    # layer_results[i][0]: (T, 1, D)
    states = [features[0]] + [r[0][:, 0] for r in layer_results]
    return torch.stack(states)


def read_audio(path: str) -> torch.Tensor:
    """A mono waveform as a float32 ``(S,)`` tensor (soundfile, as fairseq's ``HubertDataset``)."""
    import soundfile as sf

    wav, _sr = sf.read(path, dtype="float32")
    return torch.from_numpy(wav)


@dataclass
class FeatureCache:
    """Hidden states of a split, flattened over frames.

    Attributes:
        feats: ``(L + 1, N, D)`` float32 layer-normalised hidden states of all ``N`` frames.
        offsets: ``(U + 1,)`` int64 frame offsets of the ``U`` utterances.
    """

    feats: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def frame_index(self, utts: Sequence[int]) -> torch.Tensor:
        """``(n,)`` frame indices of the utterances ``utts``, concatenated in order."""
        return torch.cat([torch.arange(int(self.offsets[u]), int(self.offsets[u + 1])) for u in utts])

    def select(self, utts: Sequence[int]) -> "FeatureCache":
        """A new cache holding the utterances ``utts`` in that order (a copy)."""
        lengths = self.lengths[list(utts)]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        return FeatureCache(self.feats[:, self.frame_index(utts)], offsets)

    def to(self, device) -> "FeatureCache":
        return FeatureCache(self.feats.to(device), self.offsets)


def num_conv_frames(model: nn.Module, num_samples: int) -> int:
    """Frames the model's conv front end makes of ``num_samples`` samples (no padding)."""
    n = num_samples
    for block in model.feature_extractor.conv_layers:
        conv = next(m for m in block.modules() if isinstance(m, nn.Conv1d))
        n = (n - conv.kernel_size[0]) // conv.stride[0] + 1
    return max(n, 0)


def cache_bytes(model: nn.Module, manifests: Sequence[Manifest], num_states: Optional[int] = None) -> int:
    """Bytes of float32 hidden states :func:`extract_split` would cache for ``manifests``
    (``num_states`` of them per frame; default: all of the model's)."""
    frames = sum(num_conv_frames(model, size) for m in manifests for size in m.sizes)
    states = num_hidden_states(model) if num_states is None else num_states
    return frames * states * model.encoder.embedding_dim * 4


def extract_split(
    model: nn.Module,
    manifest: Manifest,
    device: str = "cpu",
    normalize_waveform: bool = False,
    limit: Optional[int] = None,
    desc: str = "",
    layers: Optional[Sequence[int]] = None,
) -> FeatureCache:
    """Extract and cache the layer-normalised hidden states of every utterance of a manifest.

    Args:
        model: frozen HuBERT-family model on ``device``.
        manifest: the split (audio checked: readable, mono, as long as the manifest says).
        device: where the model runs.
        normalize_waveform: the task's ``normalize`` (see :func:`extract_hidden_states`).
        limit: only the first ``limit`` utterances.
        desc: progress-bar label.
        layers: the hidden states to keep (indices ``0..L``); None: all ``L + 1``.

    Returns:
        a :class:`FeatureCache` on the CPU, ``feats`` ``(len(layers), N, D)`` (``(L + 1, N, D)``
        when ``layers`` is None) allocated once.
    """
    n = len(manifest) if limit is None else min(limit, len(manifest))
    lengths = [num_conv_frames(model, size) for size in manifest.sizes[:n]]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    keep = list(range(num_hidden_states(model))) if layers is None else list(layers)
    feats = torch.empty(len(keep), int(offsets[-1]), model.encoder.embedding_dim)
    for i in tqdm(range(n), desc=f"features {desc}".strip(), unit="utt", leave=False, disable=None):
        h = extract_hidden_states(model, read_audio(manifest.audio_path(i)).to(device), normalize_waveform)[keep]
        if h.shape[1] != lengths[i]:
            raise InputError([f"{where(manifest.path, i + 2)}: {manifest.audio_path(i)} gave {h.shape[1]} frames, "
                              f"expected {lengths[i]} for the {manifest.sizes[i]} samples the manifest lists"])
        feats[:, offsets[i] : offsets[i + 1]] = F.layer_norm(h.float(), h.shape[-1:]).cpu()
    return FeatureCache(feats, torch.from_numpy(offsets))


def physical_memory_bytes() -> Optional[int]:
    """Physical memory of this machine, if the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# the probe


class WeightedLayerCTCHead(nn.Module):
    """Softmax-weighted sum of hidden states, ``LayerNorm``, linear CTC classifier.

    Args:
        num_layers: hidden states weighed (``L + 1``).
        dim: their dimension ``D``.
        num_classes: output classes including the blank (``P + 1``).
    """

    def __init__(self, num_layers: int, dim: int, num_classes: int):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, num_classes)
        # zero init (logistic-regression style): uniform outputs, decoded as all blank, so the
        # probe starts at the empty hypothesis (PER 1) instead of at a random guess
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def layer_weights(self) -> torch.Tensor:
        """``(L + 1,)`` softmaxed layer weights (they sum to 1)."""
        return torch.softmax(self.layer_logits, dim=0)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Frame logits.

        Args:
            feats: ``(L + 1, N, D)`` hidden states of ``N`` frames.

        Returns:
            ``(N, P + 1)`` logits.
        """
        x = torch.einsum("l,lnd->nd", self.layer_weights(), feats)
        return self.proj(self.layer_norm(x))


@dataclass
class ProbeConfig:
    """Training settings of the probe (defaults: SUPERB-PR-like, sized for small corpora)."""

    epochs: int = field(default=30, metadata={"help": "maximum training epochs"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=8, metadata={"help": "utterances per update"})
    patience: int = field(default=10, metadata={"help": "stop after this many epochs without a better "
                                                         "valid PER, counted once the valid PER is below 1 "
                                                         "(0: never stop early)"})
    seed: int = field(default=0, metadata={"help": "seed of the head's init and of the batch order"})
    device: str = field(default="cpu", metadata={"help": "device for extraction and training"})
    max_train_utterances: Optional[int] = field(default=None, metadata={"help": "use only the first N "
                                                                                 "training utterances"})
    unseen: str = field(default="unk", metadata={"help": "valid/test phones unseen in train: 'unk' "
                                                          "(scored as errors, warned) or 'error'"})
    max_cache_gb: Optional[float] = field(default=None, metadata={"help": "refuse to cache more hidden states "
                                                                          "than this (default: half the "
                                                                          "physical memory)"})
    layers: Optional[List[int]] = field(default=None, metadata={"help": "hidden states the probe weighs "
                                                                        "(0 = transformer input, k = layer k); "
                                                                        "None: all; one index probes that "
                                                                        "layer alone"})


def _frame_argmax(head: nn.Module, cache: FeatureCache, chunk: int = 16384) -> torch.Tensor:
    out = []
    for s in range(0, cache.feats.shape[1], chunk):
        out.append(head(cache.feats[:, s : s + chunk]).argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def decode(head: nn.Module, cache: FeatureCache) -> List[List[int]]:
    """Greedy CTC hypotheses (class ids ``1..P``) of every utterance of ``cache``."""
    was_training = head.training
    head.eval()
    ids = _frame_argmax(head, cache).numpy()
    head.train(was_training)
    off = cache.offsets.tolist()
    return [ctc_greedy_decode(ids[off[u] : off[u + 1]]) for u in range(len(cache))]


def ctc_feasible(num_frames: int, target: Sequence[int]) -> bool:
    """Whether CTC can align ``target`` to ``num_frames`` frames (repeats need a blank between)."""
    repeats = sum(1 for a, b in zip(target[:-1], target[1:]) if a == b)
    return num_frames >= len(target) + repeats


def train_probe(
    train: FeatureCache,
    train_targets: Sequence[Sequence[int]],
    valid: FeatureCache,
    valid_targets: Sequence[Sequence[int]],
    num_classes: int,
    cfg: ProbeConfig,
) -> Tuple[WeightedLayerCTCHead, Dict[str, object]]:
    """Train the head with CTC on ``train``; keep the epoch with the lowest valid PER.

    Args:
        train / valid: cached hidden states, ``feats`` ``(L + 1, N, D)``.
        train_targets / valid_targets: per utterance class ids (``1..P``; :data:`UNK_ID` allowed
            in valid).
        num_classes: ``P + 1`` (with the blank).
        cfg: training settings (``epochs``, ``lr``, ``batch_size``, ``patience``, ``seed``,
            ``device``).

    An utterance with fewer frames than CTC needs for its transcript (:func:`ctc_feasible`)
    adds no loss (``zero_infinity``).

    Returns:
        ``(head, info)``: the best head (eval mode, CPU) and ``{"valid_per", "best_epoch",
        "epochs", "history": [{"epoch", "loss", "valid_per"}...]}``.
    """
    if len(train) != len(train_targets) or len(valid) != len(valid_targets):
        raise ValueError("features and targets differ in the number of utterances")
    device = torch.device(cfg.device)
    lengths = train.lengths.tolist()
    # Batches are runs of utterances of similar length (little CTC padding) and contiguous in
    # memory (a view, no gather); their order is shuffled every epoch.
    by_length = sorted(range(len(train)), key=lengths.__getitem__)
    if by_length != list(range(len(train))):
        train = train.select(by_length)
        train_targets = [train_targets[u] for u in by_length]
        lengths = [lengths[u] for u in by_length]
    num_layers, _, dim = train.feats.shape
    train, valid = train.to(device), valid.to(device)
    offsets = train.offsets.tolist()
    batches = []
    for s in range(0, len(train), cfg.batch_size):
        e = min(s + cfg.batch_size, len(train))
        tgt = [torch.as_tensor(t, dtype=torch.long) for t in train_targets[s:e]]
        batches.append((offsets[s], offsets[e], lengths[s:e], torch.tensor(lengths[s:e], dtype=torch.long),
                        torch.cat(tgt).to(device), torch.tensor([len(t) for t in tgt], dtype=torch.long)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = WeightedLayerCTCHead(num_layers, dim, num_classes).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    best_per, best_state, best_epoch, stale = math.inf, None, 0, 0
    history = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="probe", unit="epoch", leave=False, disable=None)
    for epoch in bar:
        head.train()
        total_loss, total_phones = 0.0, 0
        for b in torch.randperm(len(batches), generator=generator).tolist():
            start, end, lens, lens_t, tgt, tgt_lens = batches[b]
            logp = torch.log_softmax(head(train.feats[:, start:end]), dim=-1)  # (n, C)
            padded = nn.utils.rnn.pad_sequence(list(logp.split(lens)))  # (T_max, B, C)
            loss = F.ctc_loss(padded, tgt, lens_t, tgt_lens, blank=BLANK, reduction="sum", zero_infinity=True)
            phones = int(tgt_lens.sum())
            optimizer.zero_grad()
            (loss / max(phones, 1)).backward()
            optimizer.step()
            total_loss += loss.item()
            total_phones += phones
        valid_per = phone_error_rate(valid_targets, decode(head, valid))
        loss_per_phone = total_loss / max(total_phones, 1)
        history.append({"epoch": epoch, "loss": loss_per_phone, "valid_per": valid_per})
        bar.set_postfix(loss=f"{loss_per_phone:.3f}", valid_per=f"{valid_per:.4f}")
        logger.debug(f"epoch {epoch}: CTC loss/phone {loss_per_phone:.4f}, valid PER {valid_per:.4f}")
        if valid_per < best_per:
            best_per, best_epoch, stale = valid_per, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        elif best_per < 1.0:  # patience runs once the probe beats the empty output (CTC's blank plateau)
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                logger.info(f"early stop after epoch {epoch}: no better valid PER for {stale} epochs")
                break
    bar.close()
    head.load_state_dict(best_state)
    head.eval().cpu()
    return head, {"valid_per": best_per, "best_epoch": best_epoch, "epochs": len(history), "history": history}


# ---------------------------------------------------------------------------------------------
# end to end


def prepare(data: str, splits: Sequence[str]) -> Dict[str, PhoneSplit]:
    """Check and read the manifests and transcripts of ``splits`` (every problem at once).

    Raises:
        InputError: all problems of all splits.
    """
    problems: List[str] = []
    out: Dict[str, PhoneSplit] = {}
    for split in dict.fromkeys(splits):
        try:
            out[split] = load_split(data, split)
        except InputError as e:
            problems.extend(e.problems)
    if problems:
        raise InputError(problems)
    return out


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
        checkpoint: fairseq ``hubert`` or ``dicehubert_student`` checkpoint.
        data: directory with ``{split}.tsv`` and ``{split}.phn`` for the three splits.
        train_split / valid_split / test_split: split names.
        cfg: training settings.

    Returns:
        a JSON-ready dict: ``per`` (test), ``valid_per``, ``layer_weights`` (softmaxed, one per
        hidden state probed), ``layers`` (the hidden states probed), ``epochs``, ``best_epoch``, ``checkpoint``, ``num_phones``, ``phones``,
        ``num_layers``, ``utterances``, ``frames``, ``unseen_phones``, ``history``,
        ``seconds``, ``config``.

    Raises:
        InputError: bad data or checkpoint, with file:line messages.
    """
    from ..checkpoint import load_model

    cfg = cfg or ProbeConfig()
    if cfg.unseen not in UNSEEN_CHOICES:
        raise ValueError(f"unseen must be one of {UNSEEN_CHOICES}, got {cfg.unseen!r}")
    t0 = time.perf_counter()
    splits = prepare(data, [train_split, valid_split, test_split])
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

    model, model_cfg = load_model(checkpoint, cfg.device)
    n_states = num_hidden_states(model)
    layers = list(range(n_states)) if cfg.layers is None else list(cfg.layers)
    bad = [k for k in layers if not 0 <= k < n_states]
    if bad or not layers or len(set(layers)) != len(layers):
        raise InputError([f"{checkpoint}: layers {layers}: expected distinct hidden-state indices in 0..{n_states - 1} "
                          f"(0 = transformer input, k = layer k; the model has {n_states - 1} layers)"])
    task_cfg = model_cfg.get("task", {}) if hasattr(model_cfg, "get") else {}
    sample_rate = int(task_cfg.get("sample_rate", 16000) or 16000)
    normalize = bool(task_cfg.get("normalize", False))
    for split in (train, valid, test):
        problems.extend(check_audio(split.manifest, sample_rate, headers=True))
    if problems:
        raise InputError(problems)
    unique = {(s.name, *s.manifest.names): s.manifest for s in (train, valid, test)}
    need = cache_bytes(model, list(unique.values()), len(layers))
    memory = physical_memory_bytes()
    limit = cfg.max_cache_gb * 2**30 if cfg.max_cache_gb is not None else (memory / 2 if memory else None)
    if limit is not None and need > limit:
        raise InputError([f"{data}: the probe caches the hidden states of every utterance in memory: "
                          f"{need / 2**30:.1f} GiB for these splits, over the limit of {limit / 2**30:.1f} GiB "
                          f"(use --max-train-utterances, smaller splits, or raise --max-cache-gb)"])
    frames = [num_conv_frames(model, size) for size in train.manifest.sizes]
    infeasible = [i for i, (n, t) in enumerate(zip(frames, train_ids)) if not ctc_feasible(n, t)]
    if infeasible:
        i = infeasible[0]
        logger.warning(f"{where(train.phn_path, rows[i] + 1)}: {len(train_ids[i])} phones for "
                       f"{train.manifest.names[i]}, more than CTC can align to its {frames[i]} frames; "
                       f"{len(infeasible)} such training utterance(s) add no loss")
    t_load = time.perf_counter()
    seconds = sum(sum(m.sizes) for m in unique.values()) / sample_rate
    logger.info(f"extracting {len(layers)} hidden states of {sum(len(m) for m in unique.values())} "
                f"utterances ({seconds / 60:.1f} min of audio, {need / 2**20:.0f} MiB cached)")

    caches: Dict[Tuple[str, ...], FeatureCache] = {}
    key = lambda split: (split.name, *split.manifest.names)  # noqa: E731
    for split in (train, valid, test):
        if key(split) not in caches:
            caches[key(split)] = extract_split(model, split.manifest, cfg.device, normalize, desc=split.name,
                                               layers=layers)
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
        "layers": layers,
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
