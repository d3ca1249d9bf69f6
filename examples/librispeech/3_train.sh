#!/usr/bin/env bash
# 3. The students, each one fairseq-hydra-train line from the repository root (the paper's
#    setup: fairseq's HuBERT Base recipe, 400k updates; config/recipe/ssl.yaml).
#
#    examples/librispeech/3_train.sh ROW [overrides...]
#      ROW: any experiment of config/ (docs/ablations.md), e.g. dicehubert_narrow | dicehubert_narrow_soft
#           | dicehubert_narrow_small | dicehubert_shallow_l6 | dicehubert_shallow_l6_init | dicehubert_shallow_l4
#           | dicehubert_conv_narrow | feat_narrow | feat_shallow_l6 | feat_shallow_l4 | maskdistil_narrow
#           | maskdistil_shallow_l6 | ssl_feat_narrow | scratch_narrow | hubert_base_scratch
#    run=gpu (default): one GPU, fp16, update_freq 32 = the paper's 32 GPUs x 1.4M samples.
#    On Slurm, 4 nodes x 8 GPUs:  examples/librispeech/3_train.sh dicehubert_narrow run=slurm -m
#    (needs pip install '.[slurm]'). Runs go to $WORK/runs/ROW.
#
#    The teacher-layer sweep: one student per layer, on the streams of LAYERS="3 6 9 12" 2_labels.sh
#    (it${ITER}_lL; the soft row: it${ITER}_lL_t$TAU), runs in $WORK/runs/ROW_it${ITER}_lL:
#      LAYERS="3 6 9 12" examples/librispeech/3_train.sh dicehubert_narrow              # one after another
#      LAYERS="3 6 9 12" LAUNCH=slurm examples/librispeech/3_train.sh dicehubert_narrow # one Slurm array
#    LAUNCH=slurm is one hydra sweep (-m run=slurm, hydra's submitit launcher: a job array, one
#    4-node job per layer); LAUNCH=submitit_local is the same sweep run here (run=submitit_local).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ROW="${1:?usage: 3_train.sh ROW [overrides...]}"; shift
LAUNCH="${LAUNCH:-local}"
TAU="${TAU:-1}"   # the soft row's temperature (2_labels.sh's TAUS)
cd "$REPO"
[[ -f "config/$ROW.yaml" ]] || { echo "unknown row '$ROW': no config/$ROW.yaml (see docs/ablations.md)" >&2; exit 2; }
common=(common.user_dir=dicehubert_fairseq "task.data=$MANIFESTS")
labels=(); teacher=()
case "$ROW" in
  feat_*|maskdistil_*) teacher=("criterion.teacher_checkpoint=$TEACHER") ;;        # L_feat: teacher on the fly, no labels
  ssl_feat_*) labels=("task.label_dir=$LABELS"); teacher=("criterion.teacher_checkpoint=$TEACHER") ;;
  *_init) labels=("task.label_dir=$LABELS"); teacher=("model.init_from_teacher=$TEACHER") ;;
  *) labels=("task.label_dir=$LABELS") ;;                                           # L_SSL: labels "km", MFCC for scratch
esac
# stream L: the label stream of teacher layer L (2_labels.sh's names)
stream() { if [[ $ROW == *_soft ]]; then echo "it${ITER}_l$1_t$TAU"; else echo "it${ITER}_l$1"; fi; }
train() { fairseq-hydra-train --config-dir config/ --config-name "$ROW" "${common[@]}" "$@"; }

if [[ -z "${LAYERS:-}" ]]; then
  [[ $ROW == *_soft ]] && labels+=("task.labels=[$(stream "$LAYER")]")   # soft labels of LAYER at TAU
  train "${labels[@]}" "${teacher[@]}" "hydra.run.dir=$WORK/runs/$ROW" "$@"
  exit
fi
if [[ ${#labels[@]} -eq 0 || $ROW == *scratch* ]]; then
  echo "LAYERS sweeps the teacher layer of the k-means labels: row '$ROW' reads none (pick a dicehubert_* row)" >&2
  exit 2
fi
streams=()
for layer in $LAYERS; do streams+=("$(stream "$layer")"); done
case "$LAUNCH" in
  local)
    for s in "${streams[@]}"; do
      train "${labels[@]}" "${teacher[@]}" "task.labels=[$s]" "hydra.run.dir=$WORK/runs/${ROW}_$s" "$@"
    done ;;
  slurm|submitit_local)   # one sweep over the streams: task.labels=[a],[b],... (a Slurm job array)
    sweep=$(printf '[%s],' "${streams[@]}")
    train "run=$LAUNCH" "${labels[@]}" "${teacher[@]}" "task.labels=${sweep%,}" "hydra.sweep.dir=$WORK/runs" \
      "hydra.sweep.subdir=${ROW}_\${task.labels.0}" "$@" -m ;;   # -m last: hydra's parser takes overrides first
  *) echo "LAUNCH is local, slurm or submitit_local, found '$LAUNCH'" >&2; exit 2 ;;
esac
