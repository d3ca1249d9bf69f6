"""Functions a reader can hold: no function in ``labels/`` over 60 lines of code, no module of the package over 400 lines.

Lines of code: the lines of a function's body but its docstring, blank lines and comment-only
lines (a nested function counts towards the function it is in, and on its own).
"""

import ast
import glob
import io
import os
import tokenize

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dicehubert_fairseq")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
MODULES = sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))
LABELS = [p for p in MODULES if os.sep + "labels" + os.sep in p]


def code_lines(source: str) -> set:
    """Numbers of the lines holding a token other than a comment, a newline or an indent."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def function_sizes(source: str):
    """``(name, first line, lines of code)`` of every function and method of a module's source."""
    lines = code_lines(source)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = set(range(node.lineno, node.end_lineno + 1)) & lines
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                body -= set(range(first.lineno, first.end_lineno + 1))
            yield node.name, node.lineno, len(body)


def test_counting_by_hand():
    source = 'def f(x):\n    """Doc.\n\n    More.\n    """\n    # a comment\n\n    y = (x +\n         1)\n    return y\n'
    assert list(function_sizes(source)) == [("f", 1, 4)]  # def, the two lines of y, return


@pytest.mark.parametrize("path", LABELS, ids=lambda p: os.path.relpath(p, PACKAGE))
def test_no_function_in_labels_over_60_lines(path):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    long = [f"{name} (line {line}): {n} lines" for name, line, n in function_sizes(source) if n > MAX_FUNCTION_LINES]
    assert not long, f"{os.path.relpath(path, PACKAGE)}: functions over {MAX_FUNCTION_LINES} lines of code: {long}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: os.path.relpath(p, PACKAGE))
def test_no_module_over_400_lines(path):
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= MAX_MODULE_LINES, f"{os.path.relpath(path, PACKAGE)}: {n} lines (at most {MAX_MODULE_LINES})"
