"""The probe's head: a softmax-weighted sum of hidden states, layer norm and a linear CTC classifier.

Trained with CTC (blank = index 0) over the phone set of ``{train}.phn``; the epoch with the
lowest valid PER is kept (early stopping with patience).  PER is corpus level: the sum of the
Levenshtein distances (``editdistance``, as fairseq's CTC criterion) between greedy CTC hypotheses
and references over the sum of the reference lengths.
"""

import copy
import logging
import math
from typing import Dict, List, Sequence, Tuple

import editdistance
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..feature_cache import FeatureCache

logger = logging.getLogger(__name__)

#: CTC blank index; phones are ``1..P``.
BLANK = 0


def phone_error_rate(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
    """Corpus-level phone error rate: ``sum(Levenshtein distance) / sum(len(ref))``.

    Args:
        refs: reference phone-id sequences, one per utterance.
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
    return sum(editdistance.eval(list(r), list(h)) for r, h in zip(refs, hyps)) / total


def ctc_greedy_decode(frame_ids, blank: int = BLANK) -> List[int]:
    """Best-path CTC decoding of per-frame argmax ids: collapse repeats, then drop blanks.

    Args:
        frame_ids: ``(T,)`` per-frame class ids (a list, numpy array or 1-D tensor).
        blank: the blank id.

    Returns:
        the decoded label sequence, e.g. ``[0, 3, 3, 0, 3, 5, 5] -> [3, 3, 5]``.
    """
    ids = torch.as_tensor(frame_ids, dtype=torch.long).reshape(-1).unique_consecutive()
    return ids[ids != blank].tolist()


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
    ids = _frame_argmax(head, cache)
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
    cfg,
) -> Tuple[WeightedLayerCTCHead, Dict[str, object]]:
    """Train the head with CTC on ``train``; keep the epoch with the lowest valid PER.

    Args:
        train / valid: cached hidden states, ``feats`` ``(L + 1, N, D)``.
        train_targets / valid_targets: per utterance class ids (``1..P``; the unseen-phone id
            :data:`~dicehubert_fairseq.probe.transcripts.UNK_ID` allowed in valid).
        num_classes: ``P + 1`` (with the blank).
        cfg: a :class:`~dicehubert_fairseq.probe.run.ProbeConfig` (``epochs``, ``lr``,
            ``batch_size``, ``patience``, ``seed``, ``device``).

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
