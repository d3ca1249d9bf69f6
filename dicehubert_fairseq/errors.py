"""Errors for bad user input: they name the file (and line), what was expected, what was found."""

from typing import Dict, Iterable, List, Optional

#: Problems listed per file before the rest of that file's problems are only counted.
MAX_REPORTED = 20


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


class Problems:
    """Problems found in input files: the first ``limit`` of each file listed, the rest counted.

    Args:
        limit: messages kept per file (default :data:`MAX_REPORTED`).
    """

    def __init__(self, limit: int = MAX_REPORTED):
        self.limit = limit
        self.kept: List[str] = []
        self._per_file: Dict[str, int] = {}

    def add(self, path: str, message: str) -> None:
        """Record one problem of file ``path`` (``message`` names it, usually with the line)."""
        n = self._per_file.get(path, 0)
        self._per_file[path] = n + 1
        if n < self.limit:
            self.kept.append(message)

    def lines(self) -> List[str]:
        """The kept messages, then ``path: ... and N more problems in this file`` per file over the limit."""
        return self.kept + [f"{path}: ... and {n - self.limit} more problems in this file"
                            for path, n in self._per_file.items() if n > self.limit]

    def raise_if_any(self) -> None:
        """Raise :class:`InputError` with :meth:`lines` if a problem was recorded."""
        if self._per_file:
            raise InputError(self.lines())
