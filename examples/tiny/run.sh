#!/usr/bin/env bash
# The whole DiceHuBERT pipeline in miniature, on CPU, in one command:
#
#   examples/tiny/run.sh [WORKDIR]          (default: examples/tiny/work, git-ignored)
#
#   1. corpus   espeak-ng speech with phone transcripts ({split}.tsv + {split}.phn in WORKDIR),
#               unless WORKDIR already holds a corpus in that format (then it is checked, used as is)
#   2. labels, students, probes (teachers: the pretrained ones in examples/tiny/teachers/,
#               checksums verified first; TINY_TEACHER=train trains teachers here instead)
#               labels  k-means (K=100) of teacher_n2's layer chosen on the tuning corpus, hard and soft
#               students the rows of the preset, same update budget each, several seeds each
#               probes  phone recognition with every model frozen (dicehubert-probe)
#   3. report   WORKDIR/results.json, results.md, results.png
#   4. export   the distilled narrow student as a Hugging Face transformers directory
#               (WORKDIR/export/dicehubert_narrow_hf, dicehubert-export): parameters, size on disk
#
# Finished stages are skipped when run again (WORKDIR/.done/), an interrupted training resumes.
# Logs: WORKDIR/logs/{job}.log. Knobs (environment; defaults are the measured choice, see
# examples/tiny/README.md and EXPERIMENTS.md):
#   TINY_SEED=1 (first student seed) TINY_MINUTES=12 TINY_JOBS=2
#   TINY_CORPUS=default|other (voice set and sentences, see synth_corpus.py; the tuning corpus,
#   where recipe values are chosen, is made by train_teachers.sh and experiments.sh)
#   TINY_TEACHER=shipped|train TINY_TEACHER_DIR (the shipped teachers, examples/tiny/teachers)
#   TINY_TEACHERS (teacher pairs trained with TINY_TEACHER=train, 2)
#   TINY_TEACHER_UPDATES TINY_TEACHER_UPDATES2 TINY_STUDENT_UPDATES TINY_ROWS (student rows,
#   comma-separated: pipeline.py --help) TINY_REPLICAS (seeds per row) TINY_K_MFCC TINY_K
#   TINY_LAYER_IT1 TINY_LAYER_IT2 TINY_TEMPERATURE TINY_LAYER_PROBES TINY_LAYER_PROBE_LAYERS TINY_PROBE_EPOCHS
#   TINY_PROBE_TRAIN_UTTERANCES TINY_OVERRIDES (extra hydra overrides)
#   TINY_PRESET=default (under 20 min on 2 cores), long (more speech, more rows, longer students,
#   8 seeds; estimated under 2 h on 2 cores from per-update times, not yet run), ci: a reduced run for the test suite (a small corpus, two
#   few-update teacher pairs trained here, a handful of updates per student).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORKDIR="$(realpath -m "${1:-$HERE/work}")"
PYTHON="${PYTHON:-python}"

case "${TINY_PRESET:=default}" in
  default)  # the paper's four main rows, 5 seeds each; 160 updates per student keep it under 20 min
    : "${TINY_STUDENT_UPDATES:=160}" ;;
  long)  # more speech, two extra rows (a conv student, the paper's loss), longer students, 8 seeds;
    # maskdistil_narrow (experiments.sh more_rows_A) is left out: at 400 s per 500-update seed it would
    # take the preset past 2 hours
    : "${TINY_MINUTES:=24}" "${TINY_STUDENT_UPDATES:=500}" "${TINY_REPLICAS:=8}"
    : "${TINY_ROWS:=dicehubert_narrow,dicehubert_shallow,feat_narrow,scratch_narrow,dicehubert_conv,dicehubert_narrow_masked}"
    : "${TINY_PROBE_TRAIN_UTTERANCES:=120}" ;;
  ci)
    : "${TINY_MINUTES:=3}" "${TINY_TEACHER:=train}" "${TINY_TEACHER_UPDATES:=8}" "${TINY_STUDENT_UPDATES:=6}"
    : "${TINY_K_MFCC:=8}" "${TINY_K:=8}" "${TINY_LAYER_IT1:=6}" "${TINY_LAYER_IT2:=6}" "${TINY_PROBE_EPOCHS:=20}"
    : "${TINY_REPLICAS:=2}" "${TINY_LAYER_PROBES:=teacher_n2}" "${TINY_LAYER_PROBE_LAYERS:=0,1,6,12}"
    : "${TINY_ROWS:=dicehubert_narrow,dicehubert_shallow,feat_narrow,scratch_narrow,dicehubert_narrow_soft}" ;;
  *) echo "run.sh: error: TINY_PRESET=$TINY_PRESET: expected 'default', 'long' or 'ci'" >&2; exit 1 ;;
