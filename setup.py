"""dicehubert_fairseq: DiceHuBERT (arXiv 2507.02911) as a fairseq user-dir plugin."""

from setuptools import find_packages, setup

# The canonical fairseq 0.12.2 sdist does not build on Python >= 3.11 (see README,
# "Installation"). ve-fairseq ships prebuilt CPython 3.11/3.12 manylinux x86_64 wheels of
# the same `fairseq` package; fairseq-fixed is the sdist for everything else.
_VE_FAIRSEQ = (
    "python_version >= '3.11' and python_version < '3.13' and "
    "platform_system == 'Linux' and platform_machine == 'x86_64'"
)
# PEP 508 has no `not`: the complement, spelled out.
_FAIRSEQ_FIXED = (
    "python_version < '3.11' or python_version >= '3.13' or "
    "platform_system != 'Linux' or platform_machine != 'x86_64'"
)

setup(
    name="dicehubert_fairseq",
    version="0.1.0",
    description="DiceHuBERT: distilling HuBERT with a self-supervised objective, as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dicehubert_fairseq", "dicehubert_fairseq.*"]),
    python_requires=">=3.11,<3.13",  # the range tested: CI runs the suite on 3.11 and on 3.12
    install_requires=[
        # Bounded: an open range resolves to a newer CUDA build plus GBs of nvidia wheels.
        "torch>=2.1,<2.14",
        f"ve-fairseq==0.12.3; {_VE_FAIRSEQ}",
        f"fairseq-fixed==0.12.3.1; {_FAIRSEQ_FIXED}",
        "numpy>=1.24",
        # public API only (MiniBatchKMeans, fit, cluster_centers_): labels/kmeans.py
        "scikit-learn>=1.3",
        "threadpoolctl>=2.0",
        "joblib>=1.2",
        "soundfile>=0.12",
        "tqdm>=4.60",
        # the probe's PER (fairseq's CTC criterion uses it too)
        "editdistance>=0.6,<0.9",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
    ],
    extras_require={
        # run/slurm.yaml launches through hydra's submitit launcher (what fairseq's recipes use);
        # the tests compose that overlay, so they need it too.
        "slurm": ["hydra-submitit-launcher>=1.2"],
        # dicehubert-export --to hf and dicehubert-probe on HF directories. Bounded to what is
        # tested (5.10.4): transformers 5.20.2 and 5.24.0 import torchaudio whenever it is
        # installed (fairseq pulls it in), and that torchaudio does not load beside torch 2.13.
        "export": ["transformers>=5.10,<5.11", "safetensors>=0.8,<0.9"],
        # s3prl: its HuBERT loading code is run by tests/e2e/test_export.py (an sdist with light
        # dependencies: requests, filelock, protobuf; its torchaudio is fairseq's).
        "test": ["pytest>=7", "hypothesis>=6", "hydra-submitit-launcher>=1.2",
                 "transformers>=5.10,<5.11", "safetensors>=0.8,<0.9", "s3prl==0.4.18"],
        # results.png of examples/tiny; everything else works without it.
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "dicehubert-labels=dicehubert_fairseq.labels.cli:main",
            "dicehubert-probe=dicehubert_fairseq.probe.cli:main",
            "dicehubert-export=dicehubert_fairseq.export.cli:main",
        ]
    },
)
