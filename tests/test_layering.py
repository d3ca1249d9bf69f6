"""No library module imports a CLI module: ``cli.py``, ``__main__.py``, ``cli_args`` and ``cli_errors`` sit
on top of the library, which logs and raises (the CLIs print)."""

import ast
import glob
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dicehubert_fairseq")
CLI_MODULES = {"cli", "cli_args", "cli_errors", "__main__"}
LIBRARY = sorted(p for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
                 if os.path.splitext(os.path.basename(p))[0] not in CLI_MODULES)


def imported_modules(source: str):
    """The last component of every module a source imports (``from ..cli_args import x`` -> ``cli_args``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.module:
                yield node.module.split(".")[-1]
            else:  # from . import cli
                yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[-1] for alias in node.names)


def test_imports_by_hand():
    assert list(imported_modules("from ..cli_args import int_list\nfrom . import cli, x\nimport a.b.cli_errors\n")) == [
        "cli_args", "cli", "x", "cli_errors"]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: os.path.relpath(p, PACKAGE))
def test_library_module_imports_no_cli_module(path):
    with open(path, encoding="utf-8") as f:
        found = set(imported_modules(f.read())) & CLI_MODULES
    assert not found, f"{os.path.relpath(path, PACKAGE)} imports {sorted(found)}"
