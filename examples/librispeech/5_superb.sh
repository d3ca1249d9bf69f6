#!/usr/bin/env bash
# 5. SUPERB with s3prl: export a student to s3prl's converted HuBERT format (dicehubert-export
#    --to s3prl) and run s3prl's PR (phoneme recognition, -d ctc) and ASR (-d asr) downstreams on
#    it through its hubert_local upstream: train on train-clean-100, pick the best on dev-clean,
#    evaluate on test-clean. s3prl is not part of this project: clone it and install it in an
#    environment where its torchaudio loads (run_downstream.py imports torchaudio), e.g.
#      git clone https://github.com/s3prl/s3prl "$WORK/s3prl" && pip install -e "$WORK/s3prl"
#    S3PRL_DIR is the clone's s3prl/ directory (run_downstream.py and the downstream configs live
#    there), S3PRL_PYTHON the python of that environment. Outputs: $WORK/superb/NAME/{pr,asr}.
#
#    examples/librispeech/5_superb.sh CHECKPOINT
#    e.g. examples/librispeech/5_superb.sh $WORK/runs/dicehubert_narrow/checkpoints/checkpoint_best.pt
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CKPT="${1:?usage: 5_superb.sh CHECKPOINT}"
: "${S3PRL_DIR:=$WORK/s3prl/s3prl}"
: "${S3PRL_PYTHON:=python3}"
name="$(basename "$(dirname "$(dirname "$CKPT")")")"
out="$WORK/superb/$name"
upstream="$out/$name.s3prl.pt"
mkdir -p "$out"
dicehubert-export "$CKPT" --to s3prl "$upstream" --force

cd "$S3PRL_DIR"
# PR: phone CTC on LibriSpeech train-clean-100 / dev-clean / test-clean (s3prl's g2p lexicon)
"$S3PRL_PYTHON" run_downstream.py -m train -u hubert_local -k "$upstream" -d ctc \
  -c downstream/ctc/libriphone.yaml -p "$out/pr" -o "config.downstream_expert.corpus.path='$LIBRISPEECH'"
"$S3PRL_PYTHON" run_downstream.py -m evaluate -e "$out/pr/dev-best.ckpt"
# ASR: character CTC (BiLSTM) without LM; s3prl first needs the utterance lengths for bucketing
"$S3PRL_PYTHON" preprocess/generate_len_for_bucket.py -i "$LIBRISPEECH" -o data/librispeech -a .flac --n_jobs 12
"$S3PRL_PYTHON" run_downstream.py -m train -u hubert_local -k "$upstream" -d asr -p "$out/asr" \
  -o "config.downstream_expert.datarc.libri_root='$LIBRISPEECH'"
"$S3PRL_PYTHON" run_downstream.py -m evaluate -t test-clean -e "$out/asr/dev-clean-best.ckpt"
