"""Training updates/s of `dicehubert_student` + `dicehubert` criterion vs fairseq's own
`hubert` model + `hubert` criterion at identical dimensions, on the same batches, on CPU.

Both run in this one process, interleaved (A, B, A, B, ...) so drift in machine load hits
both equally.  Prints a table and writes JSON.

    python -m benchmarks.core.bench_train_step [--preset narrow] [--steps 20] [--json out.json]
"""

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

import dicehubert_fairseq  # noqa: F401
from fairseq import tasks
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import MODEL_DATACLASS_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY
from tests.helpers.config import CONFIG_DIR
from tests.helpers.data import write_corpus, write_random_labels


def build(kind, data, labels, model_cfg):
    task_name, model_name, crit_name = {
        "fairseq": ("hubert_pretraining", "hubert", "hubert"),
        "dicehubert": ("dicehubert", "dicehubert_student", "dicehubert"),
    }[kind]
    tcfg = merge_with_parent(TASK_DATACLASS_REGISTRY[task_name](), OmegaConf.create(
        {"_name": task_name, "data": data, "label_dir": labels, "labels": ["km"], "label_rate": 50.0,
         "max_sample_size": 250000, "min_sample_size": 0, "pad_audio": False, "random_crop": True}))
    mcfg = dict(model_cfg, _name=model_name, label_rate=50.0)
    mcfg.pop("init_from_teacher", None)
    mcfg = merge_with_parent(MODEL_DATACLASS_REGISTRY[model_name](), OmegaConf.create(mcfg))
    ccfg = merge_with_parent(CRITERION_DATACLASS_REGISTRY[crit_name](), OmegaConf.create(
        {"_name": crit_name, "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0, "loss_weights": [10.0]}))
    task = tasks.setup_task(tcfg)
    torch.manual_seed(0)
    model = task.build_model(mcfg)
    criterion = task.build_criterion(ccfg)
    task.load_dataset("train")
    return task, model, criterion


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="narrow",
                   help="config/model/<preset>.yaml on config/recipe/hubert.yaml's model (default: narrow)")
    p.add_argument("--batch", type=int, default=4, help="utterances per batch")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per utterance")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="measured updates per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is a clean measure)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)

    # the recipe's model settings (fairseq's HuBERT Base recipe), then the preset's size
    with open(os.path.join(CONFIG_DIR, "recipe", "hubert.yaml")) as f:
        model_cfg = yaml.safe_load(f)["model"]
    with open(os.path.join(CONFIG_DIR, "model", f"{args.preset}.yaml")) as f:
        model_cfg.update(yaml.safe_load(f) or {})
    model_cfg["encoder_layerdrop"] = 0.0  # identical work every step
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_corpus(os.path.join(tmp, "data"), {"train": args.batch},
                             seconds=(args.seconds, args.seconds + 1e-3))
        write_random_labels(os.path.join(tmp, "labels"), sizes, "km", args.clusters)
        runs = {}
        for kind in ("fairseq", "dicehubert"):
            task, model, crit = build(kind, os.path.join(tmp, "data"), os.path.join(tmp, "labels"), model_cfg)
            ds = task.datasets["train"]
            batch = ds.collater([ds[i] for i in range(args.batch)])
            opt = torch.optim.Adam(model.parameters(), lr=5e-4)
            model.train()
            runs[kind] = {"model": model, "crit": crit, "batch": batch, "opt": opt, "times": []}

        def step(r):
            t0, c0 = time.perf_counter(), time.process_time()
            r["opt"].zero_grad()
            loss, _, _ = r["crit"](r["model"], r["batch"])
            loss.backward()
            r["opt"].step()
            return time.perf_counter() - t0, time.process_time() - c0

        for i in range(args.warmup + args.steps):
            for kind in (("fairseq", "dicehubert") if i % 2 == 0 else ("dicehubert", "fairseq")):
                torch.manual_seed(1000 + i)  # same masks for both
                np.random.seed(1000 + i)
                dt, cpu = step(runs[kind])
                if i >= args.warmup:
                    runs[kind]["times"].append(dt)
                    runs[kind].setdefault("cpu", []).append(cpu)

    res = {"preset": args.preset, "batch": args.batch, "seconds": args.seconds, "clusters": args.clusters,
           "threads": args.threads, "steps": args.steps,
           "params": sum(q.numel() for q in runs["dicehubert"]["model"].parameters())}
    for kind, r in runs.items():
        med, cpu = statistics.median(r["times"]), statistics.median(r["cpu"])
        res[kind] = {"median_wall_s": med, "median_cpu_s": cpu, "updates_per_cpu_s": 1.0 / cpu}
    # CPU time of this process: robust to other jobs on the machine (wall time is not)
    res["ratio_updates_per_s"] = res["dicehubert"]["updates_per_cpu_s"] / res["fairseq"]["updates_per_cpu_s"]
    res["ratio_wall"] = res["fairseq"]["median_wall_s"] / res["dicehubert"]["median_wall_s"]
    print(f"{'model':<34}{'CPU s/update':>14}{'wall s/update':>15}")
    for kind, label in (("fairseq", "fairseq hubert + hubert criterion"), ("dicehubert", "dicehubert_student + dicehubert")):
        print(f"{label:<34}{res[kind]['median_cpu_s']:>14.4f}{res[kind]['median_wall_s']:>15.4f}")
    print(f"ratio of updates/s, dicehubert / fairseq: {res['ratio_updates_per_s']:.3f} (CPU time), "
          f"{res['ratio_wall']:.3f} (wall)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
