"""Time per training update of the ablation rows, side by side on CPU, in one process.

* hard vs soft labels: ``dicehubert_<student>`` vs the same with ``+data=soft`` (the
  ``dicehubert_narrow_soft`` row): K clusters, soft targets kept to their top-k;
* L_SSL vs L_feat: ``dicehubert_<student>`` vs ``feat_<student>`` (frozen HuBERT Base-sized
  teacher run on the fly, every layer the student predicts).

Configs are composed from config/ exactly as fairseq-hydra-train composes them (full-size
presets, fp32 on CPU). An update is what training does per batch: read the utterances and
collate them (soft labels are read from their memory-mapped arrays here), criterion forward,
backward, Adam step. Variants run interleaved, one update each per round, on the same batches,
so drift in machine load hits all of them. Reported per update: the median wall time and the
median CPU time of this process. On a machine shared with other jobs, the CPU time with one
thread (the default) is the robust figure: it does not count time spent waiting for a core
(with several threads, OpenMP spin-waits inflate it instead).

    python -m benchmarks.ablations.bench_ablations [--student narrow] [--teacher CKPT] [--json OUT]

Without --teacher a randomly initialised HuBERT Base-sized checkpoint (12 x 768, the same
compute as hubert_base_ls960.pt) is written to the work directory.
"""

import argparse
import json
import logging
import os
import statistics
import time

import numpy as np
import torch

import dicehubert_fairseq  # noqa: F401
from tests.helpers.config import build, compose
from dicehubert_fairseq.data.files import SoftLabelWriter, write_dictionary
from tests.helpers.data import num_frames, write_checkpoint, write_corpus

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(os.path.dirname(HERE), "work", "ablations")

