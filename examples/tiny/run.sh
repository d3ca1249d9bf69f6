#!/usr/bin/env bash
# The whole DiceHuBERT pipeline in miniature, on CPU, in one command:
#
#   examples/tiny/run.sh [WORKDIR]          (default: examples/tiny/work, git-ignored)
#
#   1. corpus   espeak-ng speech with phone transcripts ({split}.tsv + {split}.phn in WORKDIR),
#               unless WORKDIR already holds a corpus in that format (then it is checked, used as is)
#   2. teachers HuBERT iteration 1 on MFCC k-means labels, iteration 2 on k-means of an
#               iteration-1 layer (fairseq's own hubert task, model and criterion)
#   3. labels   k-means of a teacher-N2 layer, hard and soft (dicehubert-labels)
#   4. students dicehubert_narrow, dicehubert_narrow_soft, dicehubert_shallow, feat_narrow,
#               scratch_narrow: same update budget each (fairseq-hydra-train, config/ rows)
#   5. probe    phone recognition with every model frozen (dicehubert-probe)
#   6. report   WORKDIR/results.json, results.md, results.png
#   7. export   the distilled narrow student as a Hugging Face transformers directory
#               (WORKDIR/export/dicehubert_narrow_hf, dicehubert-export): parameters, size on disk
#
# Finished stages are skipped when run again (WORKDIR/.done/), an interrupted training resumes.
# Logs: WORKDIR/logs/{job}.log. Knobs (environment; defaults are the measured choice, see
# examples/tiny/README.md):
#   TINY_SEED=1 TINY_MINUTES=10 TINY_JOBS=2 TINY_TEACHER_UPDATES TINY_TEACHER_UPDATES2
#   TINY_STUDENT_UPDATES TINY_K_MFCC TINY_K TINY_LAYER_IT1 TINY_LAYER_IT2 TINY_TEMPERATURE
#   TINY_REPLICAS TINY_REPLICATE TINY_PROBE_EPOCHS TINY_OVERRIDES (extra hydra overrides)
#   TINY_PRESET=ci: a reduced run (small corpus, a handful of updates) for the test suite.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORKDIR="$(realpath -m "${1:-$HERE/work}")"
PYTHON="${PYTHON:-python}"

if [[ "${TINY_PRESET:-full}" == ci ]]; then
  : "${TINY_MINUTES:=1.5}" "${TINY_TEACHER_UPDATES:=8}" "${TINY_STUDENT_UPDATES:=6}"
  : "${TINY_K_MFCC:=8}" "${TINY_K:=8}" "${TINY_PROBE_EPOCHS:=2}" "${TINY_REPLICAS:=2}"
fi
: "${TINY_SEED:=1}" "${TINY_MINUTES:=12}"
export TINY_SEED TINY_MINUTES   # pipeline.py reads the TINY_* knobs (set or not) from the environment
if [[ "${TINY_PRESET:-full}" == ci ]]; then
  export TINY_TEACHER_UPDATES TINY_STUDENT_UPDATES TINY_K_MFCC TINY_K TINY_PROBE_EPOCHS TINY_REPLICAS
fi

for tool in "$PYTHON" fairseq-hydra-train dicehubert-labels dicehubert-probe dicehubert-export; do
  command -v "$tool" >/dev/null || { echo "run.sh: error: '$tool' not found on PATH (activate the" \
    "project's environment: 'make setup' or '. .venv/bin/activate')" >&2; exit 1; }
done

T0=$SECONDS
stage() { printf '\n== %s  [%dm%02ds]\n' "$1" $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60)); }
mkdir -p "$WORKDIR"
echo "tiny DiceHuBERT pipeline in $WORKDIR (seed $TINY_SEED)"

stage "1/4 corpus"
if [[ -e "$WORKDIR/train.tsv" || -e "$WORKDIR/valid.tsv" || -e "$WORKDIR/test.tsv" ]]; then
  echo "using the corpus already in $WORKDIR"
else
  command -v espeak-ng >/dev/null && command -v sox >/dev/null || { echo "run.sh: error: espeak-ng and" \
    "sox are needed to synthesise the corpus (apt-get install espeak-ng sox)" >&2; exit 1; }
  echo "synthesising about $TINY_MINUTES minutes of speech (espeak-ng + sox)"
  "$PYTHON" "$HERE/synth_corpus.py" --out "$WORKDIR" --minutes "$TINY_MINUTES" --seed "$TINY_SEED" \
    --jobs "${TINY_JOBS:-2}"
fi
"$PYTHON" "$HERE/check_corpus.py" "$WORKDIR"   # bad corpus: clear message, exit 1, nothing trained

stage "2/4 labels, teachers, students, probes (jobs in parallel; logs in $WORKDIR/logs)"
"$PYTHON" "$HERE/pipeline.py" "$WORKDIR"

stage "3/4 report"
"$PYTHON" "$HERE/report.py" "$WORKDIR"

stage "4/4 export"
# the distilled narrow student, out of the plugin: a transformers HubertModel directory
dicehubert-export "$WORKDIR/models/dicehubert_narrow/checkpoints/checkpoint_last.pt" --to hf \
  "$WORKDIR/export/dicehubert_narrow_hf" --force
echo "results: $WORKDIR/results.md, $WORKDIR/results.json, $WORKDIR/results.png"
echo "exported student (transformers): $WORKDIR/export/dicehubert_narrow_hf"
