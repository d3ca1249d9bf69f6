"""Command-line options generated from dataclasses (cli_args), and the CLIs' options kept as they were."""

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
from omegaconf import MISSING

from dicehubert_fairseq.cli_args import add_arguments, from_args
from dicehubert_fairseq.option_types import int_list, positive_int
from dicehubert_fairseq.export.cli import build_parser as export_parser
from dicehubert_fairseq.labels.cli import build_parser as labels_parser
from dicehubert_fairseq.probe.cli import build_parser as probe_parser


@dataclass
class _Config:
    path: str = field(default=MISSING, metadata={"help": "required"})
    data: str = field(default="d", metadata={"help": "an option, not a positional (unlike fairseq's generator)"})
    count: int = field(default=3, metadata={"help": "validated", "type": positive_int})
    limit: Optional[float] = field(default=None, metadata={"help": "optional", "metavar": "X"})
    names: List[str] = field(default_factory=lambda: ["km"], metadata={"help": "a list"})
    splits: Optional[List[str]] = field(default=None, metadata={"help": "repeatable", "action": "append"})
    mode: str = field(default="a", metadata={"help": "a choice", "choices": ("a", "b")})
    fast: bool = field(default=False, metadata={"help": "a switch", "argparse_alias": "-f"})
    progress: bool = field(default=True, metadata={"help": "a negative switch", "flag": "--no-progress"})


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p, _Config)
    return from_args(_Config, p.parse_args(list(argv)))


def test_fields_become_options_with_their_types_and_defaults():
    assert _parse("--path", "p") == _Config(path="p")
    cfg = _parse("--path", "p", "--data", "x", "--count", "7", "--limit", "0.5", "--names", "a", "b", "--splits", "s1",
                 "--splits", "s2", "--mode", "b", "-f", "--no-progress")
    assert cfg == _Config(path="p", data="x", count=7, limit=0.5, names=["a", "b"], splits=["s1", "s2"], mode="b",
                          fast=True, progress=False)


@pytest.mark.parametrize("argv", [[], ["--path", "p", "--count", "0"], ["--path", "p", "--mode", "c"],
                                  ["--path", "p", "--count", "x"]])
def test_missing_or_invalid_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2
    capsys.readouterr()


