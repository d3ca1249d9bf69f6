"""Values an option accepts: converters that also validate, named in config fields' ``type`` metadata.

The library's config dataclasses declare their options (``field(metadata={"type": positive_int,
...})``); :mod:`~dicehubert_fairseq.cli_args` turns them into command-line options, where a bad
value is a usage error naming the option (``argparse.ArgumentTypeError``, exit status 2).
"""

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_list(text: str) -> list:
    """argparse type: comma-separated integers (``6,9,12``), at least one, no repeats (their range is
    the caller's to check: it can name the file that sets it)."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 6,9,12, got {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers, got {text!r}")
    return values
