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
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CKPT="${1:?usage: 4_probe.sh CHECKPOINT [dicehubert-probe options]}"; shift
: "${PR_DATA:=$WORK/pr}"
name="$(basename "$(dirname "$(dirname "$CKPT")")")"
mkdir -p "$WORK/probe"
dicehubert-probe --checkpoint "$CKPT" --data "$PR_DATA" --device cuda --max-train-utterances 1000 \
  --json "$WORK/probe/$name.json" "$@"
