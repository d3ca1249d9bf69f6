"""What the streamed k-means loses against fairseq's in-memory fit when the sample outgrows the pool.

``dicehubert-labels fit`` (and ``run``) fit k-means in bounded memory: when the sample has more
frames than the pool (``--pool-size``, default ``max(3 * batch, 3 * K)``: 30000 frames), pass 1
keeps a uniform reservoir of ``pool`` frames and fits k-means on it (fairseq's settings), pass 2
streams every frame through ``partial_fit``.  fairseq's ``learn_kmeans.py`` holds the whole
sample in memory.  This script measures the gap on real features -- the teacher-layer features
fairseq's ``dump_hubert_feature.py`` wrote in a ``benchmarks/labels/run.py`` work directory -- for
several K, pool sizes and seeds, and for two ways of closing it that cost teacher passes over
the sample: more streamed passes, and a last exact Lloyd step (one more pass that sets every
centroid to the mean of the frames nearest to it).

The features are served to the library's own ``fit`` (the code of ``dicehubert-labels fit``, as committed)
from memory, in the order ``fit`` reads them, so no teacher runs here; the variants with more
passes mirror ``fit``'s stream and are checked to give ``fit``'s centroids with one pass.

    python -m benchmarks.labels.pool_study --workdir /tmp/dicehubert_labels_bench/n80 \\
        [--configs 100:700 50:700 25:700 10:700 100:1400 100:2800 100:4900] [--seeds 0 1 2] \\
        [--passes 2 3 4] [--lloyd]

Prints a markdown table (objective of every frame, ours / in-memory - 1, mean and range over the
seeds) and writes ``pool_study.json`` in ``--workdir``.
"""

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.feature_cache import FeatureCache
from dicehubert_fairseq.frames import conv_output_length
from dicehubert_fairseq.labels.config import Corpus
from dicehubert_fairseq.labels.features import FeatureReader, FeatureSource
from dicehubert_fairseq.labels.fit import FitConfig, fit, sample_rows
from dicehubert_fairseq.labels.kmeans import ReservoirSample, StreamingKMeans, new_kmeans, objective_of
from dicehubert_fairseq.labels.plan import make_plan

#: HuBERT's conv front end, (kernel, stride) per layer: frames per utterance
HUBERT_CONV = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2


class StoredFeatures(FeatureReader):
    """A reader that never runs: every row's features come from a full :class:`FeatureCache`."""

    batch_invariant = True

    def __init__(self, dim: int):
        self.dim, self.frame_rate, self.sample_rate = dim, 50.0, 16000
        self.description = {"type": "stored", "dim": dim}

    def num_frames(self, num_samples: int) -> int:
        return conv_output_length(num_samples, HUBERT_CONV)

    def features(self, wavs):  # pragma: no cover - every row is cached
        raise RuntimeError("stored features only")


def load(workdir, features=None, lengths=None):
    """fairseq's dumped features of the work directory's corpus: (manifest, X (N, D), per-row arrays, reader)."""
    manifest = read_manifest(os.path.join(workdir, "data", "train.tsv"))
    X = np.load(features or os.path.join(workdir, "fs_feat", "train_0_1.npy"))
    lengths = lengths or os.path.join(workdir, "fs_feat", "train_0_1.len")
    if lengths.endswith(".npy"):
        lens = [int(x) for x in np.load(lengths)]
    else:
        with open(lengths) as f:
            lens = [int(x) for x in f.read().split()]
    offs = np.concatenate([[0], np.cumsum(lens)])
    reader = StoredFeatures(X.shape[1])
    if [reader.num_frames(s) for s in manifest.sizes] != lens:
        raise SystemExit(f"{workdir}: fairseq's feature lengths do not match the manifest's")
    return manifest, X, [X[offs[i]:offs[i + 1]] for i in range(len(lens))], reader


def full_cache(rows):
    cache = FeatureCache(sum(len(r) for r in rows), rows[0].shape[1])
    for i, r in enumerate(rows):
        cache.add(i, r)
    cache.freeze()
    return cache


def stream_order(manifest, reader, cache, seed, block_size=200):
    """Rows in the order ``fit --percent 1`` reads them."""
    rows = sample_rows(len(manifest), 1.0, seed)
    order = []
    for s in range(0, len(rows), block_size):
        order += [r for r, _ in FeatureSource(manifest, reader, 0, cache).read([int(x) for x in rows[s:s + block_size]])]
    return order


