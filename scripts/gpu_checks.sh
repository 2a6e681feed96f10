#!/usr/bin/env bash
# The checks the issues ask to be shown on a GPU, in one command, on a machine with one GPU:
#
#   SEQ2SEQ_DATA=/path/to/data bash scripts/gpu_checks.sh OUT_DIR [CHECKS]
#
# CHECKS is a comma-separated list of the numbered checks below (default: all), so that the
# work can be split over several calls of a time-limited machine. Runs from the repository
# root with `python3 -m seq2seq` (no install needed when torch, sentencepiece, sacrebleu,
# datasets, pyyaml and tqdm import). What it measures goes under OUT_DIR: logs, benchmark
# JSON, evaluation reports and summary.txt; runs go to $RUNS (default /tmp/seq2seq-gpu-runs).
# $EXTRA holds recipe overrides added to checks 4-6 (e.g. for a quick smoke run on a CPU:
# EXTRA="train.device=cpu train.max_steps=2 train.max_epochs=0").
#   1. the tests marked gpu (graphed training steps and graphed beam search against eager);
#   2. scripts/benchmark.py on recipes/multi30k/de-en.gru.yaml: eager, CUDA graphs, bf16 graphs;
#   3. NCCL: a torchrun group of one against a single process, loss curves side by side
#      ($NCCL_STEPS updates, default 300);
#   4. recipes/multi30k/de-en.gru.yaml trained with CUDA graphs, evaluated with beam 5 (plain
#      and graphed search) and greedy (BLEU, wall time, tokens/s, peak memory);
#   5. the same without input feeding: the parallel decoder (one cuDNN call per layer), for
#      its quality next to the input-feeding decoder;
#   6. recipes/multi30k/en-de.lstm.yaml trained as the recipe says (eagerly) and evaluated;
#   7. decoding speed of the model check 4 trained: scripts/benchmark.py on its best.pt, the
#      test set repeated to 10,000 sentences, beam 5 and greedy, plain search against graphs
#      (sentences/s and BLEU side by side).
#
# On the project's lent GPU machine (see its device README: a call is at most 10 minutes, the
# machine is bare again at the next call, and at most 8 files come back from $OUT), group the
# checks that share a run into one call and bring one archive back, e.g. with carry
# [".whl", ".data"]:
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit
#   SEQ2SEQ_DATA=$PWD/.data bash scripts/gpu_checks.sh /tmp/o 4,7; tar czf $OUT/o.tgz -C /tmp o
# with "1,3,5", "4,7", "6" and "2" as the four calls.
#
# CHECKS=quick is the one-call mode for a machine lent for 15 minutes (quick:2,3 runs only those
# checks the same way): checks 1, 2 (shorter:
# $BENCH_ARGS, default --warmup 120 --steps 40 --repeat 2000), 3 ($NCCL_STEPS default 50) and 4
# (beam 5 with graphs only), within $BUDGET seconds (default 480): each part runs under
# `timeout` for what is left, and summary.txt is written as it goes, so a call cut short still
# returns what was measured. Checked end to end on a CPU with the smoke override
#   RECIPE=recipes/quickstart.yaml DEVICE=cpu BACKEND=gloo NCCL_STEPS=4 \
#   BENCH_ARGS="--warmup 1 --steps 2 --repeat 50" \
#   EXTRA="train.device=cpu train.max_steps=4 train.max_epochs=0 train.log_every=1" \
#   bash scripts/gpu_checks.sh /tmp/o quick
set -euo pipefail

out=${1:?usage: gpu_checks.sh OUT_DIR [CHECKS|quick]}
quick=false
checks=",${2:-1,2,3,4,5,6,7},"
if [[ ${2:-} == quick* ]]; then
    quick=true
    deadline=$((SECONDS + ${BUDGET:-480}))
    checks=",${2#quick:},"
    [[ $2 == quick ]] && checks=",1,2,3,4,"
fi
# A name that is no check would run nothing and say "done": refuse it before any work.
if [[ ! $checks =~ ^,([1-7],)+$ ]]; then
    echo "error: gpu_checks.sh: '${2:-}' is not a list of checks: give numbers 1-7, comma-separated" \
         "without spaces, or quick, or quick:N,M" >&2
    exit 2
fi
nccl_steps=${NCCL_STEPS:-$([[ $quick == true ]] && echo 50 || echo 300)}
# A warm-up of a whole epoch (de-en.gru: about 114 updates on the CPU, 110 in the H200 run)
# captures every bucket shape before the timed steps.
bench_args=${BENCH_ARGS:-$([[ $quick == true ]] && echo "--warmup 120 --steps 40 --repeat 2000" \
                          || echo "--warmup 120 --steps 100")}
