#!/usr/bin/env bash
# Train the tiny example's pretrained teachers (examples/tiny/teachers/) from scratch, as they
# were trained once and committed:
#
#   examples/tiny/train_teachers.sh [WORKDIR]     (default: examples/tiny/work_teachers, git-ignored)
#
#   1. corpora  the teachers' own corpus (about 2 h of espeak-ng speech, voice set 'teacher':
#               all 8 English accents x 24 voice variants that neither evaluation corpus nor
#               the tuning corpus uses, sentences of their own seed) and the tuning corpus
#               (voice set 'tune', the corpus every recipe value is chosen on)
#   2. teacher_n1  HuBERT iteration 1: MFCC k-means (K=100, 100 Hz) targets, masked frames only
#   3. layer    teacher_n1's best transformer layer for phones on the tuning corpus's valid split
#               (each layer probed alone: probe_layers.py)
#   4. teacher_n2  HuBERT iteration 2: K=500 k-means of that layer (50 Hz; HuBERT Base's K for its
#               second iteration), masked frames only, peak learning rate 2.5e-4 (at 5e-4, teacher_n1's,
#               it collapsed to the label prior with K=500 and with K=100: EXPERIMENTS.md, T0)
#   5. report   both teachers layer by layer on the tuning corpus's valid split (probe PER and
#               PNMI), training curves; pack.py writes the fp16 checkpoints, checksums and
#               teachers.json into examples/tiny/teachers/ (TEACHERS_PACK=1)
#
# Resumable: a finished stage leaves WORKDIR/.done/STAGE; an interrupted training resumes from its
# checkpoint_last.pt. One CPU thread per job (TEACHER_THREADS). Measured time: see
# examples/tiny/teachers/README.md.
# Knobs: TEACHER_SEED (1000; the students' seeds are 1..8), TEACHER_UPDATES1 (10000),
# TEACHER_UPDATES2 (12000), TEACHER_K2 (K of teacher_n2's targets, 500), TEACHER_LR2 (teacher_n2's
# peak learning rate, 0.00025), TEACHER_MINUTES (120), TEACHER_THREADS (1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
W="$(realpath -m "${1:-$HERE/work_teachers}")"
PYTHON="${PYTHON:-python}"
SEED="${TEACHER_SEED:-1000}"
UPD1="${TEACHER_UPDATES1:-10000}"
UPD2="${TEACHER_UPDATES2:-12000}"
K2="${TEACHER_K2:-500}"
LR2="${TEACHER_LR2:-0.00025}"
MINUTES="${TEACHER_MINUTES:-120}"
export OMP_NUM_THREADS="${TEACHER_THREADS:-1}" MKL_NUM_THREADS="${TEACHER_THREADS:-1}" PYTHONUNBUFFERED=1
for tool in "$PYTHON" fairseq-hydra-train dicehubert-labels dicehubert-probe; do
  command -v "$tool" >/dev/null || { echo "train_teachers.sh: error: '$tool' not found on PATH (activate the" \
    "project's environment: 'make setup' or '. .venv/bin/activate')" >&2; exit 1; }
done
mkdir -p "$W/.done" "$W/logs"
cd "$REPO"
T="$W/corpus"     # the teachers' corpus
TUNE="$W/tune"    # the tuning corpus

stage() {  # stage NAME CMD...: runs CMD once (WORKDIR/.done/NAME marks it done), output to logs/NAME.log
  local name="$1"; shift
  if [[ -e "$W/.done/$name" ]]; then echo "skip  $name (done)"; return; fi
  echo "start $name  $(date +%H:%M:%S)  (log: $W/logs/$name.log)"
  local t0=$SECONDS
  "$@" >>"$W/logs/$name.log" 2>&1 || { echo "FAILED: $name; the end of $W/logs/$name.log:" >&2
    tail -n 30 "$W/logs/$name.log" >&2; exit 1; }
  echo "$((SECONDS - t0))" >"$W/.done/$name"
  echo "done  $name in $((SECONDS - t0)) s"
}

