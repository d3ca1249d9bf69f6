"""Promises of the data path that a wrong implementation would still pass elsewhere.

* Soft labels reach the loss: the logged loss of a soft stream is recomputed here as
  ``-sum p * log_softmax(logits)[ids]`` from the model's logits, its mask, and the soft labels
  *as the dataset delivered them* (not as the model passed them on); changing only the
  non-top probabilities changes the loss (training on the arg-max would not).
* Labels of the utterances that are kept: with utterances dropped by ``task.min_sample_size``
  and ``task.max_keep_size`` in the middle of the manifest, dataset item ``i`` carries the hard
  labels, soft ids and soft probabilities of its own manifest row.
"""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.config import build, compose
from dicehubert_fairseq.data.files import SoftLabelWriter, write_dictionary
from dicehubert_fairseq.testing import num_frames, tiny_model_overrides, write_corpus

K = 12
TOP_K = 3


def write_soft(label_dir, sizes, name="km", seed=0, probs_of=None):
    """Soft labels (and their arg-max as hard labels) for every utterance; ``probs_of(row, T)``
    may fix the probabilities of manifest row ``row``. Returns ``{split: [(ids, probs)...]}``."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, lens in sizes.items():
        w = SoftLabelWriter(label_dir, split, name, n_clusters=K, top_k=TOP_K, meta={"temperature": 5.0})
        rows, lines = [], []
        for row, size in enumerate(lens):
            T = num_frames(size, 50)
            ids = np.stack([rng.permutation(K)[:TOP_K] for _ in range(T)])
            if probs_of is None:
                p = np.sort(rng.dirichlet(np.ones(TOP_K), size=T), axis=1)[:, ::-1]
            else:
                p = probs_of(row, T)
            w.add(ids, p)
            rows.append((ids, p))
            lines.append(" ".join(map(str, ids[:, 0])))
        w.close()
        with open(os.path.join(label_dir, f"{split}.{name}"), "w") as f:
            f.write("\n".join(lines) + "\n")
        written[split] = rows
    write_dictionary(os.path.join(label_dir, f"dict.{name}.txt"), K)
    return written


# --------------------------------------------------------------------------- soft labels reach the loss


@pytest.fixture(scope="module")
def soft_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("softloss")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 4, "valid": 2}, seconds=(0.8, 1.4), seed=41)
    os.makedirs(labels)
    write_soft(labels, sizes, seed=41)
    cfg = compose("dicehubert_narrow_soft", [f"task.data={data}", f"task.label_dir={labels}", "run=cpu",
                                             "task.min_sample_size=8000", "task.pad_audio=true",
                                             "criterion.pred_nomask_weight=0.5"] + tiny_model_overrides())
    task, model, criterion = build(cfg)
    task.load_dataset("train")
    ds = task.datasets["train"]
    return {"task": task, "model": model, "criterion": criterion, "ds": ds}


def _forward(world, batch, update=5):
    """The criterion on ``batch`` with the masks of ``update``; also the model's output."""
    model, criterion = world["model"], world["criterion"]
    model.set_num_updates(update + 1000)  # leave the update: the mask counter restarts below
    model.set_num_updates(update)
    seen = []
    hook = model.register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        loss, sample_size, log = criterion(model, batch)
    finally:
        hook.remove()
    assert len(seen) == 1
    return loss, sample_size, log, seen[0]


def _expected(out, batch, tag):
    """``-sum p * log_softmax(logits)[ids]`` over the frames of ``tag`` ('m' or 'u'), from the
    dataset's soft labels, the model's mask and logits."""
    pad, masked = out["padding_mask"], out["mask_indices"]
    selected = ~pad & (masked if tag == "m" else ~masked)
    ids, probs = batch["soft_target_list"][0]
    T = pad.shape[1]  # label rate = frame rate: frame t reads label t
    ids, probs = ids[:, :T][selected], probs[:, :T][selected]
    logits = out[f"logit_{tag}_list"][0]
    assert logits.shape[0] == int(selected.sum()) > 0
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(probs.double() * logp.gather(1, ids)).sum().item()