def test_exclusive_group_needs_exactly_one(capsys):
    @dataclass
    class Source:
        checkpoint: Optional[str] = field(default=None, metadata={"help": "a"})
        mfcc: bool = field(default=False, metadata={"help": "b"})

    p = argparse.ArgumentParser()
    add_arguments(p, Source, exclusive=[("checkpoint", "mfcc")])
    assert from_args(Source, p.parse_args(["--mfcc"])) == Source(mfcc=True)
    for argv in ([], ["--mfcc", "--checkpoint", "c"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    capsys.readouterr()



def test_list_field_in_one_comma_separated_token(capsys):
    @dataclass
    class Layers:
        layer: Optional[List[int]] = field(default=None, metadata={"help": "l", "type": int_list, "nargs": None})

    p = argparse.ArgumentParser()
    add_arguments(p, Layers)
    assert from_args(Layers, p.parse_args(["--layer", "6,9,12"])) == Layers(layer=[6, 9, 12])
    assert from_args(Layers, p.parse_args(["--layer", "9"])) == Layers(layer=[9])
    assert from_args(Layers, p.parse_args([])) == Layers()
    assert from_args(Layers, p.parse_args(["--layer", "0"])) == Layers(layer=[0])  # the range is the reader's
    for argv in (["--layer", "6", "9"], ["--layer", "6,x"], ["--layer", "6,6"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    capsys.readouterr()

def test_positional_fields(capsys):
    @dataclass
    class Command:
        source: str = field(default=MISSING, metadata={"help": "first", "positional": True, "metavar": "SRC"})
        to: str = field(default=MISSING, metadata={"help": "an option between them", "choices": ("a", "b")})
        out: str = field(default=MISSING, metadata={"help": "second", "positional": True})

    p = argparse.ArgumentParser()
    add_arguments(p, Command)
    assert from_args(Command, p.parse_args(["s", "--to", "a", "o"])) == Command(source="s", to="a", out="o")
    assert "SRC" in p.format_usage()
    for argv in (["s", "--to", "a"], ["--to", "a"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    capsys.readouterr()


def _options(parser):
    """{option strings: default} of a parser, per subcommand."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: _options(sub) for name, sub in action.choices.items()}
        if action.option_strings and action.dest != "help":
            out[" ".join(sorted(action.option_strings))] = action.default
    return out


#: The options (and defaults) dicehubert-labels and dicehubert-probe had when their parsers were
#: declared by hand; the docs and scripts use them. A switch ``--no-x`` keeps x True by default.
COMMON = {"--debug": False, "--verbose": False, "--no-progress": True}
FEATURES = {"--checkpoint": None, "--mfcc": False, "--layer": None, "--device": "cpu", "--dtype": "float32",
            "--sample-rate": 16000, "--max-batch-seconds": None, "--max-chunk": 1600000, "--manifest-dir": None,
            "--no-header-check": True, "--threads": None}
LABELS = {
    "fit": {**COMMON, **FEATURES, "--split": "train", "--n-clusters": None, "--out": None, "--percent": 1.0,
            "--batch-size": 10000, "--seed": 0, "--pool-size": None, "--n-init": 20, "--max-iter": 100,
            "--block-size": 200, "--normalize": False, "--report-temperatures": [1.0, 5.0, 10.0],
            "--report-frames": 10000},
    "dump": {**COMMON, **FEATURES, "--split": None, "--km": None, "--label-dir": None, "--name": "km",
             "--soft": False, "--temperature": 1.0, "--temperature-gap": None, "--top-k": 10, "--normalize": None,
             "--nshard": 1, "--rank": 0,
             "--block-size": 200},
    # fit + dump in one process: fit's options and dump's but --km (the model it fits), --nshard and
    # --rank (one process), a second --block-size (fit's serves both) and dump's --normalize (fit's
    # sets the mode, stored in the model, which the labels follow)
    "run": {**COMMON, **FEATURES, "--split": None, "--n-clusters": None, "--out": None, "--percent": 1.0,
            "--batch-size": 10000, "--seed": 0, "--pool-size": None, "--n-init": 20, "--max-iter": 100,
            "--block-size": 200, "--normalize": False, "--report-temperatures": [1.0, 5.0, 10.0],
            "--report-frames": 10000, "--label-dir": None, "--name": "km", "--soft": False, "--temperature": 1.0,
            "--temperature-gap": None, "--top-k": 10},
    "merge": {**COMMON, "--label-dir": None, "--split": None, "--nshard": None, "--name": "km",
              "--manifest-dir": None, "--out-dir": None},
    "check": {**COMMON, "--manifest-dir": None, "--label-dir": None, "--labels": ["km"], "--label-rate": 50.0,
              "--split": None, "--sample-rate": 16000, "--tolerance": 0.1, "--no-audio-headers": True},
    "quality": {**COMMON, "--label-dir": None, "--labels": ["km"], "--split": "valid", "--align": None,
                "--align-rate": 100.0, "--label-rate": 50.0, "--tolerance": 0.1, "--exclude": [], "--json": None},
}
PROBE = {"--checkpoint": None, "--data": None, "--train-split": "train", "--valid-split": "valid",
         "--test-split": "test", "--json": None, "--epochs": 30, "--lr": 0.01, "--batch-size": 8, "--patience": 10,
         "--seed": 0, "--device": "cpu", "--threads": 1, "--max-train-utterances": None, "--unseen-phones": "unk",
         "--max-cache-gb": None, "--layers": None, "--quiet -q": False, "--debug": False}


def test_labels_options_and_defaults_unchanged():
    assert _options(labels_parser()) == LABELS


def test_probe_options_and_defaults_unchanged():
    assert _options(probe_parser()) == PROBE


def test_export_options_and_defaults_unchanged():
    assert _options(export_parser()) == {"--to": None, "--force": False, "--no-check": True, "--quiet -q": False,
                                         "--debug": False}
    args = export_parser().parse_args(["ckpt.pt", "--to", "hf", "out_hf", "--no-check"])
    assert (args.checkpoint, args.target, args.out, args.check) == ("ckpt.pt", "hf", "out_hf", False)