train() {  # train NAME UPDATES LR LABEL_DIR OVERRIDES...: HuBERT's recipe, masked frames only
  local name="$1" updates="$2" lr="$3" labels="$4"; shift 4
  fairseq-hydra-train --config-dir config/ --config-name tiny_teacher common.user_dir=dicehubert_fairseq \
    task.data="$T" task.label_dir="$labels" run=tiny common.seed="$SEED" \
    optimization.max_update="$updates" optimization.lr=["$lr"] lr_scheduler.warmup_updates=$((updates / 10)) \
    criterion.pred_nomask_weight=0 dataset.data_buffer_size=0 common.log_interval=100 \
    checkpoint.save_interval_updates=500 checkpoint.keep_interval_updates=-1 \
    hydra.run.dir="$W/$name" "$@"
}

stage corpus "$PYTHON" "$HERE/synth_corpus.py" --out "$T" --minutes "$MINUTES" --split-fractions 0.92,0.04,0.04 \
  --seed 2000 --text-seed 3000 --voices teacher --jobs 2
stage tune "$PYTHON" "$HERE/synth_corpus.py" --out "$TUNE" --minutes 14 --split-fractions 0.5,0.4,0.1 \
  --seed 11 --text-seed 2011 --voices tune --jobs 2 --align
stage km_mfcc dicehubert-labels fit --manifest-dir "$T" --split train --mfcc --n-clusters 100 \
  --out "$W/km/mfcc.joblib" --seed "$SEED" --n-init 3 --no-progress
stage labels_mfcc dicehubert-labels dump --manifest-dir "$T" --split train --mfcc --km "$W/km/mfcc.joblib" \
  --label-dir "$W/labels/mfcc" --name mfcc --no-progress
stage teacher_n1 train teacher_n1 "$UPD1" 0.0005 "$W/labels/mfcc" +data=mfcc
layers() {  # layers NAME [--pnmi-k 100]: every hidden state probed alone on the tuning corpus (valid PER[, PNMI])
  local name="$1"; shift
  "$PYTHON" "$HERE/probe_layers.py" --checkpoint "$W/$name/checkpoints/checkpoint_last.pt" --data "$TUNE" \
    --out "$W/probe/$name.layers.json" --seed "$SEED" --epochs 60 "$@"
}
stage layers_n1 layers teacher_n1  # the PERs choose the layer; PNMI (same probes again, deterministic) at the end
LAYER1="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["best_transformer_layer"])' \
  "$W/probe/teacher_n1.layers.json")"
echo "teacher_n1's best transformer layer on the tuning corpus's valid split: $LAYER1"
stage km_it1 dicehubert-labels fit --manifest-dir "$T" --split train --checkpoint "$W/teacher_n1/checkpoints/checkpoint_last.pt" \
  --layer "$LAYER1" --n-clusters "$K2" --out "$W/km/it1.joblib" --seed "$SEED" --n-init 3 --no-progress
stage labels_it1 dicehubert-labels dump --manifest-dir "$T" --split train \
  --checkpoint "$W/teacher_n1/checkpoints/checkpoint_last.pt" --layer "$LAYER1" --km "$W/km/it1.joblib" \
  --label-dir "$W/labels/it1" --name it1 --no-progress
stage teacher_n2 train teacher_n2 "$UPD2" "$LR2" "$W/labels/it1" task.labels=[it1] task.label_rate=50
stage layers_n2 layers teacher_n2 --pnmi-k 100
stage quality_n1 layers teacher_n1 --pnmi-k 100
if [[ "${TEACHERS_PACK:-0}" == 1 ]]; then
  "$PYTHON" "$HERE/teachers.py" pack "$W"
else
  echo "trained; to ship them: $PYTHON $HERE/teachers.py pack $W   (or TEACHERS_PACK=1)"
fi
