#!/usr/bin/env bash
# 4. Evaluation. Phone recognition with this project's probe (SUPERB-PR style: frozen model,
#    softmax-weighted sum of all hidden states, linear CTC head), on a directory PR_DATA that
#    holds {train,valid,test}.tsv and {train,valid,test}.phn (one line of space-separated phones
#    per manifest row; SUPERB PR uses train-clean-100 / dev-clean / test-clean with the phones of
#    s3prl's g2p lexicon, downstream/ctc/lexicon/). The probe caches every hidden state in memory:
#    --max-train-utterances bounds it (HuBERT Base, 1000 utterances: about 25 GB).
#
#    examples/librispeech/4_probe.sh CHECKPOINT [more dicehubert-probe options]
#    e.g. examples/librispeech/4_probe.sh $WORK/runs/dicehubert_narrow/checkpoints/checkpoint_best.pt
#    Result: $WORK/probe/NAME.json, NAME the run's directory (dicehubert_narrow).
#
#    The teacher-layer sweep (3_train.sh with LAYERS): every student of ROW, then the table of label
#    quality and probe PER per layer (examples/librispeech/layer_table.py; $WORK/probe/ROW_layers.md):
#      LAYERS="3 6 9 12" examples/librispeech/4_probe.sh ROW [options]
#    CKPT_NAME picks the checkpoint of each run (default checkpoint_best.pt).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
TARGET="${1:?usage: 4_probe.sh CHECKPOINT [dicehubert-probe options], or LAYERS=... 4_probe.sh ROW [options]}"; shift
: "${PR_DATA:=$WORK/pr}"
: "${DEVICE:=cuda}"
mkdir -p "$WORK/probe"
probe() {  # probe CKPT [options]: $WORK/probe/NAME.json, NAME the run's directory
  local ckpt=$1 name; shift
  name="$(basename "$(dirname "$(dirname "$ckpt")")")"
  dicehubert-probe --checkpoint "$ckpt" --data "$PR_DATA" --device "$DEVICE" --max-train-utterances 1000 \
    --json "$WORK/probe/$name.json" "$@"
}
if [[ -z "${LAYERS:-}" ]]; then
  probe "$TARGET" "$@"
  exit
fi
ROW=$TARGET
suffix=""; [[ $ROW == *_soft ]] && suffix="_t${TAU:-1}"
for layer in $LAYERS; do
  probe "$WORK/runs/${ROW}_it${ITER}_l${layer}${suffix}/checkpoints/${CKPT_NAME:-checkpoint_best.pt}" "$@"
done
QUALITY_SPLIT="${QUALITY_SPLIT:-valid}"
python "$REPO/examples/librispeech/layer_table.py" --row "$ROW" --layers $LAYERS --iter "$ITER" --suffix "$suffix" \
  --quality "$LABELS/quality_$QUALITY_SPLIT.json" --probe-dir "$WORK/probe" --out "$WORK/probe/${ROW}_layers.md"
