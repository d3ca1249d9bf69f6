#!/usr/bin/env bash
# 1. fairseq manifests for LibriSpeech 960 h, with fairseq's own wav2vec_manifest.py (the
#    convention HubertDataset reads: first line the audio root, then "relpath<TAB>num_samples").
#    train.tsv: train-clean-100 + train-clean-360 + train-other-500 (281241 utterances);
#    valid.tsv: dev-clean. (HuBERT's own recipe uses the same files.)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

SCRIPT="$(python -c 'import fairseq, os; print(os.path.dirname(fairseq.__file__))')/examples/wav2vec/wav2vec_manifest.py"
mkdir -p "$MANIFESTS" "$WORK/train-960"
# one root for the three training subsets (symbolic links, nothing copied)
for subset in train-clean-100 train-clean-360 train-other-500; do
  [[ -d "$LIBRISPEECH/$subset" ]] || { echo "missing $LIBRISPEECH/$subset" >&2; exit 1; }
  ln -sfn "$LIBRISPEECH/$subset" "$WORK/train-960/$subset"
done
python "$SCRIPT" "$WORK/train-960" --dest "$MANIFESTS" --ext flac --valid-percent 0
python "$SCRIPT" "$LIBRISPEECH/dev-clean" --dest "$WORK/manifests-dev" --ext flac --valid-percent 0
mv "$WORK/manifests-dev/train.tsv" "$MANIFESTS/valid.tsv"
rmdir "$WORK/manifests-dev"
wc -l "$MANIFESTS"/{train,valid}.tsv
