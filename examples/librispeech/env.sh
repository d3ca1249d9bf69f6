# Shared settings of the LibriSpeech scripts (sourced by them; edit or export before running).
# Paths: LibriSpeech extracted under $LIBRISPEECH (train-clean-100, train-clean-360,
# train-other-500, dev-clean, ...), fairseq's HuBERT Base checkpoint, and a work directory.
: "${LIBRISPEECH:=/data/LibriSpeech}"
: "${TEACHER:=/data/models/hubert_base_ls960.pt}"   # https://dl.fbaipublicfiles.com/hubert/hubert_base_ls960.pt
: "${WORK:=$PWD/work/librispeech}"
: "${MANIFESTS:=$WORK/manifests}"                  # train.tsv (960 h), valid.tsv (dev-clean)
: "${LABELS:=$WORK/labels}"                        # {split}.{name}, dict.{name}.txt, soft files
: "${KM:=$WORK/km}"                                # k-means models (joblib)
: "${NGPU:=$(nvidia-smi -L 2>/dev/null | wc -l)}"  # GPUs for sharded label dumping
: "${LAYER:=9}"                                    # the paper's teacher layer (HuBERT Base, iteration 2)
: "${ITER:=2}"                                     # the teacher's HuBERT iteration: label streams it${ITER}_lL...
: "${K:=100}"                                      # clusters: the paper's K (500: fairseq's HuBERT iteration 2)
: "${PERCENT:=0.1}"                                # share of train utterances k-means is fitted on
: "${SEED:=0}"
export LIBRISPEECH TEACHER WORK MANIFESTS LABELS KM NGPU LAYER ITER K PERCENT SEED
# the repository root: fairseq-hydra-train runs from there (common.user_dir=dicehubert_fairseq)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
