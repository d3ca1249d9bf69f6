#!/usr/bin/env bash
# 2. DiceHuBERT targets with dicehubert-labels: k-means (K=$K) of layer $LAYER of the teacher,
#    fitted on $PERCENT of train (streamed: memory stays flat), then every utterance labelled,
#    sharded over processes, and the shards merged (the same bytes as one process). Hard labels
#    "km" and soft labels it${ITER}_l${LAYER}_t{1,5,10} (the paper's tau, TAUS); MFCC labels "mfcc"
#    for the from-scratch row.
#
#    examples/librispeech/2_labels.sh            # everything below, here: one shard per GPU
#    STAGES="fit dump" examples/librispeech/2_labels.sh
#
#    LAYERS="3 6 9 12" examples/librispeech/2_labels.sh   # the teacher-layer sweep: per layer L, its
#      own k-means ($KM/lL_kK.joblib) and streams named after it: it${ITER}_lL (hard, in place of
#      "km") and it${ITER}_lL_tT (soft); then 3_train.sh with the same LAYERS trains one student each.
#    ALIGN=PATH: frame-level phone alignments of QUALITY_SPLIT (valid; one line per manifest row, one
#      phone per frame at ALIGN_RATE=100 per second): stage "quality" writes
#      $LABELS/quality_$QUALITY_SPLIT.json, phone purity, cluster purity and PNMI of every hard stream
#      (every layer), and prints them; without ALIGN it is skipped, with a note.
#    DEVICE=cpu DTYPE=float32 runs the teacher on the CPU (NSHARD processes, default 1: no GPU needed).
#
#    LAUNCH=slurm examples/librispeech/2_labels.sh   # the same stages as Slurm jobs, then returns:
#      fit on one GPU; each dump an array of NSHARD tasks (sbatch --array, one GPU and one shard
#      each) after the fit; each merge after all tasks of its array succeeded; check after every
#      merge (sbatch --dependency=afterok). Logs: $LABELS/slurm/. SBATCH_OPTS="--partition=... --account=..."
#      A failed or preempted shard R reruns alone (it resumes from its finished blocks), then its merge:
#      LAUNCH=slurm STAGES=dump SPLITS=train ARRAY=R examples/librispeech/2_labels.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
STAGES="${STAGES:-fit dump soft mfcc check quality}"
SPLITS="${SPLITS:-train valid}"
LAUNCH="${LAUNCH:-local}"
DEVICE="${DEVICE:-cuda}"       # teacher forward: cuda + float16 (cpu: DTYPE=float32)
DTYPE="${DTYPE:-float16}"
TAUS="${TAUS:-1 5 10}"         # soft-label temperatures (stage soft)
QUALITY_SPLIT="${QUALITY_SPLIT:-valid}"
ALIGN_RATE="${ALIGN_RATE:-100}"
SWEEP="${LAYERS:+1}"           # LAYERS given: streams named after their layer
LAYERS="${LAYERS:-$LAYER}"
case "$LAUNCH" in
  local) if [[ $DEVICE == cpu ]]; then NSHARD="${NSHARD:-1}"
         else (( NGPU > 0 )) || { echo "no GPU found (nvidia-smi); set NGPU, DEVICE=cpu, or LAUNCH=slurm" >&2; exit 1; }
              NSHARD=$NGPU; fi
         SB=(); SB_GPU=() ;;
  slurm) command -v sbatch >/dev/null || { echo "LAUNCH=slurm: sbatch not found" >&2; exit 1; }
         NSHARD="${NSHARD:-32}"
         ARRAY="${ARRAY:-0-$((NSHARD - 1))}"
         mkdir -p "$LABELS/slurm"
         # shellcheck disable=SC2206  # SBATCH_OPTS is split into words on purpose
         SB=(sbatch --parsable --output="$LABELS/slurm/%x_%A_%a.log" ${SBATCH_OPTS:-})
         SB_GPU=("${SB[@]}" --gres=gpu:1 --cpus-per-task="${CPUS_PER_GPU:-8}") ;;
  *) echo "LAUNCH is local or slurm, found '$LAUNCH'" >&2; exit 2 ;;
esac
mkdir -p "$LABELS" "$KM"

# job VAR AFTER SBATCH_ARGS... -- CMD...: run CMD here (local), or submit it once the jobs AFTER
# (ids, ':'-separated, may be empty) have succeeded and set VAR to the new job's id (slurm)
job() {
  local var=$1 after=$2 sb=(); shift 2
  while [[ $1 != -- ]]; do sb+=("$1"); shift; done; shift
  if [[ $LAUNCH == local ]]; then "$@"; return; fi
  local submitted
  submitted=$("${sb[@]}" ${after:+--dependency=afterok:$after} --wrap "$(printf '%q ' "$@")")
  printf -v "$var" '%s' "${submitted%%;*}"
}
MERGES=""   # slurm: the merge jobs `check` waits for

