"""Parameter counts of every experiment in config/ (and of the tiny example's presets) beside the
published students' sizes, as the Markdown table of docs/ablations.md ("Sizes").

Each config is composed exactly as ``fairseq-hydra-train`` composes it and its student built
(``dicehubert_student``, on the CPU); counted are the parameters a downstream user gets: the
student without HuBERT's pretraining heads (``final_proj``, ``label_embs_concat``: their size
follows K and the label streams) and without the feature-distillation heads of the L_feat rows
(training only, dropped by ``dicehubert-export``), which are counted in a column of their own.
The overrides on the command lines of docs/ablations.md change no parameter count (labels,
weights, initialisation, optimisation), so a config's count is every one of its rows'.

    python -m benchmarks.sizes.param_counts            # print the table
    python -m benchmarks.sizes.param_counts --write    # replace it in docs/ablations.md

``tests/e2e/test_sizes.py`` checks that the table in docs/ablations.md is what this computes.
"""

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import torch
from omegaconf import OmegaConf

import dicehubert_fairseq  # noqa: F401  (registers the plugin)
from dicehubert_fairseq.models.dicehubert_student import DiceHubertStudent
from tests.helpers.config import CONFIG_DIR, compose

DOC = os.path.join(os.path.dirname(CONFIG_DIR), "docs", "ablations.md")
BEGIN = "<!-- sizes: python -m benchmarks.sizes.param_counts --write -->"
END = "<!-- end of sizes -->"
#: HuBERT's pretraining heads (their size follows K) and the L_feat heads (training only).
PRETRAINING_HEADS = ("label_embs_concat", "final_proj", "target_glu")
FEAT_HEADS = ("feat_heads",)

#: The published sizes the paper's comparison is read against, with where each comes from.
PUBLISHED = {
    "HuBERT Base": ("94.7M", "HuBERT (Hsu et al. 2021), 12 x 768"),
    "DistilHuBERT": ("23.49M", "DistilHuBERT (Chang et al. 2022), 2 x 768, HuBERT's front end"),
    "FitHuBERT": ("22.49M", "FitHuBERT (Lee et al. 2022), 12 x 480, FFN 480, a thinner front end"),
    "MaskHuBERT": ("26.64M", "sungnyun/ARMHuBERT's README, 12 x 480, FFN 640, a thinner front end"),
}
#: The published student a row stands beside, and whether it is that very architecture.
COUNTERPART = {
    "hubert_base_scratch": ("HuBERT Base", "same architecture; 94.7M counts the heads for K = 500"),
    "dicehubert_shallow_l6": ("DistilHuBERT", "same architecture"),
    "dicehubert_shallow_l6_init": ("DistilHuBERT", "same architecture"),
    "feat_shallow_l6": ("DistilHuBERT", "same architecture"),
    "ssl_feat_shallow_l6": ("DistilHuBERT", "same architecture"),
    "maskdistil_shallow_l6": ("DistilHuBERT", "same architecture"),
    "feat_narrow": ("FitHuBERT", "FitHuBERT's loss on our narrow student, not its architecture"),
    "maskdistil_narrow": ("MaskHuBERT", "MaskHuBERT's loss on our narrow student, not its architecture"),
}
#: The tiny example's student presets, each on a row that uses it there (its teacher is the
#: experiment file ``tiny_teacher``).
TINY = [("dicehubert_narrow", "model=tiny_narrow"), ("dicehubert_shallow_l6", "model=tiny_shallow"),
        ("dicehubert_shallow_l4", "model=tiny_shallow_l4"), ("dicehubert_narrow", "model=tiny_conv")]
PATHS = ["task.data=D", "task.label_dir=L", "run=cpu"]  # a teacher is never loaded: its path may stay ???


def experiments() -> List[str]:
    """Every experiment file in config/ (the rows of docs/ablations.md and the other experiments)."""
    return sorted(os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


_COUNTS: Dict[str, Dict[str, object]] = {}


def count(name: str, overrides: Sequence[str] = ()) -> Dict[str, object]:
    """Build ``name``'s student (K = 100 per label stream) and count its parameters (once per model
    config: the rows that share a student share its count).

    Returns:
        dict: ``student`` (no pretraining or L_feat heads), ``feat_heads``, ``describe``.
    """
    cfg = compose(name, PATHS + list(overrides) + ["model.init_from_teacher=null"])
    key = json.dumps([OmegaConf.to_container(cfg.model), len(cfg.task.labels)], sort_keys=True)
    if key not in _COUNTS:
        _COUNTS[key] = _count(cfg)
    return _COUNTS[key]


def _count(cfg) -> Dict[str, object]:
    torch.manual_seed(0)
    model = DiceHubertStudent(cfg.model, cfg.task, [list(range(104))] * len(cfg.task.labels))
    params = dict(model.named_parameters())
    student = sum(p.numel() for k, p in params.items() if not k.startswith(PRETRAINING_HEADS + FEAT_HEADS))
    feat = sum(p.numel() for k, p in params.items() if k.startswith(FEAT_HEADS))
    m = cfg.model
    front = model.feature_extractor.conv_layers[0][0].out_channels
    kind = {"transformer": "transformer", "conformer": "conformer", "conv": "convolution-only"}[str(m.layer_type)]
    describe = f"{m.encoder_layers} x {m.encoder_embed_dim} {kind}, FFN {m.encoder_ffn_embed_dim}, front end {front}"
    return {"student": student, "feat_heads": feat, "describe": describe}


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def table_rows() -> List[Tuple[str, Dict[str, object], str]]:
    """``(config as typed, counts, name of the published counterpart or "")`` per row."""
    rows = [(name, count(name), name) for name in experiments()]
    return rows + [(f"{name} {ov}", count(name, [ov]), "") for name, ov in TINY]


def markdown() -> str:
    """The "Sizes" table, between its markers (what ``--write`` puts into docs/ablations.md)."""
    lines = [BEGIN, "",
             "| config | student | parameters | L_feat heads (training only) | published counterpart |",
             "|---|---|---|---|---|"]
    for label, c, name in table_rows():
        heads = millions(c["feat_heads"]) if c["feat_heads"] else "-"
        ref = COUNTERPART.get(name)
        published = f"{ref[0]} {PUBLISHED[ref[0]][0]}: {ref[1]}" if ref else "-"
        lines.append(f"| `{label}` | {c['describe']} | {millions(c['student'])} | {heads} | {published} |")
    lines += ["", "Published: " + "; ".join(f"{k} {v[0]} ({v[1]})" for k, v in PUBLISHED.items())
              + ".", "", END]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``table``."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"{DOC}: no '{BEGIN}' ... '{END}' markers (expected in the 'Sizes' section)")
    return text[:start] + table + text[stop + len(END):]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sizes.param_counts", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"replace the table in {os.path.relpath(DOC)}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table = markdown()
    if args.write:
        with open(DOC, encoding="utf-8") as f:
            text = replace_table(f.read(), table)
        tmp = DOC + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, DOC)
    else:
        print(table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
