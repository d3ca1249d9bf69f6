#!/usr/bin/env bash
# 3. The students, each one fairseq-hydra-train line from the repository root (the paper's
#    setup: fairseq's HuBERT Base recipe, 400k updates; config/recipe/ssl.yaml).
#
#    examples/librispeech/3_train.sh ROW [overrides...]
#      ROW: dicehubert_narrow | dicehubert_narrow_soft | dicehubert_shallow_l6 | dicehubert_shallow_l4
#           | feat_narrow | feat_shallow_l6 | feat_shallow_l4 | scratch_narrow | hubert_base_scratch
#    run=gpu (default): one GPU, fp16, update_freq 32 = the paper's 32 GPUs x 1.4M samples.
#    On Slurm, 4 nodes x 8 GPUs:  examples/librispeech/3_train.sh dicehubert_narrow run=slurm -m
#    (needs pip install '.[slurm]'). Every row of docs/ablations.md works the same way.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ROW="${1:?usage: 3_train.sh ROW [overrides...]}"; shift
cd "$REPO"
common=(common.user_dir=dicehubert_fairseq "task.data=$MANIFESTS" "hydra.run.dir=$WORK/runs/$ROW")
case "$ROW" in
  dicehubert_narrow|dicehubert_shallow_l6|dicehubert_shallow_l4)       # L_SSL, hard labels "km"
    fairseq-hydra-train --config-dir config/ --config-name "$ROW" "${common[@]}" "task.label_dir=$LABELS" "$@" ;;
  dicehubert_narrow_soft)                                  # soft labels, tau = 1 (task.labels=[it2_l9_t5], [it2_l9_t10])
    fairseq-hydra-train --config-dir config/ --config-name dicehubert_narrow_soft "${common[@]}" \
      "task.label_dir=$LABELS" "task.labels=[it2_l9_t1]" "$@" ;;
  feat_narrow|feat_shallow_l6|feat_shallow_l4)                         # L_feat baseline, teacher on the fly
    fairseq-hydra-train --config-dir config/ --config-name "$ROW" "${common[@]}" \
      "criterion.teacher_checkpoint=$TEACHER" "$@" ;;
  scratch_narrow|hubert_base_scratch)                                  # no teacher: MFCC labels
    fairseq-hydra-train --config-dir config/ --config-name "$ROW" "${common[@]}" "task.label_dir=$LABELS" "$@" ;;
  *) echo "unknown row '$ROW' (see the usage at the top of $0)" >&2; exit 2 ;;
esac
