#!/usr/bin/env bash
# 2. DiceHuBERT targets with dicehubert-labels: k-means (K=$K) of layer $LAYER of the teacher,
#    fitted on $PERCENT of train (streamed: memory stays flat), then every utterance labelled,
#    sharded over processes, and the shards merged (the same bytes as one process). Hard labels
#    "km" and soft labels (the paper's tau in {1, 5, 10}); MFCC labels "mfcc" for the
#    from-scratch row.
#
#    examples/librispeech/2_labels.sh            # everything below, here: one shard per GPU
#    STAGES="fit dump" examples/librispeech/2_labels.sh
#
#    LAUNCH=slurm examples/librispeech/2_labels.sh   # the same stages as Slurm jobs, then returns:
#      fit on one GPU; each dump an array of NSHARD tasks (sbatch --array, one GPU and one shard
#      each) after the fit; each merge after all tasks of its array succeeded; check after every
#      merge (sbatch --dependency=afterok). Logs: $LABELS/slurm/. SBATCH_OPTS="--partition=... --account=..."
#      A failed or preempted shard R reruns alone (it resumes from its finished blocks), then its merge:
#      LAUNCH=slurm STAGES=dump SPLITS=train ARRAY=R examples/librispeech/2_labels.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
STAGES="${STAGES:-fit dump soft mfcc check}"
SPLITS="${SPLITS:-train valid}"
LAUNCH="${LAUNCH:-local}"
DEVICE="${DEVICE:-cuda}"       # teacher forward: cuda + float16 (cpu: DTYPE=float32)
DTYPE="${DTYPE:-float16}"
case "$LAUNCH" in
  local) (( NGPU > 0 )) || { echo "no GPU found (nvidia-smi); set NGPU, or LAUNCH=slurm" >&2; exit 1; }
         NSHARD=$NGPU; SB=(); SB_GPU=() ;;
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
  local args=(--manifest-dir "$MANIFESTS" --split "$split" --label-dir "$LABELS" --name "$name"
              --nshard "$NSHARD" "$@")
  local merge=(dicehubert-labels merge --label-dir "$LABELS" --split "$split" --nshard "$NSHARD" --name "$name"
               --manifest-dir "$MANIFESTS")
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

TEACHER_ARGS=(--checkpoint "$TEACHER" --layer "$LAYER" --device "$DEVICE" --dtype "$DTYPE")
FIT=""; FIT_MFCC=""   # slurm: the fit jobs the dumps wait for

if [[ " $STAGES " == *" fit "* ]]; then
  job FIT "" "${SB_GPU[@]}" --job-name=fit_l"$LAYER" -- \
    dicehubert-labels fit --manifest-dir "$MANIFESTS" --split train "${TEACHER_ARGS[@]}" \
    --n-clusters "$K" --percent "$PERCENT" --seed "$SEED" --out "$KM/l${LAYER}_k${K}.joblib"
fi
if [[ " $STAGES " == *" dump "* ]]; then
  for split in $SPLITS; do
    dump "$FIT" "$split" km "${TEACHER_ARGS[@]}" --km "$KM/l${LAYER}_k${K}.joblib"
  done
fi
if [[ " $STAGES " == *" soft "* ]]; then   # streams it2_l9_t{1,5,10}: dicehubert_narrow_soft task.labels=[it2_l9_tT]
  for tau in 1 5 10; do
    for split in $SPLITS; do
      dump "$FIT" "$split" "it2_l9_t$tau" "${TEACHER_ARGS[@]}" --km "$KM/l${LAYER}_k${K}.joblib" \
        --soft --temperature "$tau" --top-k 10
    done
  done
fi
if [[ " $STAGES " == *" mfcc "* ]]; then   # HuBERT iteration 1 targets: scratch_narrow, hubert_base_scratch
  job FIT_MFCC "" "${SB[@]}" --job-name=fit_mfcc --cpus-per-task="${CPUS_PER_GPU:-8}" -- \
    dicehubert-labels fit --manifest-dir "$MANIFESTS" --split train --mfcc --n-clusters 100 \
    --percent "$PERCENT" --seed "$SEED" --out "$KM/mfcc_k100.joblib"
  for split in $SPLITS; do
    dump "$FIT_MFCC" "$split" mfcc --mfcc --km "$KM/mfcc_k100.joblib"
  done
fi
if [[ " $STAGES " == *" check "* ]]; then
  job CHECK "$MERGES" "${SB[@]}" --job-name=check_km -- \
    dicehubert-labels check --manifest-dir "$MANIFESTS" --label-dir "$LABELS" --labels km --label-rate 50
  job CHECK "$MERGES" "${SB[@]}" --job-name=check_mfcc -- \
    dicehubert-labels check --manifest-dir "$MANIFESTS" --label-dir "$LABELS" --labels mfcc --label-rate 100
fi
if [[ $LAUNCH == slurm ]]; then
  echo "submitted; follow with: squeue --me; logs in $LABELS/slurm/"
fi
