"""The ``dicehubert`` task's dataset (data/dataset.py): random crops that depend only on (seed, epoch,
utterance), and the labels of the utterances it keeps.

* A crop is a function of (``common.seed``, epoch, dataset index) alone -- not of the batch it is
  in, of numpy's global RNG, or of the thread that collates it (fairseq's data iterator collates
  in a prefetch thread that shares numpy's global RNG with the training thread).
* With utterances dropped by ``task.min_sample_size`` and ``task.max_keep_size`` in the middle of
  the manifest, dataset item ``i`` carries the hard labels, soft ids and soft probabilities of its
  own manifest row.
"""

import threading

import numpy as np
import pytest
import soundfile as sf
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.data.files import write_dictionary
from tests.helpers.config import build, compose, tiny_student_cfg
from tests.helpers.data import num_frames, tiny_model_overrides, write_corpus, write_random_labels, write_soft_labels

K = 12

# ----------------------------------------------------------------------------- random crops


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """8 utterances of 1.2-2.5 s (all longer than the 1 s crops below), 'km' labels at 50 Hz."""
    root = tmp_path_factory.mktemp("crops")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 8, "valid": 2}, seconds=(1.2, 2.5), seed=21)
    write_random_labels(labels, sizes, "km", 20, 50, seed=21)
    return data, labels


def _dataset(corpus, seed=1):
    data, labels = corpus
    task, _, _ = build(tiny_student_cfg(data, labels, [f"common.seed={seed}", "task.max_sample_size=16000"]))
    task.load_dataset("train")
    return task.datasets["train"]


def _crops(ds, indices):
    """``{index: (cropped waveform, cropped labels)}`` of one batch of ``indices``."""
    batch = ds.collater([ds[i] for i in indices])
    return {int(i): (batch["net_input"]["source"][r], batch["target_list"][0][r])
            for r, i in enumerate(batch["id"].tolist())}


def test_crops_depend_on_seed_epoch_and_utterance_only(long_corpus):
    ds = _dataset(long_corpus)
    assert ds.random_crop and all(s > ds.max_sample_size for s in ds.sizes), "every utterance must be cropped"
    ds.set_epoch(1)
    np.random.seed(0)
    a = _crops(ds, [0, 1, 2, 3])
    # another batch composition, order, global numpy state and thread: the same crops
    np.random.seed(12345)
    np.random.rand(17)
    box = {}
    worker = threading.Thread(target=lambda: box.update(_crops(ds, [3, 7, 0])))
    worker.start()
    worker.join()
    for i in (0, 3):
        assert torch.equal(a[i][0], box[i][0]), i
        # the labels start at the same frame (fairseq cuts a batch's labels to its shortest)
        n = min(len(a[i][1]), len(box[i][1]))
        assert n >= 48 and torch.equal(a[i][1][:n], box[i][1][:n]), i
    # the crops are random: not all at the start, not all the same offset
    full = {i: ds.get_audio(i) for i in range(4)}
    starts = []
    for i, (wav, _) in a.items():
        hits = [s for s in range(len(full[i]) - len(wav) + 1) if torch.equal(full[i][s:s + len(wav)], wav)]
        assert hits, i
        starts.append(hits[0])
    assert len(set(starts)) > 1 and max(starts) > 0, starts
    # another epoch or another seed: other crops
    ds.set_epoch(2)
    b = _crops(ds, [0, 1, 2, 3])
    assert sum(not torch.equal(a[i][0], b[i][0]) for i in a) >= 3
    other = _dataset(long_corpus, seed=2)
    other.set_epoch(1)
    c = _crops(other, [0, 1, 2, 3])
    assert sum(not torch.equal(a[i][0], c[i][0]) for i in a) >= 3
    # and a fresh dataset with the same seed and epoch crops the same again
    again = _dataset(long_corpus)
    again.set_epoch(1)
    d = _crops(again, [0, 1, 2, 3])
    assert all(torch.equal(a[i][0], d[i][0]) for i in a)


# ----------------------------------------------------------------------------- labels of the kept utterances

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

    soft = write_soft_labels(str(labels), {"train": sizes, "valid": sizes}, name="ks", n_clusters=K, seed=6,
                             probs_of=probs_of)
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
