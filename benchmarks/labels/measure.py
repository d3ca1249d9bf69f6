"""Run one Python script or module in this process; record wall time, peak RSS and bytes written.

    python benchmarks/labels/measure.py --out step.json [--fairseq-shim | --sox-stub] (--module MOD | SCRIPT) -- ARGS...

Recorded at exit (JSON): ``wall_s``, ``peak_rss_mb`` (``getrusage(RUSAGE_SELF).ru_maxrss``),
``write_bytes`` (``/proc/self/io``: bytes this process sent to the storage layer, temporary files
included), ``wchar`` (bytes passed to write(), terminal output included), ``exit``, and
``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``) when the step used the GPU.

``--fairseq-shim`` lets fairseq's examples/hubert/simple_kmeans scripts run on a CPU-only machine
where torchaudio cannot load: ``.cuda()`` becomes a no-op (dump_hubert_feature.py hard-codes it),
and a stub ``torchaudio.sox_effects`` module satisfies the import that fairseq's
``audio_utils.convert_waveform`` makes for every file (it is used only to resample or downmix,
never for 16 kHz mono input).  ``--sox-stub`` is that stub alone, for a GPU machine whose
torchaudio loads but has no ``sox_effects`` (torchaudio >= 2.9 removed it).  A script that
imports its siblings needs its directory on ``PYTHONPATH`` (run.py sets it).
"""

import argparse
import atexit
import json
import os
import resource
import runpy
import sys
import time
import types


def _io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines() if line)}


def _fairseq_shim():
    import torch

    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    ta = types.ModuleType("torchaudio")
    sys.modules["torchaudio"] = ta
    _sox_stub()


def _sox_stub():
    """A stub ``torchaudio.sox_effects`` where the real one cannot be imported."""
    try:
        import torchaudio.sox_effects  # noqa: F401
        return
    except (ImportError, OSError):  # OSError: a torchaudio built for another torch
        pass
    try:
        import torchaudio as ta
    except (ImportError, OSError):
        ta = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    sox = types.ModuleType("torchaudio.sox_effects")
    ta.sox_effects = sox
    sys.modules["torchaudio.sox_effects"] = sox


def _cuda_peak_mb():
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: measure.py --out OUT.json [--fairseq-shim] (--module MOD | SCRIPT) -- ARGS...")
    cut = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--fairseq-shim", action="store_true")
    p.add_argument("--sox-stub", action="store_true")
    p.add_argument("--module")
    p.add_argument("script", nargs="?")
    args = p.parse_args(argv[:cut])
    rest = argv[cut + 1 :]
    t0, io0 = time.time(), _io()
    state = {"exit": 0}

    def record():
        io1 = _io()
        with open(args.out, "w") as f:
            json.dump({"wall_s": time.time() - t0,
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       "write_bytes": io1["write_bytes"] - io0["write_bytes"],
                       "cancelled_write_bytes": io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"],
                       "wchar": io1["wchar"] - io0["wchar"], "exit": state["exit"],
                       "cuda_peak_mb": _cuda_peak_mb()}, f)

    atexit.register(record)
    if args.fairseq_shim:
        _fairseq_shim()
    elif args.sox_stub:
        _sox_stub()
    try:
        if args.module:
            sys.argv = [args.module] + rest
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [args.script] + rest
            runpy.run_path(args.script, run_name="__main__")
    except SystemExit as e:
        state["exit"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise


if __name__ == "__main__":
    main()
