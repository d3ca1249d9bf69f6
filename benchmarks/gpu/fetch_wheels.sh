#!/usr/bin/env bash
# Download, into .whl/, every wheel the GPU machine lacks for this project (run HERE, with
# access to PyPI; the GPU machine has no network). That machine runs CPython 3.12 on
# Linux x86_64 with torch 2.11 (+ torchaudio 2.11, numpy, scikit-learn, joblib, threadpoolctl,
# tqdm, regex, sacrebleu, packaging, cython, PyYAML, pytest, hypothesis already installed), but
# not fairseq, Hydra or the small packages below.
#
#   benchmarks/gpu/fetch_wheels.sh           # then: the device call it prints at the end
#
# Versions: the ones this project is tested with on CPU (inside setup.py's ranges). .whl/ is
# git-ignored and travels to the GPU machine as a carried path; run.sh installs it there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=.whl
MAX_MIB=${MAX_MIB:-40}   # the working tree + carried paths may not exceed 64 MiB in all

# name==version of every binary or pure-Python wheel (cp312 manylinux x86_64 where compiled)
WHEELS=(
  ve-fairseq==0.12.3             # fairseq 0.12 with CPython 3.12 wheels (setup.py's marker picks it on Linux x86_64)
  hydra-core==1.3.8              # setup.py: >=1.3,<1.4 (fairseq-hydra-train)
  omegaconf==2.3.1               # setup.py: >=2.3,<2.4
  bitarray==3.12.3               # fairseq (fairseq.data imports it)
  cffi==2.1.1                    # soundfile's binding (and a fairseq requirement)
  pycparser==3.12                # cffi's requirement
  soundfile==0.14.0              # setup.py: >=0.12 (bundles libsndfile)
  editdistance==0.8.1            # setup.py: >=0.6,<0.9 (the probe's PER)
  npy-append-array==0.9.19       # fairseq's simple_kmeans/dump_hubert_feature.py (the label benchmark)
)
# sdist only: built here into a py3-none-any wheel
SDISTS=(
  antlr4-python3-runtime==4.9.3  # hydra-core / omegaconf pin exactly this
)
# already on the GPU machine (its image's package list); any other requirement is an error below
PRESENT="torch torchaudio numpy scikit-learn joblib threadpoolctl tqdm regex sacrebleu packaging cython
pyyaml pytest hypothesis typing-extensions setuptools"

rm -rf "$DEST"
mkdir -p "$DEST"
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64 manylinux_2_34_x86_64 any; do
  PLAT+=(--platform "$p")
done
echo "== downloading ${#WHEELS[@]} wheels for CPython 3.12, Linux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${PLAT[@]}" -d "$DEST" "${WHEELS[@]}"
echo "== building ${SDISTS[*]} (sdist) into a wheel"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SDISTS[@]}"

"$PY" - "$DEST" "$MAX_MIB" "$PRESENT" "${WHEELS[@]}" "${SDISTS[@]}" <<'PYEOF'
import os, re, sys, zipfile
dest, max_mib, present = sys.argv[1], float(sys.argv[2]), set(sys.argv[3].split())
wanted = {re.split("==", w)[0].lower().replace("_", "-"): w.split("==")[1] for w in sys.argv[4:]}
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
from packaging.requirements import Requirement
# the GPU machine's marker environment: CPython 3.12 on Linux x86_64
GPU_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "os_name": "posix", "platform_release": "", "platform_version": "",
           "implementation_version": "3.12.3"}
files = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
got, problems, total = {}, [], 0
for f in files:
    got[norm(f.split("-")[0])] = f.split("-")[1]
    size = os.path.getsize(os.path.join(dest, f)); total += size
    py, abi, plat = f[:-4].split("-")[-3:]
    if not (py in ("py3", "py2.py3", "cp312") or py.startswith("cp3") and abi == "abi3"):
        problems.append(f"{f}: not a CPython 3.12 wheel ({py}-{abi})")
    if plat != "any" and "x86_64" not in plat:
        problems.append(f"{f}: not for x86_64 ({plat})")
    with zipfile.ZipFile(os.path.join(dest, f)) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(dict(GPU_ENV, extra="")):
            continue  # another Python / platform, or an extra
        name = norm(req.name)
        if name not in got and name not in {norm(w) for w in wanted} and name not in present:
            problems.append(f"{f}: requires {req}, which is neither carried nor on the GPU machine")
    print(f"  {size / 2**20:6.2f} MiB  {f}")
missing = [w for w in wanted if norm(w) not in got]
problems += [f"{w}: no wheel downloaded" for w in missing]
problems += [f"{n}: {got[n]} downloaded, {v} wanted" for n, v in ((norm(k), v) for k, v in wanted.items())
             if n in got and got[n] != v]
print(f"  {total / 2**20:6.2f} MiB  in all ({len(files)} wheels; limit {max_mib:g} MiB)")
if total > max_mib * 2**20:
    problems.append(f"{dest}: {total / 2**20:.1f} MiB, over the {max_mib:g} MiB budget")
if problems:
    sys.exit("\n".join(["fetch_wheels: problems:"] + problems))
PYEOF

tree_kib=$(git ls-files -co --exclude-standard -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
whl_kib=$(du -sk "$DEST" | cut -f1)
echo "== working tree (tracked + untracked, not ignored): $((tree_kib / 1024)) MiB; .whl: $((whl_kib / 1024)) MiB;" \
     "the device tool's limit is 64 MiB for both together"
[ $((tree_kib + whl_kib)) -lt $((60 * 1024)) ] || { echo "too large to travel" >&2; exit 1; }
cat <<'MSG'
== ready. The device call (one command; expected about 5 minutes, not yet measured; its steps stop themselves within 8):
   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=540)
   Results come back under the call's files: gpu_results.md (the table for benchmarks/README.md),
   gpu_results.json, and the logs of each step.
MSG