device=${DEVICE:-cuda}
backend=${BACKEND:-nccl}
runs=${RUNS:-/tmp/seq2seq-gpu-runs}
py=${PYTHON:-python3}
gru=${RECIPE:-recipes/multi30k/de-en.gru.yaml}
export PYTHONUNBUFFERED=1
# scripts/benchmark.py imports seq2seq from the checkout, installed or not.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export SEQ2SEQ_DATA=${SEQ2SEQ_DATA:-$PWD/../shared/data}
mkdir -p "$out" "$runs"
summary="$out/summary.txt"

note() { echo "$*" | tee -a "$summary"; }
# In quick mode, a command gets what is left of the budget (at least 5 s), then is stopped.
limited() {
    if [[ $quick == true ]]; then
        local left=$((deadline - SECONDS))
        timeout -k 10 "$((left > 5 ? left : 5))" "$@"
    else
        "$@"
    fi
}
wanted() { [[ $checks == *",$1,"* ]]; }

summarise_benchmark() {  # JSON name
    $py - "$1" "$2" <<'EOF' | tee -a "$summary"
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get("train")
trained = (f"{t['target_tokens_per_s']:,.0f} target tokens/s, {t['peak_memory_mib']:,.0f} MiB "
           f"peak, graphs {t['cuda_graphs']} ({t['cuda_graphs_captured_while_timed']} captured "
           f"while timed); ") if t else ""
print(f"{sys.argv[2]}: {trained}"
      + ", ".join(f"beam {d['beam']} {d['sentences_per_s']:,.0f} sent/s BLEU {d['bleu']:.2f} "
                  f"({d['sentences']:,} sentences, graphs {d['cuda_graphs']})"
                  for d in r["decode"]))
EOF
}

summarise_report() {  # report.json label
    $py - "$1" "$2" <<'EOF' | tee -a "$summary"
import json, sys
for t in json.load(open(sys.argv[1]))["test_sets"]:
    b = t["bleu"]
    print(f"{sys.argv[2]}: {t['name']} BLEU {b['score']:.2f} (95% CI {b['ci']['low']:.2f}-"
          f"{b['ci']['high']:.2f}) {b['signature']}; chrF {t['chrf']['score']:.2f}")
EOF
}

compare_curves() {  # metrics.jsonl metrics.jsonl
    $py - "$1" "$2" <<'EOF' | tee -a "$summary"
import json, sys
curves = [{r["step"]: r["loss"] for r in map(json.loads, open(p)) if r["split"] == "train"}
          for p in sys.argv[1:]]
steps = sorted(curves[0])
worst = max(abs(curves[0][s] - curves[1][s]) / abs(curves[0][s]) for s in steps)
print(f"{len(steps)} logged losses; largest relative difference {worst:.2e}; "
      f"last: single {curves[0][steps[-1]]:.5f}, nccl {curves[1][steps[-1]]:.5f}")
EOF
}

train_and_evaluate() {  # name recipe overrides...
    local name=$1 recipe=$2 start=$SECONDS
    shift 2
    # shellcheck disable=SC2206  # EXTRA is a list of words
    set -- "$@" ${EXTRA:-}
    limited $py -m seq2seq train "$recipe" "output_dir=$runs/$name" "$@" \
        > "$out/$name-train.log" 2>&1 \
        || note "$name: training failed, see $name-train.log"
    note "$name: training took $((SECONDS - start)) s wall"
    grep -h -e "^model:" -e "^stopped" -e "^trained on" -e "^peak GPU memory" \
        "$out/$name-train.log" | tee -a "$summary" || true
    local search beam graphs tag flags
    local searches=("5 false" "5 true" "1 false")
    [[ $quick == true ]] && searches=("5 true")
    for search in "${searches[@]}"; do
        read -r beam graphs <<< "$search"
        tag="$name-beam$beam-graphs-$graphs"
        flags=(--beam "$beam")
        if [[ $beam == 1 ]]; then
            flags+=(--alpha 0)  # greedy search (beam 1 with the recipe's alpha is beam search)
        fi
        limited $py -m seq2seq evaluate "$recipe" "output_dir=$runs/$name" "$@" \
            "decode.cuda_graphs=$graphs" "${flags[@]}" --report-dir "$out/$tag" \
            > "$out/$tag.log" 2>&1 || { note "$tag: evaluate failed"; continue; }
        summarise_report "$out/$tag/report.json" "$tag"
    done
}

note "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader \
    2>/dev/null || echo "no GPU: device $device")$([[ $quick == true ]] && echo ", quick mode")"
