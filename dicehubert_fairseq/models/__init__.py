"""Models (fairseq imports every module here that does not start with ``_``)."""

from . import dicehubert_student  # noqa: F401
