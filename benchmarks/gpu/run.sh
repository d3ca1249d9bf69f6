#!/usr/bin/env bash
# The GPU checks in one command (benchmarks/README.md, "GPU checks"); expected about 5 minutes on one
# H200, never measured yet (each step has a time limit, 440 s in all):
#
#   a. the tests that need CUDA:   pytest -m cuda tests/test_cuda.py
#   b. labels on the GPU against fairseq's own feature dump:
#        python -m benchmarks.labels.run --device cuda --dtype float16 --agreement --scales 30 120
#   c. a short run=gpu fp16 training of the narrow preset:  python -m benchmarks.gpu.train
#   d. $OUT/gpu_results.md (the table for benchmarks/README.md), $OUT/gpu_results.json, the logs.
#
# Where:
#   GPU machine (no network):  bash benchmarks/gpu/run.sh     with .whl/ carried (fetch_wheels.sh)
#   no GPU:                    bash benchmarks/gpu/run.sh     sets up, runs (skips) the tests, skips b and c
#   no GPU, check the script:  GPU_DRY_RUN=1 bash benchmarks/gpu/run.sh   b and c on the CPU at toy sizes
#
# $OUT (set by the device tool) receives at most 8 files; without it: benchmarks/work/gpu_out.
# Every step has a time limit; the script exits 1 if any step failed, after writing the report.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/benchmarks/work/gpu_out}
WORK=${WORK:-/tmp/dicehubert_gpu}
LABEL_SCALES=${LABEL_SCALES:-30 120}
TRAIN_UPDATES=${TRAIN_UPDATES:-150}
TRAIN_UTTERANCES=${TRAIN_UTTERANCES:-800}
mkdir -p "$OUT"
rm -f "$OUT"/{run,tests,labels,train,fairseq_train}.log "$OUT"/gpu_results.{json,md}  # a local rerun: no stale files
rm -rf "$WORK"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TQDM_MININTERVAL=5
exec > >(tee "$OUT/run.log") 2>&1
TEE_PID=$!
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null || true' EXIT  # run.log complete before $OUT is collected
T0=$SECONDS

# ---------------------------------------------------------------- set-up: carried wheels
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import fairseq" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "fairseq is not installed and there is no .whl/: run benchmarks/gpu/fetch_wheels.sh where PyPI" \
         "is reachable and carry .whl (see benchmarks/README.md, GPU checks)" >&2
    exit 1
  fi
  echo "== installing the carried wheels into /tmp/site: $(ls .whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH#$REPO} PATH=/tmp/site/bin:$PATH  # the repo's packages first
fi

# ---------------------------------------------------------------- environment
command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
"$PY" - "$WORK/env.json" <<'EOF'
import importlib, importlib.metadata as md, json, platform, subprocess, sys
missing = []
for mod in ("fairseq", "hydra", "omegaconf", "soundfile", "editdistance", "npy_append_array", "bitarray",
            "sklearn", "joblib", "dicehubert_fairseq", "tests.helpers.data"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # a missing or broken package: name it and stop before any step
        missing.append(f"{mod}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
if missing:
    sys.exit("cannot import:\n  " + "\n  ".join(missing))
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "cpus": __import__("os").cpu_count()}
for dist in ("ve-fairseq", "hydra-core", "omegaconf", "numpy", "scikit-learn", "torchaudio", "soundfile"):
    try:
        env[dist.replace("ve-", "").replace("-", "_")] = md.version(dist)
    except md.PackageNotFoundError:
        env[dist] = None
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name(0)
    env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        env["driver"] = None
try:
    import torchaudio.sox_effects  # noqa: F401  (fairseq's audio_utils imports it; run.py stubs it if missing)
    env["torchaudio_sox_effects"] = True
except Exception:
    env["torchaudio_sox_effects"] = False
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODE=gpu
elif [ "${GPU_DRY_RUN:-0}" = 1 ]; then
  MODE=cpu-dry-run
  echo "== no CUDA device; GPU_DRY_RUN=1: steps b and c run on the CPU at toy sizes (checks this script only)"
else
  MODE=no-gpu
  echo "== no CUDA device: the CUDA tests will be skipped, steps b and c are skipped" \
       "(GPU_DRY_RUN=1 runs them on the CPU at toy sizes)"
fi

# ---------------------------------------------------------------- steps
STEPS=$WORK/steps.tsv
: > "$STEPS"
FAILED=0
step() {  # step NAME LIMIT_S LOG WHAT CMD...: run CMD with a time limit, output to the terminal and LOG
  local name=$1 limit=$2 log=$3 what=$4 t0=$SECONDS rc
  shift 4
  echo "== [$((SECONDS - T0)) s] $name (limit $limit s): $*"
  set +e
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" "$what" >> "$STEPS"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || FAILED=1
  return 0
}

# a. the tests that need CUDA (skipped, with their reason, without one)
step tests 110 "$OUT/tests.log" "pytest -m cuda tests/test_cuda.py" \
  "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider --durations=0 --junitxml="$WORK/tests.xml" tests/test_cuda.py

# b. dicehubert-labels on the GPU in fp16 against fairseq's simple_kmeans (its feature dump on the GPU)
case $MODE in
  gpu) LABEL_ARGS=(--device cuda --dtype float16 --agreement --scales $LABEL_SCALES) ;;
  cpu-dry-run)
    LABEL_ARGS=(--device cpu --dtype float32 --agreement --scales 3 --seconds 1 2 --n-clusters 5 --layer 2) ;;
  *) LABEL_ARGS=() ;;
esac
if [ $MODE != no-gpu ]; then
  step labels 180 "$OUT/labels.log" "benchmarks.labels.run ${LABEL_ARGS[*]}" \
    "$PY" -m benchmarks.labels.run --workdir "$WORK/labels" "${LABEL_ARGS[@]}"
  if [ "$(tail -n 1 "$STEPS" | cut -f2)" != 0 ]; then  # the failing step's own log stays on this machine
    for f in "$WORK"/labels/n*/metrics/*.log; do
      [ -f "$f" ] && { echo "--- tail of $f"; tail -n 25 "$f"; }
    done >> "$OUT/labels.log" 2>&1 || true
  fi
fi

# c. a short run=gpu fp16 training of the narrow preset
case $MODE in
  gpu) TRAIN_ARGS=(--updates "$TRAIN_UPDATES" --utterances "$TRAIN_UTTERANCES") ;;
  *) TRAIN_ARGS=(--cpu --updates 6 --utterances 8 --max-tokens 80000 --log-interval 1) ;;
esac
if [ $MODE != no-gpu ]; then
  step train 150 "$OUT/train.log" "benchmarks.gpu.train ${TRAIN_ARGS[*]}" \
    "$PY" -m benchmarks.gpu.train --workdir "$WORK/train" "${TRAIN_ARGS[@]}"
  [ -f "$WORK/train/train.log" ] && cp "$WORK/train/train.log" "$OUT/fairseq_train.log"
fi

# d. the report: gpu_results.md (the table for benchmarks/README.md) and gpu_results.json
echo "== [$((SECONDS - T0)) s] report"
"$PY" -m benchmarks.gpu.report --work "$WORK" --out "$OUT" --mode "$MODE" --labels-argv "${LABEL_ARGS[*]:-}" \
  || FAILED=1
echo "== done in $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
