"""Command-line options generated from config dataclasses: every option is declared once, as a field.

The fields are fairseq-style (``field(default=..., metadata={"help": ...})``); like fairseq's
``gen_parser_from_dataclass`` each becomes ``--field-name`` with the field's type, default and
help. Unlike it, list fields take space-separated values (``--labels km mfcc``) and a field named
``data`` stays an option, as this project's command lines always had them. Optional metadata:

* ``flag``: the option's name when it is not ``--field-name`` (e.g. ``--no-progress`` for
  ``progress: bool = True``); ``argparse_alias``: a second name (fairseq's key, e.g. ``-q``);
* ``type``: a converter that also validates (:mod:`~dicehubert_fairseq.option_types`: a bad
  value is a usage error, exit status 2); ``choices``, ``metavar``; ``action="append"`` for a repeatable option;
  ``nargs``: for a list field, overrides ``+`` (``None``: one token, which ``type`` turns into
  the list, e.g. :func:`~dicehubert_fairseq.option_types.int_list` for ``--layer 6,9,12``);
* ``positional``: a positional argument instead of an option (required: no default).

A ``bool`` field is a switch: ``store_true`` when it defaults to False, ``store_false`` (under
its ``flag``) when it defaults to True. A field without a default (``MISSING``) is required.
"""

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Sequence, Type, TypeVar

from omegaconf import MISSING

T = TypeVar("T")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING if f.default is dataclasses.MISSING else f.default


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, config: type,
                  exclusive: Iterable[Sequence[str]] = (), skip: Iterable[str] = ()) -> None:
    """Add one option per field of the dataclass ``config`` to ``parser`` (rules: module docstring).

    Args:
        parser: the parser (or subcommand parser).
        config: a dataclass type.
        exclusive: groups of field names of which exactly one must be given.
        skip: fields that get no option (the command sets them: pass them to :func:`from_args`).
    """
    skip = set(skip)
    groups = {}
    for names in exclusive:
        group = parser.add_mutually_exclusive_group(required=True)
        for name in names:
            groups[name] = group
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        meta = f.metadata
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta.get("help"), type=meta.get("type", _unwrap(f.type)),
                                **{k: meta[k] for k in ("choices", "metavar") if k in meta})
            continue
        flags = [meta.get("flag", "--" + f.name.replace("_", "-"))]
        if "argparse_alias" in meta:
            flags.append(meta["argparse_alias"])
        default = _default(f)
        kwargs = {"dest": f.name, "help": meta.get("help")}
        annotation = _unwrap(f.type)
        if annotation is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            if typing.get_origin(annotation) in (list, typing.List):
                annotation = typing.get_args(annotation)[0]
                if "nargs" in meta:
                    if meta["nargs"] is not None:
                        kwargs["nargs"] = meta["nargs"]
                elif meta.get("action") != "append":
                    kwargs["nargs"] = "+"
            kwargs["type"] = meta.get("type", annotation)
            for key in ("choices", "metavar", "action"):
                if key in meta:
                    kwargs[key] = meta[key]
            if default is MISSING:
                kwargs["required"] = f.name not in groups
            elif default is not None:
                kwargs["help"] = f"{kwargs['help']} (default: %(default)s)"
        if default is not MISSING:
            kwargs["default"] = default
        groups.get(f.name, parser).add_argument(*flags, **kwargs)


def from_args(config: Type[T], args: argparse.Namespace, **values: Any) -> T:
    """The dataclass ``config`` filled from the parsed options :func:`add_arguments` declared
    (``values``: fields set by the command instead, e.g. those it skipped)."""
    return config(**{f.name: values[f.name] if f.name in values else getattr(args, f.name)
                     for f in dataclasses.fields(config)})