def streamed(utts, K, pool, batch, seed, passes=1, lloyd=False):
    """``fit``'s two-pass fit (reservoir, then streamed), with ``passes`` streamed passes and an
    optional last exact Lloyd step; returns the centroids (K, D)."""
    dim = utts[0].shape[1]
    skm = StreamingKMeans(K, dim, seed=seed, batch_size=batch, pool_size=pool)
    reservoir = ReservoirSample(skm.pool_size, dim, seed=seed)
    for u in utts:
        reservoir.add(u)
    skm.fit_initial(reservoir.data)
    for _ in range(passes):
        for u in utts:
            skm.add(u)
    C = np.asarray(skm.finish().cluster_centers_, dtype=np.float64)
    if lloyd:
        sums, counts = np.zeros_like(C), np.zeros(K)
        c = torch.from_numpy(C)
        for u in utts:
            a = torch.cdist(torch.from_numpy(u.astype(np.float64)), c).argmin(1).numpy()
            np.add.at(sums, a, u)
            np.add.at(counts, a, 1)
        C[counts > 0] = sums[counts > 0] / counts[counts > 0, None]
    return C


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a corpus directory of benchmarks/labels/run.py (e.g. WORK/n80)")
    p.add_argument("--features", default=None, help="(N, D) .npy of every frame (default WORKDIR/fs_feat/train_0_1.npy)")
    p.add_argument("--lengths", default=None, help="frames per utterance, text or .npy (default WORKDIR/fs_feat/train_0_1.len)")
    p.add_argument("--configs", nargs="+", default=["100:700", "50:700", "25:700", "10:700", "100:1400", "100:2800",
                                                    "100:4900"], help="K:pool pairs (mini-batch: half the pool)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--passes", type=int, nargs="*", default=[2, 3, 4],
                   help="also these numbers of streamed passes (first config only)")
    p.add_argument("--lloyd", action="store_true", help="also one and two streamed passes + a last Lloyd step "
                                                        "(first config only)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    manifest, X, utts, reader = load(args.workdir, args.features, args.lengths)
    cache = full_cache(utts)
    rows = []
    with threadpool_limits(args.threads), tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.threads)
        ref = {}
        for i, config in enumerate(args.configs):
            K, pool = (int(v) for v in config.split(":"))
            batch = pool // 2
            for seed in args.seeds:
                if (K, seed) not in ref:  # fairseq learn_kmeans' model of every frame, in memory
                    ref[K, seed] = objective_of(new_kmeans(K, seed=seed).fit(X).cluster_centers_, X)
            variants = [("fit", 1, False)]
            if i == 0:
                variants += [(f"{n} streamed passes", n, False) for n in args.passes]
                variants += [(f"{n} streamed pass{'es' if n > 1 else ''} + Lloyd step", n, True)
                             for n in ((1, 2) if args.lloyd else ())]
            for name, passes, lloyd in variants:
                gaps = []
                for seed in args.seeds:
                    order = stream_order(manifest, reader, cache, seed)
                    C = streamed([utts[r] for r in order], K, pool, batch, seed, passes, lloyd)
                    if name == "fit":  # the mirror is fit's own code path: same centroids
                        cfg = FitConfig(n_clusters=K, out=os.path.join(tmp, "km.joblib"), percent=1.0,
                                        batch_size=batch, seed=seed, pool_size=pool)
                        plan = make_plan("fit", Corpus(os.path.dirname(manifest.path), "train", check_headers=False),
                                         fit=cfg, reader=reader, progress=False)
                        km, meta = fit(replace(plan, source=replace(plan.source, cache=cache)))
                        assert meta["passes"] == 2 and np.allclose(km.cluster_centers_, C, rtol=0, atol=1e-5), \
                            "the mirror of fit's stream differs from fit"
                    gaps.append(objective_of(C, X) / ref[K, seed] - 1)
                row = {"K": K, "pool": pool, "batch": batch, "frames_per_cluster": pool / K,
                       "sample_over_pool": len(X) / pool, "variant": name, "teacher_passes": passes + 1 + lloyd,
                       "gaps": gaps, "mean_gap": float(np.mean(gaps))}
                rows.append(row)
                print(f"K={K} pool={pool} ({pool / K:.0f}/cluster, sample {len(X) / pool:.1f}x) {name}: "
                      + " ".join(f"{100 * g:+.2f}%" for g in gaps), flush=True)
    info = {"frames": int(len(X)), "dim": int(X.shape[1]), "seeds": args.seeds, "load_average_at_start": load0,
            "load_average_at_end": os.getloadavg(), "total_s": time.time() - t0, "args": vars(args),
            "in_memory_objective": {f"{k}:{s}": v for (k, s), v in ref.items()}}
    with open(os.path.join(args.workdir, "pool_study.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"\nk-means objective of every frame ({len(X)} frames, {X.shape[1]} dims), ours / fairseq's in-memory "
          f"fit - 1, seeds {' '.join(map(str, args.seeds))}:\n")
    print("| K | pool (frames per cluster) | sample / pool | variant | teacher passes over the sample | "
          "gap, mean | gap per seed |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['pool']} ({r['frames_per_cluster']:.0f}) | {r['sample_over_pool']:.1f}x | {r['variant']} | "
              f"{r['teacher_passes']} | {100 * r['mean_gap']:+.2f} % | "
              + " / ".join(f"{100 * g:+.2f} %" for g in r["gaps"]) + " |")
    print(f"\nload average {load0[0]:.1f} at the start, {info['load_average_at_end'][0]:.1f} at the end; "
          f"{info['total_s']:.0f} s")


if __name__ == "__main__":
    main()
