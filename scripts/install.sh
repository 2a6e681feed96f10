#!/usr/bin/env bash
# Create .venv and install seq2seq with its test extras. torch is pinned to the CPU build first:
# an unpinned torch would pull a multi-gigabyte CUDA build. On a GPU machine, install the torch
# build for your CUDA version before running this script, and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -c "import seq2seq, torch, sentencepiece, sacrebleu, datasets; print('seq2seq installed; torch', torch.__version__)"
