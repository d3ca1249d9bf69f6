#!/usr/bin/env bash
# The experiments of examples/tiny/EXPERIMENTS.md, one command each:
#
#   examples/tiny/experiments.sh NAME [NAME ...]      (experiments.sh list: every name)
#
# Each runs pipeline.py on a copy of one corpus (the manifests and transcripts; the audio is
# shared) in $EXP_ROOT/NAME (default examples/tiny/work_experiments, git-ignored), then report.py,
# and copies the report's results.json to examples/tiny/results/experiments/NAME.json. With the
# shipped teachers (examples/tiny/teachers/). Corpora: 'tune' (recipe values are chosen on its
# valid split), 'A' (make tiny's corpus) and 'B' (TINY_CORPUS=other), synthesised once into
# $EXP_ROOT/corpus_{tune,A,B} with the commands of run.sh (EXP_OUT puts the copies elsewhere than
# results/experiments). Finished jobs are skipped when a command is run again (pipeline.py's .done markers).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(realpath -m "${EXP_ROOT:-$HERE/work_experiments}")"
PYTHON="${PYTHON:-python}"
OUT="$(realpath -m "${EXP_OUT:-$HERE/results/experiments}")"
MASKED="criterion.pred_nomask_weight=0"

corpus() {  # corpus NAME: the corpus directory (synthesised on first use)
  local dir="$ROOT/corpus_$1" args=()
  case "$1" in
    # the tuning corpus: the same command as train_teachers.sh's (a large valid split: 99 utterances)
    tune) args=(--minutes 14 --split-fractions 0.5,0.4,0.1 --seed 11 --text-seed 2011 --voices tune --align) ;;
    A) args=(--minutes 12 --seed 1) ;;
    A_long) args=(--minutes 36 --seed 1) ;;
    B) args=(--minutes 12 --seed 1 --voices other --text-seed 1001) ;;
    *) echo "experiments.sh: unknown corpus $1" >&2; exit 1 ;;
  esac
  if [[ ! -f "$dir/test.tsv" ]]; then
    "$PYTHON" "$HERE/synth_corpus.py" --out "$dir" --jobs 2 "${args[@]}" >&2
  fi
  echo "$dir"
}

pipeline_and_report() {  # pipeline_and_report NAME WORKDIR PIPELINE_ARGS...: results kept as OUT/NAME.{json,md}
  local name="$1" w="$2"; shift 2
  echo "== $name: pipeline.py $w $*"
  "$PYTHON" "$HERE/pipeline.py" "$w" "$@"
  "$PYTHON" "$HERE/report.py" "$w" >/dev/null
  cp "$w/results.json" "$OUT/$name.json"
  cp "$w/results.md" "$OUT/$name.md"
  echo "   $OUT/$name.json"
}