note "torch $($py -c 'import torch; print(torch.__version__, torch.version.cuda)')"
# Every check prepares data with the datasets package: say at once if it cannot be imported.
note "$($py -c 'import datasets, pyarrow; print("datasets", datasets.__version__, "pyarrow",
pyarrow.__version__)' 2>&1 | tail -n 1)"

if wanted 1; then
    note "== 1. tests marked gpu"
    # A failing test must not end the script (set -e, pipefail): the other checks still run.
    # Only the modules that hold gpu tests are collected: others may need what the GPU machine
    # lacks (the serve extra).
    # shellcheck disable=SC2046  # file names without spaces
    { limited $py -m pytest -q -m gpu -p no:cacheprovider \
        $(grep -rl --include='test_*.py' 'mark.gpu' tests) 2>&1 || true; } \
        | tee "$out/gpu_tests.log" | tail -n 3 | tee -a "$summary"
fi

if wanted 2; then
    note "== 2. benchmark (training tokens/s after a whole epoch of warm-up; decoding sent/s at a"
    note "   fixed output length of 24 tokens, so that untrained models cost what trained ones do)"
    fixed="decode.min_len=24 decode.max_len_ratio=1e-9 decode.max_len_add=24"
    for variant in "eager train.precision=fp32" \
            "graphs train.precision=fp32 train.cuda_graphs=true decode.cuda_graphs=true" \
            "graphs-bf16 train.precision=bf16 train.cuda_graphs=true decode.cuda_graphs=true"; do
        read -r name overrides <<< "$variant"
        # shellcheck disable=SC2086  # the overrides and bench_args are words
        limited $py scripts/benchmark.py "$gru" $overrides $fixed --device "$device" \
            --work-dir "$runs/bench" $bench_args --json "$out/bench-$name.json" \
            > "$out/bench-$name.log" 2>&1 \
            || { note "benchmark $name failed: see bench-$name.log"; continue; }
        summarise_benchmark "$out/bench-$name.json" "$name"
    done
fi

if wanted 3; then
    note "== 3. $backend: torchrun group of one vs single process, $nccl_steps updates"
    args=("train.max_steps=$nccl_steps" "train.max_epochs=0" "train.valid_every=100000"
          "train.log_every=10" "train.precision=fp32" "model.dropout=0.0")
    # shellcheck disable=SC2206  # EXTRA is a list of words
    [[ $quick == true ]] && args+=(${EXTRA:-})
    limited $py -m seq2seq train "$gru" "output_dir=$runs/single" "${args[@]}" \
        > "$out/single.log" 2>&1 || note "single-process run failed: see single.log"
    limited $py -m torch.distributed.run --nproc-per-node=1 --rdzv-backend=c10d \
        --rdzv-endpoint=127.0.0.1:0 --local-addr=127.0.0.1 -m seq2seq train "$gru" \
        "output_dir=$runs/nccl" \
        "${args[@]}" "distributed.backend=$backend" > "$out/nccl.log" 2>&1 \
        || note "$backend run failed: see nccl.log"
    grep -h "process group" "$out/nccl.log" | tee -a "$summary" || note "no process group!"
    compare_curves "$runs/single/metrics.jsonl" "$runs/nccl/metrics.jsonl" \
        || note "no loss curves to compare"
fi

if wanted 4; then
    note "== 4. Multi30k GRU recipe with CUDA graphs"
    train_and_evaluate gru "$gru" train.cuda_graphs=true
fi
if wanted 5; then
    note "== 5. the parallel decoder: the GRU recipe without input feeding"
    train_and_evaluate gru-parallel "$gru" train.cuda_graphs=true model.input_feeding=false
fi
if wanted 6; then
    note "== 6. Multi30k LSTM recipe"
    train_and_evaluate lstm recipes/multi30k/en-de.lstm.yaml
fi
if wanted 7; then
    note "== 7. decoding speed of the trained GRU model (check 4), plain vs graphed search"
    [[ -f $runs/gru/best.pt ]] || note "no $runs/gru/best.pt: run check 4 in the same call"
    for graphs in false true; do
        [[ -f $runs/gru/best.pt ]] || break
        $py scripts/benchmark.py "$gru" "decode.cuda_graphs=$graphs" --device cuda --steps 0 \
            --work-dir "$runs/bench" --checkpoint "$runs/gru/best.pt" --repeat 10000 \
            --json "$out/decode-graphs-$graphs.json" > "$out/decode-graphs-$graphs.log" 2>&1 \
            || { note "decode benchmark graphs=$graphs failed: see decode-graphs-$graphs.log"
                 continue; }
        summarise_benchmark "$out/decode-graphs-$graphs.json" "trained gru, graphs=$graphs"
    done
fi
note "== done $(date -u +%FT%TZ)"