# dump AFTER SPLIT NAME ARGS...: NSHARD shards, then merged into {split}.{name}
dump() {
  local after=$1 split=$2 name=$3; shift 3
  local base=(--manifest-dir "$MANIFESTS" --split "$split" --label-dir "$LABELS" --name "$name")
  local args=("${base[@]}" --nshard "$NSHARD" "$@")
  local merge=(dicehubert-labels merge --label-dir "$LABELS" --split "$split" --nshard "$NSHARD" --name "$name"
               --manifest-dir "$MANIFESTS")
  if [[ $LAUNCH == local && $NSHARD == 1 ]]; then   # one process: the split's files directly, nothing to merge
    dicehubert-labels dump "${base[@]}" "$@"
    return
  fi
  if [[ $LAUNCH == local ]]; then   # one shard per GPU, in parallel
    local pids=()
    for ((rank = 0; rank < NSHARD; rank++)); do
      CUDA_VISIBLE_DEVICES=$rank dicehubert-labels dump "${args[@]}" --rank "$rank" \
        > "$LABELS/dump_${split}_${name}_${rank}.log" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done   # set -e: a failed shard stops here
    "${merge[@]}"
    return
  fi
  local array id   # one array task per shard: the task's index is its rank
  array=$("${SB_GPU[@]}" --job-name="dump_${split}_${name}" --array="$ARRAY" ${after:+--dependency=afterok:$after} \
    --wrap "$(printf '%q ' dicehubert-labels dump "${args[@]}")--rank \"\$SLURM_ARRAY_TASK_ID\"")
  job id "${array%%;*}" "${SB[@]}" --job-name="merge_${split}_${name}" -- "${merge[@]}"
  MERGES="${MERGES:+$MERGES:}$id"
}

# hard_name L: the hard stream of layer L ("km" for the one layer of LAYER, it${ITER}_lL in a sweep)
hard_name() { if [[ -n $SWEEP ]]; then echo "it${ITER}_l$1"; else echo km; fi; }
HARD=()
for layer in $LAYERS; do HARD+=("$(hard_name "$layer")"); done

for layer in $LAYERS; do
  teacher_args=(--checkpoint "$TEACHER" --layer "$layer" --device "$DEVICE" --dtype "$DTYPE")
  km="$KM/l${layer}_k${K}.joblib"
  FIT=""   # slurm: the fit job this layer's dumps wait for
  if [[ " $STAGES " == *" fit "* ]]; then
    job FIT "" "${SB_GPU[@]}" --job-name=fit_l"$layer" -- \
      dicehubert-labels fit --manifest-dir "$MANIFESTS" --split train "${teacher_args[@]}" \
      --n-clusters "$K" --percent "$PERCENT" --seed "$SEED" --out "$km"
  fi
  if [[ " $STAGES " == *" dump "* ]]; then
    for split in $SPLITS; do
      dump "$FIT" "$split" "$(hard_name "$layer")" "${teacher_args[@]}" --km "$km"
    done
  fi
  if [[ " $STAGES " == *" soft "* ]]; then   # dicehubert_narrow_soft task.labels=[it${ITER}_lL_tT]
    for tau in $TAUS; do
      for split in $SPLITS; do
        dump "$FIT" "$split" "it${ITER}_l${layer}_t$tau" "${teacher_args[@]}" --km "$km" \
          --soft --temperature "$tau" --top-k 10
      done
    done
  fi
done
FIT_MFCC=""
if [[ " $STAGES " == *" mfcc "* ]]; then   # HuBERT iteration 1 targets: scratch_narrow, hubert_base_scratch
  job FIT_MFCC "" "${SB[@]}" --job-name=fit_mfcc --cpus-per-task="${CPUS_PER_GPU:-8}" -- \
    dicehubert-labels fit --manifest-dir "$MANIFESTS" --split train --mfcc --n-clusters 100 \
    --percent "$PERCENT" --seed "$SEED" --out "$KM/mfcc_k100.joblib"
  for split in $SPLITS; do
    dump "$FIT_MFCC" "$split" mfcc --mfcc --km "$KM/mfcc_k100.joblib"
  done
fi
if [[ " $STAGES " == *" check "* ]]; then   # the splits labelled here (not every manifest of $MANIFESTS)
  check=(dicehubert-labels check --manifest-dir "$MANIFESTS" --label-dir "$LABELS")
  for split in $SPLITS; do check+=(--split "$split"); done
  job CHECK "$MERGES" "${SB[@]}" --job-name=check_"$(IFS=_; echo "${HARD[*]}")" -- \
    "${check[@]}" --labels "${HARD[@]}" --label-rate 50
  if [[ " $STAGES " == *" mfcc "* ]]; then
    job CHECK "$MERGES" "${SB[@]}" --job-name=check_mfcc -- "${check[@]}" --labels mfcc --label-rate 100
  fi
fi
if [[ " $STAGES " == *" quality "* ]]; then   # label quality per layer, before any training
  if [[ -z "${ALIGN:-}" ]]; then
    echo "stage quality skipped: give ALIGN=frame-level phone alignments of $QUALITY_SPLIT to rank the layers" >&2
  else
    job QUALITY "$MERGES" "${SB[@]}" --job-name=quality -- \
      dicehubert-labels quality --label-dir "$LABELS" --labels "${HARD[@]}" --split "$QUALITY_SPLIT" \
      --align "$ALIGN" --align-rate "$ALIGN_RATE" --label-rate 50 --json "$LABELS/quality_$QUALITY_SPLIT.json"
  fi
fi
if [[ $LAUNCH == slurm ]]; then
  echo "submitted; follow with: squeue --me; logs in $LABELS/slurm/"
fi