run() {  # run NAME CORPUS PIPELINE_ARGS...: pipeline + report in ROOT/NAME, results JSON kept
  local name="$1" src; src="$(corpus "$2")"; shift 2
  local w="$ROOT/$name"
  mkdir -p "$w" "$OUT"
  for f in "$src"/*.tsv "$src"/*.phn "$src"/corpus.json; do cp -p "$f" "$w/"; done
  pipeline_and_report "$name" "$w" ${EXP_TEACHER_DIR:+--teacher-dir "$EXP_TEACHER_DIR"} "$@"
}

extend() {  # extend NAME WORKDIR PIPELINE_ARGS...: more rows in a finished run.sh WORKDIR (its jobs reused)
  local name="$1" w; w="$(realpath -m "$2")"; shift 2
  [[ -f "$w/rows.json" && -f "$w/results.json" ]] || { echo "experiments.sh: $w: no finished run.sh run" \
    "there (run examples/tiny/run.sh $w first, with the same preset)" >&2; exit 1; }
  mkdir -p "$OUT"
  cp "$w/results.json" "$w/results.preset.json"   # the preset's own report, kept beside the extended one
  pipeline_and_report "$name" "$w" "$@"
}
# the default preset's rows plus the experiments of issue 18 (5b-5d, a student of the N=1 teacher) and issue 20 (masking distillation,
# the conv student), and the paper's loss: 3 seeds (the default preset's first 3 are reused), 160 updates
MORE_ROWS=dicehubert_narrow,dicehubert_shallow,feat_narrow,scratch_narrow,dicehubert_narrow_10x,feat_narrow_10x
MORE_ROWS+=,dicehubert_narrow_1layer,dicehubert_narrow_l1,maskdistil_narrow,dicehubert_conv,dicehubert_narrow_masked
MORE_ROWS+=,dicehubert_narrow_n1

narrow() { echo --rows dicehubert_narrow --replicas 3; }
n1() { echo --rows dicehubert_narrow_n1 --replicas 3; }  # students of teacher_n1's chosen layer
both() { echo --rows dicehubert_narrow,dicehubert_shallow --replicas 3; }  # narrow and shallow students

case "${1:-list}" in list) sed -n '/^for exp in/,$p' "$0" | grep -oE '^    [A-Za-z0-9_.-]+\)' | tr -d ' )'; exit 0 ;; esac
for exp in "$@"; do
  case "$exp" in
    # T1: the students' loss and learning rate (tuning corpus, narrow students of teacher_n1's chosen
    # layer, 3 seeds, 400 updates): run while teacher_n2 was training
    t1_both_lr2e-3) run "$exp" tune $(n1) --student-updates 400 ;;
    t1_masked_lr1e-3) run "$exp" tune $(n1) --student-updates 400 --extra-overrides "$MASKED optimization.lr=[0.001]" ;;
    t1_masked_lr5e-4) run "$exp" tune $(n1) --student-updates 400 --extra-overrides "$MASKED optimization.lr=[0.0005]" ;;
    # T2: the students' learning rate and K at the default preset's budget (tuning corpus, narrow
    # students of the shipped teacher_n2's chosen layer, 3 seeds, 200 updates, loss as T1 chose)
    t2_lr1e-3) run "$exp" tune $(narrow) --student-updates 200 --extra-overrides "optimization.lr=[0.001]" ;;
    t2_lr2e-3) run "$exp" tune $(narrow) --student-updates 200 ;;
    t2_lr4e-3) run "$exp" tune $(narrow) --student-updates 200 --extra-overrides "optimization.lr=[0.004]" ;;
    t2_k50) run "$exp" tune $(narrow) --student-updates 200 --k 50 ;;
    t2_k200) run "$exp" tune $(narrow) --student-updates 200 --k 200 ;;
    # the rows beyond the default preset, in make tiny's finished work directory (corpus A) and in
    # TINY_CORPUS=other's (corpus B): EXP_DEFAULT_A / EXP_DEFAULT_B name them
    more_rows_A) extend "$exp" "${EXP_DEFAULT_A:?set EXP_DEFAULT_A to a finished make tiny WORKDIR}" \
      --student-updates 160 --replicas 3 --rows "$MORE_ROWS" ;;
    more_rows_B) extend "$exp" "${EXP_DEFAULT_B:?set EXP_DEFAULT_B to a finished TINY_CORPUS=other WORKDIR}" \
      --student-updates 160 --replicas 3 --rows "$MORE_ROWS" ;;
    # narrow vs shallow at three budgets (issue 18, 5c): corpus A, 3 seeds, the students' updates only
    # changing (the default preset is 160 updates, the long one 500)
    budget_400_A) run "$exp" A $(both) --student-updates 400 ;;
    budget_1600_A) run "$exp" A $(both) --student-updates 1600 ;;
    budget_3200_A) run "$exp" A $(both) --student-updates 3200 ;;
    *) echo "experiments.sh: unknown experiment '$exp' (experiments.sh list)" >&2; exit 1 ;;
  esac
done
