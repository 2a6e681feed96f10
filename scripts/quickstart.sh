#!/usr/bin/env bash
# The main job on the built-in synthetic task: install, prepare, train, translate, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
run=runs/quickstart
seq2seq prepare recipes/quickstart.yaml
seq2seq train recipes/quickstart.yaml
seq2seq generate-data data/synthetic --train 0 --valid 0 --test 500 >/dev/null
echo "--- a few translations (source, then output):"
head -n 3 data/synthetic/test.en
head -n 3 data/synthetic/test.en | seq2seq translate --checkpoint "$run/best.pt"
seq2seq evaluate recipes/quickstart.yaml
