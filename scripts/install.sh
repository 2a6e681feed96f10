#!/usr/bin/env bash
# Create .venv and install seq2seq with its test extras and the HTTP service (`seq2seq serve`).
#
# torch comes from PyTorch's CPU index by default: PyPI's Linux torch wheel is the CUDA build,
# which pulls gigabytes of CUDA libraries. On a GPU machine, name the index of your CUDA version
# (see pytorch.org), e.g. SEQ2SEQ_TORCH_INDEX=https://download.pytorch.org/whl/cu128. A torch
# already installed in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_INDEX="${SEQ2SEQ_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # torch alone from that index, then its small dependencies from the usual one (the torch
  # already installed satisfies the pin, so the second command adds only what it needs).
  python -m pip install -q --no-deps "torch==2.13.0" --index-url "$TORCH_INDEX"
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev,serve]"
python -c "import seq2seq, torch, sentencepiece, sacrebleu, datasets, fastapi, uvicorn; print('seq2seq installed; torch', torch.__version__)"
