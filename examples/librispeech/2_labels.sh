#!/usr/bin/env bash
# 2. DiceHuBERT targets with dicehubert-labels: k-means (K=$K) of layer $LAYER of the teacher,
#    fitted on $PERCENT of train (streamed: memory stays flat), then every utterance labelled,
#    one shard per GPU in parallel, and the shards merged. Hard labels "km" and soft labels
#    (the paper's tau in {1, 5, 10}); MFCC labels "mfcc" for the from-scratch row.
#
#    examples/librispeech/2_labels.sh            # everything below
#    STAGES="fit dump" examples/librispeech/2_labels.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
STAGES="${STAGES:-fit dump soft mfcc check}"
(( NGPU > 0 )) || { echo "no GPU found (nvidia-smi); set NGPU" >&2; exit 1; }
mkdir -p "$LABELS" "$KM"

# dump SPLIT NAME ARGS...: one shard per GPU, in parallel, then merged into {split}.{name}
dump() {
  local split=$1 name=$2; shift 2
  local pids=()
  for ((rank = 0; rank < NGPU; rank++)); do
    CUDA_VISIBLE_DEVICES=$rank dicehubert-labels dump --manifest-dir "$MANIFESTS" --split "$split" \
      --label-dir "$LABELS" --name "$name" --nshard "$NGPU" --rank "$rank" "$@" \
      > "$LABELS/dump_${split}_${name}_${rank}.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done   # set -e: a failed shard stops here
  dicehubert-labels merge --label-dir "$LABELS" --split "$split" --nshard "$NGPU" --name "$name" \
    --manifest-dir "$MANIFESTS"
}

TEACHER_ARGS=(--checkpoint "$TEACHER" --layer "$LAYER" --device cuda --dtype float16)

if [[ " $STAGES " == *" fit "* ]]; then
  dicehubert-labels fit --manifest-dir "$MANIFESTS" --split train "${TEACHER_ARGS[@]}" \
    --n-clusters "$K" --percent "$PERCENT" --seed "$SEED" --out "$KM/l${LAYER}_k${K}.joblib"
fi
if [[ " $STAGES " == *" dump "* ]]; then
  for split in train valid; do
    dump "$split" km "${TEACHER_ARGS[@]}" --km "$KM/l${LAYER}_k${K}.joblib"
  done
fi
if [[ " $STAGES " == *" soft "* ]]; then   # streams it2_l9_t{1,5,10}: dicehubert_narrow_soft task.labels=[it2_l9_tT]
  for tau in 1 5 10; do
    for split in train valid; do
      dump "$split" "it2_l9_t$tau" "${TEACHER_ARGS[@]}" --km "$KM/l${LAYER}_k${K}.joblib" \
        --soft --temperature "$tau" --top-k 10
    done
  done
fi
if [[ " $STAGES " == *" mfcc "* ]]; then   # HuBERT iteration 1 targets: scratch_narrow, hubert_base_scratch
  dicehubert-labels fit --manifest-dir "$MANIFESTS" --split train --mfcc --n-clusters 100 \
    --percent "$PERCENT" --seed "$SEED" --out "$KM/mfcc_k100.joblib"
  for split in train valid; do
    dump "$split" mfcc --mfcc --km "$KM/mfcc_k100.joblib"
  done
fi
if [[ " $STAGES " == *" check "* ]]; then
  dicehubert-labels check --manifest-dir "$MANIFESTS" --label-dir "$LABELS" --labels km --label-rate 50
  dicehubert-labels check --manifest-dir "$MANIFESTS" --label-dir "$LABELS" --labels mfcc --label-rate 100
fi