def test_soft_labels_reach_the_loss(soft_world):
    ds = soft_world["ds"]
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["soft_target_list"][0] is not None
    model = soft_world["model"]
    model.train()
    loss, sample_size, log, out = _forward(soft_world, batch)
    for tag in ("m", "u"):
        assert log[f"loss_{tag}_0"] == pytest.approx(_expected(out, batch, tag), rel=1e-5), tag
    # not the arg-max: the hard cross-entropy with the top class is another number
    hard = torch.nn.functional.cross_entropy(out["logit_m_list"][0].double(), out["target_m_list"][0],
                                             reduction="sum").item()
    assert abs(hard - log["loss_m_0"]) > 1e-4 * abs(hard)  # 10x the tolerance above

    # only the non-top probabilities change (the top class and its probability stay): the loss changes
    ids, probs = batch["soft_target_list"][0]
    swapped = probs.clone()
    swapped[..., 1], swapped[..., 2] = probs[..., 2], probs[..., 1]
    assert torch.equal(swapped[..., 0], probs[..., 0]) and not torch.equal(swapped, probs)
    changed = dict(batch, soft_target_list=[(ids, swapped)])
    loss2, _, log2, out2 = _forward(soft_world, changed)
    assert torch.equal(out2["mask_indices"], out["mask_indices"])  # same masks: only the targets differ
    assert torch.equal(out2["target_m_list"][0], out["target_m_list"][0])
    assert log2["loss_m_0"] == pytest.approx(_expected(out2, changed, "m"), rel=1e-5)
    assert abs(log2["loss_m_0"] - log["loss_m_0"]) > 1e-4 * log["loss_m_0"]
    assert abs(loss2.item() - loss.item()) > 1e-4 * loss.item()


# --------------------------------------------------------------------------- labels of the kept utterances

#: durations (s) of the manifest rows: short ones (< 0.5 s) and a long one (> 2 s) in the middle
SECONDS = [1.0, 0.3, 1.2, 0.4, 2.5, 0.9, 1.1, 0.2, 1.5]
MIN_SAMPLES, MAX_KEEP = 8000, 32000


@pytest.fixture(scope="module")
def dropping_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropped")
    data, labels = root / "data", root / "labels"
    (data / "wav").mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for r, s in enumerate(SECONDS):
        size = int(s * 16000)
        sf.write(str(data / "wav" / f"u{r}.wav"), (0.1 * rng.standard_normal(size)).astype(np.float32), 16000,
                 subtype="PCM_16")
        rows.append(f"u{r}.wav\t{size}")
    sizes = [int(s * 16000) for s in SECONDS]
    for split in ("train", "valid"):
        (data / f"{split}.tsv").write_text(str(data / "wav") + "\n" + "\n".join(rows) + "\n")
    # distinct labels per row: hard 'km' = (row + t) % K; soft 'ks' top probability 0.5 + row / 100
    for split in ("train", "valid"):
        lines = [" ".join(str((r + t) % K) for t in range(num_frames(n, 50))) for r, n in enumerate(sizes)]
        (labels / f"{split}.km").write_text("\n".join(lines) + "\n")
    write_dictionary(str(labels / "dict.km.txt"), K)

    def probs_of(row, T):
        top = 0.5 + row / 100
        return np.tile([top, (1 - top) * 0.7, (1 - top) * 0.3], (T, 1))

    soft = write_soft(str(labels), {"train": sizes, "valid": sizes}, name="ks", seed=6, probs_of=probs_of)
    return {"data": str(data), "labels": str(labels), "sizes": sizes, "soft": soft["train"]}


@pytest.mark.parametrize("max_keep", [None, MAX_KEEP])
def test_labels_of_kept_utterances_are_their_own(dropping_corpus, max_keep):
    w = dropping_corpus
    extra = ["task.labels=[km,ks]", "task.soft_labels=[ks]", f"task.min_sample_size={MIN_SAMPLES}",
             "task.max_sample_size=100000"]
    if max_keep:
        extra.append(f"++task.max_keep_size={max_keep}")
    task, _, _ = build(compose("dicehubert_narrow", [f"task.data={w['data']}", f"task.label_dir={w['labels']}",
                                                     "run=cpu"] + tiny_model_overrides() + extra))
    task.load_dataset("train")
    ds = task.datasets["train"]
    kept = [r for r, n in enumerate(w["sizes"]) if n >= MIN_SAMPLES and (max_keep is None or n <= max_keep)]
    assert len(ds) == len(kept) < len(SECONDS)
    assert kept != list(range(len(kept)))  # something in the middle was dropped
    km, ks = task.dictionaries
    for i, row in enumerate(kept):
        assert ds.audio_names[i] == f"u{row}.wav"
        batch = ds.collater([ds[i]])  # one utterance: nothing cropped
        hard = batch["target_list"][0][0]
        T = num_frames(w["sizes"][row], 50)
        assert [int(km[j]) for j in hard.tolist()] == [(row + t) % K for t in range(T)], row
        ids, probs = (x[0] for x in batch["soft_target_list"][1])
        want_ids, want_probs = w["soft"][row]
        assert [[int(ks[j]) for j in frame] for frame in ids.tolist()] == want_ids.tolist(), row
        np.testing.assert_allclose(probs.numpy(), want_probs, atol=1e-6)
        assert [int(ks[j]) for j in batch["target_list"][1][0].tolist()] == want_ids[:, 0].tolist()