#: HuBERT Base: the paper's teacher.
BASE = {"encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
        "encoder_attention_heads": 12, "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        "final_dim": 256, "conv_pos": 128, "conv_pos_groups": 16}


def write_labels(label_dir, sizes, n_clusters, top_k, seed=0):
    """Hard labels ``km`` and soft labels ``kms`` (top-k of a random distribution), K clusters."""
    rng = np.random.default_rng(seed)
    os.makedirs(label_dir, exist_ok=True)
    for split, lens in sizes.items():
        writer = SoftLabelWriter(label_dir, split, "kms", n_clusters=n_clusters, top_k=top_k, meta={"temperature": 5.0})
        hard, soft_hard = [], []
        for size in lens:
            T = num_frames(size, 50)
            logits = rng.standard_normal((T, n_clusters)) * 3
            ids = np.argsort(-logits, axis=1)[:, :top_k]
            p = np.exp(np.take_along_axis(logits, ids, 1))
            writer.add(ids, p / p.sum(1, keepdims=True))
            soft_hard.append(" ".join(map(str, ids[:, 0])))
            hard.append(" ".join(map(str, rng.integers(0, n_clusters, T))))
        writer.close()
        for name, lines in (("km", hard), ("kms", soft_hard)):
            with open(os.path.join(label_dir, f"{split}.{name}"), "w") as f:
                f.write("\n".join(lines) + "\n")
    for name in ("km", "kms"):
        write_dictionary(os.path.join(label_dir, f"dict.{name}.txt"), n_clusters)


def setup(name, overrides, args, data, labels, teacher):
    common = [f"task.data={data}", f"task.label_dir={labels}", "run=cpu", "task.min_sample_size=0",
              "model.encoder_layerdrop=0.0"]  # identical work every update
    if name.startswith("feat_"):
        common.append(f"criterion.teacher_checkpoint={teacher}")
    cfg = compose(name, common + list(overrides))
    torch.manual_seed(0)
    task, model, crit = build(cfg)
    task.load_dataset("train")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    return {"cfg": cfg, "task": task, "ds": task.datasets["train"], "model": model, "crit": crit, "opt": opt,
            "times": [], "cpu_times": [], "data_times": []}


def update(r, group, seed):
    """One training update; returns (wall s, CPU s, wall s of reading + collating)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    c0, t0 = time.process_time(), time.perf_counter()
    ds = r["ds"]
    sample = ds.collater([ds[i] for i in group])
    t1 = time.perf_counter()
    r["opt"].zero_grad()
    loss, _, _ = r["crit"](r["model"], sample)
    loss.backward()
    r["opt"].step()
    t2, c2 = time.perf_counter(), time.process_time()
    return t2 - t0, c2 - c0, t1 - t0


def label_work(r, group, reps):
    """CPU seconds of the only work that differs between hard and soft labels, per update:
    reading + collating the batch, and the label loss (forward and backward) on the masked
    frames' logits (taken from one real forward of the model)."""
    ds, model, crit = r["ds"], r["model"], r["crit"]
    sample = ds.collater([ds[i] for i in group])
    with torch.no_grad():
        out = model(target_list=sample["target_list"], soft_target_list=sample.get("soft_target_list"),
                    **sample["net_input"])
    c0 = time.process_time()
    for _ in range(reps):
        ds.collater([ds[i] for i in group])
    c1 = time.process_time()
    for _ in range(reps):
        logits = [x.detach().requires_grad_() for x in out["logit_m_list"]]
        loss = crit.stream_loss(dict(out, logit_m_list=logits), "m", {})
        loss.backward()
    c2 = time.process_time()
    return (c1 - c0) / reps, (c2 - c1) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="narrow", choices=["narrow", "shallow_l6", "shallow_l4"],
                   help="student preset (rows dicehubert_<student>, feat_<student>)")
    p.add_argument("--teacher", help="teacher checkpoint for L_feat (default: random HuBERT Base-sized)")
    p.add_argument("--batch", type=int, default=2, help="utterances per update (default 2)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per utterance (default 2)")
    p.add_argument("--clusters", type=int, default=500,
                   help="K (default 500, fairseq's HuBERT iteration-2 setting: five times the paper's K = 100, "
                        "the harder case for soft labels)")
    p.add_argument("--top-k", type=int, default=10, help="soft classes kept per frame (dicehubert-labels default 10)")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds, one update per variant each (default 6)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured updates per variant first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see above)")
    p.add_argument("--isolated-reps", type=int, default=50,
                   help="repetitions of the isolated label-work measurement (default 50)")
    p.add_argument("--only", nargs="*", choices=["hard", "soft", "feat"], help="subset of variants")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)

    os.makedirs(WORK, exist_ok=True)
    data, labels = os.path.join(WORK, "data"), os.path.join(WORK, "labels")
    n_utt = args.batch * 2
    sizes = write_corpus(data, {"train": n_utt}, seconds=(args.seconds, args.seconds + 1e-3), seed=0)
    write_labels(labels, sizes, args.clusters, args.top_k)
    teacher = args.teacher
    if teacher is None and (not args.only or "feat" in args.only):
        teacher = os.path.join(WORK, "teacher_base_random.pt")
        if not os.path.isfile(teacher):
            write_checkpoint(teacher, data, labels, model_overrides=BASE)

    s = args.student
    variants = {
        "hard": (f"dicehubert_{s}", ["task.labels=[km]"]),
        "soft": (f"dicehubert_{s}", ["+data=soft", "task.labels=[kms]", "task.soft_labels=[kms]"]),
        "feat": (f"feat_{s}", []),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    runs = {k: setup(name, ov, args, data, labels, teacher) for k, (name, ov) in variants.items()}
    groups = [list(range(i, i + args.batch)) for i in range(0, n_utt, args.batch)]

    step = 0
    for rnd in range(-args.warmup, args.rounds):
        k = rnd % len(runs)  # rotate, so every variant runs in every position equally often
        order = list(runs)[k:] + list(runs)[:k]
        group = groups[step % len(groups)]
        for kind in order:
            dt, dc, dd = update(runs[kind], group, 1000 + step)
            if rnd >= 0:
                runs[kind]["times"].append(dt)
                runs[kind]["cpu_times"].append(dc)
                runs[kind]["data_times"].append(dd)
        step += 1

    res = {"student": s, "batch": args.batch, "seconds_per_utterance": args.seconds, "clusters": args.clusters,
           "top_k": args.top_k, "threads": args.threads, "rounds": args.rounds,
           "teacher": "random HuBERT Base-sized" if args.teacher is None else args.teacher,
           "torch": torch.__version__, "variants": {}}
    for kind, r in runs.items():
        res["variants"][kind] = {
            "config": variants[kind][0] + (" " + " ".join(variants[kind][1]) if variants[kind][1] else ""),
            "wall_median_s": statistics.median(r["times"]), "wall_min_s": min(r["times"]),
            "cpu_median_s": statistics.median(r["cpu_times"]), "cpu_min_s": min(r["cpu_times"]),
            "collate_median_s": statistics.median(r["data_times"]),
            "student_params": sum(q.numel() for q in r["model"].parameters()),
        }
    v = res["variants"]
    if "hard" in runs and "soft" in runs:
        iso = {kind: label_work(runs[kind], groups[0], args.isolated_reps) for kind in ("hard", "soft")}
        extra = sum(iso["soft"]) - sum(iso["hard"])
        res["label_work_cpu_s"] = {kind: {"collate": c, "loss": l} for kind, (c, l) in iso.items()}
        res["soft_extra_cpu_s"] = extra
        res["soft_extra_fraction"] = extra / v["hard"]["cpu_median_s"]
    for a, b, key in (("soft", "hard", "soft_over_hard"), ("feat", "hard", "feat_over_ssl")):
        if a in v and b in v:
            res[key] = {m: v[a][f"{m}_median_s"] / v[b][f"{m}_median_s"] for m in ("cpu", "wall")}

    print(f"student {s}, {args.batch} x {args.seconds:g} s of audio per update, K={args.clusters}, "
          f"top-k {args.top_k}, {args.threads} thread(s), {args.rounds} rounds, fp32 CPU")
    print(f"{'variant':<8}{'config':<70}{'CPU s':>8}{'wall s':>8}{'min wall':>9}{'collate':>9}")
    for kind, x in v.items():
        print(f"{kind:<8}{x['config']:<70}{x['cpu_median_s']:>8.3f}{x['wall_median_s']:>8.3f}"
              f"{x['wall_min_s']:>9.3f}{x['collate_median_s']:>9.3f}")
    if "soft_over_hard" in res:
        r = res["soft_over_hard"]
        print(f"soft / hard time per update: CPU {r['cpu']:.3f}, wall {r['wall']:.3f}  (target <= 1.05)")
    if "soft_extra_cpu_s" in res:
        w = res["label_work_cpu_s"]
        print(f"label work alone (CPU ms per update, collate + loss): hard {1e3 * w['hard']['collate']:.2f} + "
              f"{1e3 * w['hard']['loss']:.2f}, soft {1e3 * w['soft']['collate']:.2f} + {1e3 * w['soft']['loss']:.2f}"
              f" -> soft costs {1e3 * res['soft_extra_cpu_s']:+.2f} ms = {100 * res['soft_extra_fraction']:+.2f}% "
              f"of a hard update")
    if "feat_over_ssl" in res:
        r = res["feat_over_ssl"]
        print(f"L_feat / L_SSL time per update: CPU {r['cpu']:.3f}, wall {r['wall']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
