"""Training runs and console scripts as subprocesses (the end-to-end tests of ``tests/e2e``).

* :func:`subprocess_env` -- the environment they run in;
* :func:`run` -- run one to the end, which must succeed;
* :func:`run_and_kill` -- start one and SIGKILL it (and every process it started) once it has
  saved a checkpoint, as when a machine is preempted;
* :func:`json_rows` -- the rows fairseq logs with ``common.log_format=json``;
* :func:`install_stubs` -- console scripts that only record their arguments (:data:`STUB_CLI`).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Sequence

#: The repository root (training commands run there: ``--config-dir config/``).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The directory of this interpreter's console scripts (``fairseq-hydra-train``, ``torchrun``, ...).
BIN = os.path.dirname(sys.executable)


def subprocess_env(**extra: str) -> Dict[str, str]:
    """This process's environment with this interpreter's scripts first on ``PATH``, one OpenMP
    thread (the same thread count in every run, and kind to shared CPUs), unbuffered output (log
    lines reach a file as they are written), without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (the code
    must work without it), and ``extra`` set last."""
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run(cmd: Sequence[str], timeout: float = 600) -> str:
    """Run ``cmd`` in the repository root; it must exit 0. Returns its stdout and stderr."""
    proc = subprocess.run(list(cmd), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def json_rows(log: str, tag: str) -> List[dict]:
    """The JSON rows fairseq logged under ``[tag]`` (``train_inner``, ``train``, ``valid``)."""
    return [json.loads(line.split(" - ", 1)[1]) for line in log.splitlines() if f"[{tag}]" in line and " - {" in line]


def _descendants(pid: int) -> List[int]:
    """Every process started by ``pid``, its children's children too (from ``/proc``)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_and_kill(cmd: Sequence[str], log_path: str, after_update: int, timeout: float = 300) -> str:
    """Start ``cmd`` in the repository root; SIGKILL it once it logs a saved checkpoint of update
    ``>= after_update``.

    Every process it started gets its own SIGKILL too (``torchrun`` starts each worker in a
    session of its own), as when a machine is preempted.

    Returns:
        what it logged (stdout and stderr, also left in ``log_path``).
    """
    saved = re.compile(r"Saved checkpoint \S+ \(epoch \d+ @ (\d+) updates")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline, text = time.time() + timeout, ""
    try:
        while time.time() < deadline:
            with open(log_path) as f:
                text = f.read()
            if any(int(m.group(1)) >= after_update for m in saved.finditer(text)):
                for pid in _descendants(proc.pid) + [proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            assert proc.poll() is None, "run ended before it could be killed:\n" + text[-3000:]
            time.sleep(0.02)
        else:
            raise AssertionError("no checkpoint logged in time:\n" + text[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    assert rc == -signal.SIGKILL, rc
    with open(log_path) as f:
        return f.read()


#: A console script that appends its name and arguments, as a JSON list, to the file ``$STUB_LOG``.
STUB_CLI = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


def install_stubs(directory, tools: Sequence[str]) -> str:
    """:data:`STUB_CLI` as each of ``tools`` in ``directory`` (created); returns ``directory``, to put
    first on ``PATH``."""
    os.makedirs(directory, exist_ok=True)
    for tool in tools:
        path = os.path.join(directory, tool)
        with open(path, "w") as f:
            f.write(STUB_CLI)
        os.chmod(path, 0o755)
    return str(directory)
