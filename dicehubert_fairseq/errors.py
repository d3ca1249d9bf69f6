"""Errors for bad user input: they name the file (and line), what was expected, what was found."""

from typing import Iterable, Optional


class InputError(ValueError):
    """Bad input detected before (or instead of) doing expensive work.

    The message is one line per problem, each ``path[:line]: what was found (expected ...)``.
    """

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def where(path: str, line: Optional[int] = None) -> str:
    """``path`` or ``path:line`` (1-based line numbers, like editors and compilers)."""
    return f"{path}:{line}" if line is not None else str(path)
