"""How this project's command-line tools report failures (shared by every console script)."""

import sys
from typing import Callable, TypeVar

from .errors import InputError

T = TypeVar("T")


def run_reporting_errors(prog: str, debug: bool, fn: Callable[[], T], interrupted: str = "interrupted"):
    """Run ``fn``; bad input becomes one ``prog: error: ...`` line per problem on stderr.

    Args:
        prog: prefix of every message (e.g. ``dicehubert-labels dump``).
        debug: re-raise instead, with the traceback.
        fn: the work.
        interrupted: what to print on Ctrl-C.

    Returns:
        ``(exit_code, result)``: ``(0, fn())`` on success, ``(1, None)`` for
        :class:`InputError`, ``OSError`` or ``MemoryError``, ``(130, None)`` if interrupted.
    """
    try:
        return 0, fn()
    except InputError as e:
        if debug:
            raise
        for problem in e.problems:
            print(f"{prog}: error: {problem}", file=sys.stderr)
        return 1, None
    except (OSError, MemoryError) as e:
        if debug:
            raise
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130, None