esac
: "${TINY_SEED:=1}" "${TINY_MINUTES:=12}" "${TINY_TEACHER:=shipped}" "${TINY_TEACHER_DIR:=$HERE/teachers}"
# pipeline.py reads the TINY_* knobs that are set from the environment (unset ones stay unset)
export TINY_SEED TINY_MINUTES TINY_TEACHER TINY_TEACHER_DIR TINY_TEACHERS TINY_TEACHER_UPDATES TINY_TEACHER_UPDATES2 \
  TINY_STUDENT_UPDATES TINY_ROWS TINY_K_MFCC TINY_K TINY_LAYER_IT1 TINY_LAYER_IT2 TINY_LAYER_PROBES \
  TINY_LAYER_PROBE_LAYERS TINY_PROBE_TRAIN_UTTERANCES TINY_PROBE_EPOCHS TINY_REPLICAS TINY_TEMPERATURE TINY_OVERRIDES TINY_JOBS

for tool in "$PYTHON" fairseq-hydra-train dicehubert-labels dicehubert-probe dicehubert-export; do
  command -v "$tool" >/dev/null || { echo "run.sh: error: '$tool' not found on PATH (activate the" \
    "project's environment: 'make setup' or '. .venv/bin/activate')" >&2; exit 1; }
done
# optional dependencies, checked before any work: without matplotlib everything but the plot runs
if ! "$PYTHON" -c "import matplotlib" 2>/dev/null; then
  echo "note: matplotlib is not installed: results.md and results.json will be written, results.png skipped" \
    "(to get it: pip install -e '.[plot]', then run $PYTHON $HERE/report.py WORKDIR again)"
fi
case "${TINY_CORPUS:=default}" in
  default) CORPUS_ARGS=() ;;
  other) CORPUS_ARGS=(--voices other --text-seed $((TINY_SEED + 1000))) ;;
  *) echo "run.sh: error: TINY_CORPUS=$TINY_CORPUS: expected 'default' or 'other'" >&2; exit 1 ;;
esac
case "$TINY_TEACHER" in
  shipped)  # the pretrained teachers, checked before any work (every load checks them again)
    "$PYTHON" "$HERE/teachers.py" verify --dir "$TINY_TEACHER_DIR" || { echo "run.sh: error: the shipped teachers cannot be used (above);" \
      "restore them (git checkout -- examples/tiny/teachers) or train teachers here: TINY_TEACHER=train" >&2; exit 1; } ;;
  train) ;;
  *) echo "run.sh: error: TINY_TEACHER=$TINY_TEACHER: expected 'shipped' or 'train'" >&2; exit 1 ;;
esac

T0=$SECONDS
LAST=$SECONDS
TIMES=""
mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
stage() {  # stage SHORT_NAME HEADER: prints the header; records the time of the previous stage
  [[ -n "${CURRENT:-}" ]] && TIMES+="$(printf '  %-10s %s' "$CURRENT" "$(mmss $((SECONDS - LAST)))")"$'\n'
  CURRENT="$1"; LAST=$SECONDS
  printf '\n== %s  [%s]\n' "$2" "$(mmss $((SECONDS - T0)))"
}
mkdir -p "$WORKDIR"
echo "tiny DiceHuBERT pipeline in $WORKDIR (preset $TINY_PRESET, teachers $TINY_TEACHER, first seed $TINY_SEED)"

stage corpus "1/4 corpus"
if [[ -e "$WORKDIR/train.tsv" || -e "$WORKDIR/valid.tsv" || -e "$WORKDIR/test.tsv" ]]; then
  echo "using the corpus already in $WORKDIR"
else
  command -v espeak-ng >/dev/null && command -v sox >/dev/null || { echo "run.sh: error: espeak-ng and" \
    "sox are needed to synthesise the corpus (apt-get install espeak-ng sox)" >&2; exit 1; }
  echo "synthesising about $TINY_MINUTES minutes of speech (espeak-ng + sox; voices: $TINY_CORPUS)"
  "$PYTHON" "$HERE/synth_corpus.py" --out "$WORKDIR" --minutes "$TINY_MINUTES" --seed "$TINY_SEED" \
    --jobs "${TINY_JOBS:-2}" ${CORPUS_ARGS[@]+"${CORPUS_ARGS[@]}"}
fi
"$PYTHON" "$HERE/check_corpus.py" "$WORKDIR"   # bad corpus: clear message, exit 1, nothing trained

stage training "2/4 labels, students, probes (teachers: $TINY_TEACHER; jobs in parallel; logs in $WORKDIR/logs)"
"$PYTHON" "$HERE/pipeline.py" "$WORKDIR"

stage report "3/4 report"
"$PYTHON" "$HERE/report.py" "$WORKDIR"

stage export "4/4 export"
# the distilled narrow student, out of the plugin: a transformers HubertModel directory
dicehubert-export "$WORKDIR/models/dicehubert_narrow/checkpoints/checkpoint_last.pt" --to hf \
  "$WORKDIR/export/dicehubert_narrow_hf" --force
stage done "done"
printf 'time per stage:\n%s  total %s\n' "$TIMES" "$(mmss $((SECONDS - T0)))"
if [[ -f "$WORKDIR/results.png" ]]; then
  echo "results: $WORKDIR/results.md, $WORKDIR/results.json, $WORKDIR/results.png"
else
  echo "results: $WORKDIR/results.md, $WORKDIR/results.json (no results.png: matplotlib is not installed)"
fi
echo "exported student (transformers): $WORKDIR/export/dicehubert_narrow_hf"
