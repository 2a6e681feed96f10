#!/usr/bin/env bash
# The checks the issues ask to be shown on a GPU, in one command, on a machine with one GPU:
#
#   SEQ2SEQ_DATA=/path/to/data bash scripts/gpu_checks.sh OUT_DIR [STEPS_FOR_NCCL]
#
# Runs from the repository root with `python3 -m seq2seq` (no install needed when torch,
# sentencepiece, sacrebleu, datasets, pyyaml and tqdm import). Everything it measures is written
# under OUT_DIR: logs, benchmark JSON, evaluation reports and a summary.txt; runs go to
# $RUNS (default /tmp/seq2seq-gpu-runs). In order, so that the cheap checks come first:
#   1. the tests marked gpu (graphed training steps against eager ones);
#   2. scripts/benchmark.py on recipes/multi30k/de-en.gru.yaml: eager, CUDA graphs, bf16 graphs;
#   3. NCCL: a torchrun group of one against a single process, loss curves side by side;
#   4. recipes/multi30k/de-en.gru.yaml trained with CUDA graphs, evaluated with beam 5 and
#      greedy (BLEU, wall time);
#   5. recipes/multi30k/en-de.lstm.yaml trained (eagerly: LSTM) and evaluated.
set -euo pipefail

out=${1:?usage: gpu_checks.sh OUT_DIR [STEPS_FOR_NCCL]}
nccl_steps=${2:-300}
runs=${RUNS:-/tmp/seq2seq-gpu-runs}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export SEQ2SEQ_DATA=${SEQ2SEQ_DATA:-$PWD/../shared/data}
mkdir -p "$out" "$runs"
summary="$out/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

note "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
note "torch $($py -c 'import torch; print(torch.__version__, torch.version.cuda)')"

note "== 1. tests marked gpu"
$py -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -n 3 \
    | tee -a "$summary"

note "== 2. benchmark (training tokens/s after a whole epoch of warm-up; decoding sent/s)"
gru=recipes/multi30k/de-en.gru.yaml
for variant in "eager train.precision=fp32" \
               "graphs train.precision=fp32 train.cuda_graphs=true decode.cuda_graphs=true" \
               "graphs-bf16 train.precision=bf16 train.cuda_graphs=true decode.cuda_graphs=true"; do
    set -- $variant
    name=$1; shift
    $py scripts/benchmark.py $gru "$@" --device cuda --work-dir "$runs/bench" --warmup 120 \
        --steps 100 --json "$out/bench-$name.json" > "$out/bench-$name.log" 2>&1 \
        || { note "benchmark $name failed: see bench-$name.log"; continue; }
    $py - "$out/bench-$name.json" "$name" <<'EOF' | tee -a "$summary"
import json, sys
r = json.load(open(sys.argv[1]))
t = r["train"]
print(f"{sys.argv[2]}: {t['target_tokens_per_s']:,.0f} target tokens/s, "
      f"{t['peak_memory_mib']:,.0f} MiB peak, graphs {t['cuda_graphs']}; "
      + ", ".join(f"beam {d['beam']} {d['sentences_per_s']:,.0f} sent/s" for d in r["decode"]))
EOF
done

note "== 3. NCCL: torchrun group of one vs single process, $nccl_steps steps"
for mode in single nccl; do
    args=("$gru" "output_dir=$runs/$mode" "train.max_steps=$nccl_steps" "train.max_epochs=0"
          "train.valid_every=100000" "train.log_every=10" "train.precision=fp32"
          "model.dropout=0.0")
    if [ $mode = nccl ]; then
        $py -m torch.distributed.run --nproc-per-node=1 --rdzv-backend=c10d \
            --rdzv-endpoint=127.0.0.1:0 -m seq2seq train "${args[@]}" distributed.backend=nccl \
            > "$out/$mode.log" 2>&1 || note "nccl run failed: see nccl.log"
    else
        $py -m seq2seq train "${args[@]}" > "$out/$mode.log" 2>&1 || note "single run failed"
    fi
done
grep -h "process group" "$out/nccl.log" | tee -a "$summary" || note "no process group line!"
$py - "$runs/single/metrics.jsonl" "$runs/nccl/metrics.jsonl" <<'EOF' | tee -a "$summary"
import json, sys
curves = [{r["step"]: r["loss"] for r in map(json.loads, open(p)) if r["split"] == "train"}
          for p in sys.argv[1:]]
steps = sorted(curves[0])
worst = max(abs(curves[0][s] - curves[1][s]) / abs(curves[0][s]) for s in steps)
print(f"{len(steps)} logged losses; largest relative difference {worst:.2e}; "
      f"last: single {curves[0][steps[-1]]:.5f}, nccl {curves[1][steps[-1]]:.5f}")
EOF

train_and_evaluate() {  # name recipe overrides...
    local name=$1 recipe=$2; shift 2
    local start=$SECONDS
    $py -m seq2seq train "$recipe" "output_dir=$runs/$name" "$@" > "$out/$name-train.log" 2>&1 \
        || note "$name: training failed, see $name-train.log"
    note "$name: training took $((SECONDS - start)) s wall; $(grep -h '^stopped' \
        "$out/$name-train.log" | tail -n 1)"
    grep -h "^model:" "$out/$name-train.log" | tee -a "$summary"
    grep -h -e "^peak GPU memory" -e "^trained on" "$out/$name-train.log" | tee -a "$summary" \
        || true
    for search in "5 decode.cuda_graphs=false" "5 decode.cuda_graphs=true" \
                  "1 decode.cuda_graphs=false"; do
        set -- $search "$@"
        local beam=$1 graphs=$2; shift 2
        local tag="$name-beam$beam-${graphs#decode.cuda_graphs=}"
        $py -m seq2seq evaluate "$recipe" "output_dir=$runs/$name" "$graphs" "$@" --beam $beam \
            --report-dir "$out/$tag" > "$out/$tag.log" 2>&1 \
            || { note "$tag: evaluate failed"; continue; }
        $py - "$out/$tag/report.json" "$tag (search graphs: ${graphs#*=})" <<'EOF' \
            | tee -a "$summary"
import json, sys
for t in json.load(open(sys.argv[1]))["test_sets"]:
    b = t["bleu"]
    print(f"{sys.argv[2]}: {t['name']} BLEU {b['score']:.2f} (95% CI {b['ci']['low']:.2f}-"
          f"{b['ci']['high']:.2f}) {b['signature']}; chrF {t['chrf']['score']:.2f}")
EOF
    done
}

note "== 4. Multi30k GRU recipe with CUDA graphs"
train_and_evaluate gru "$gru" train.cuda_graphs=true
note "== 5. Multi30k LSTM recipe"
train_and_evaluate lstm recipes/multi30k/en-de.lstm.yaml
note "== done $(date -u +%FT%TZ)"
