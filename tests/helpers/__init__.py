"""Test and benchmark helpers (not part of the installed package; importable as ``tests.helpers``
from the repository root, e.g. ``python -m pytest`` or ``python -m benchmarks.core.bench_train_step``).

* :mod:`.data` -- tiny synthetic corpora, random labels and checkpoints in fairseq's saved format;
* :mod:`.config` -- this project's hydra configs composed in-process, as ``fairseq-hydra-train`` does;
* :mod:`.tones` -- a synthetic phone-recognition corpus of tones for the probe.
"""
