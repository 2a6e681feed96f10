#!/usr/bin/env bash
# Full-size quality candidates trained side by side on one GPU (issue 18's "use it for the full
# runs"), each scored on val only:
#
#   SEQ2SEQ_DATA=/path/to/data bash scripts/gpu_sweep.sh OUT_DIR SECONDS [RECIPE]
#
# Every line of $CANDIDATES ("name override..."; default: the list below) trains RECIPE
# (default recipes/multi30k/de-en.best.yaml) with those overrides, all at once, one torch thread
# each, each stopped when SECONDS have passed. A run that finished is then scored on val with
# beam 5 and the recipe's alpha, in fp32, on averaged.pt; OUT_DIR/sweep.txt gets one line per
# run (updates done, val greedy BLEU at each validation, averaged.pt greedy and beam 5), written
# as the runs end, so a call cut short still returns what was measured. Runs go to
# $RUNS (default /tmp/seq2seq-sweep-runs). test_2016_flickr is never decoded here.
set -uo pipefail

out=${1:?usage: gpu_sweep.sh OUT_DIR SECONDS [RECIPE]}
deadline=$((SECONDS + ${2:?usage: gpu_sweep.sh OUT_DIR SECONDS [RECIPE]}))
recipe=${3:-recipes/multi30k/de-en.best.yaml}
runs=${RUNS:-/tmp/seq2seq-sweep-runs}
py=${PYTHON:-python3}
data=${SEQ2SEQ_DATA:-$PWD/../shared/data}
export SEQ2SEQ_DATA=$data PYTHONUNBUFFERED=1
candidates=${CANDIDATES:-"base-s1 seed=1
base-s2 seed=2
ls02-s1 seed=1 train.label_smoothing=0.2
ls02-s2 seed=2 train.label_smoothing=0.2
drop04-s1 seed=1 model.dropout=0.4 train.max_epochs=24
drop04-s2 seed=2 model.dropout=0.4 train.max_epochs=24
vocab5k-s1 seed=1 tokenizer.vocab_size=5000
vocab5k-s2 seed=2 tokenizer.vocab_size=5000"}
mkdir -p "$out" "$runs"

one() {  # name overrides...
    local name=$1 left
    shift
    left=$((deadline - SECONDS))
    timeout -k 10 "$((left > 5 ? left : 5))" $py -m seq2seq train "$recipe" \
        "output_dir=$runs/$name" train.threads=1 ${EXTRA:-} "$@" > "$out/$name-train.log" 2>&1
    local rc=$? beam=""
    if [[ $rc == 0 && -f $runs/$name/averaged.pt ]]; then
        left=$((deadline - SECONDS))
        timeout -k 10 "$((left > 5 ? left : 5))" $py -m seq2seq evaluate "$recipe" \
            "output_dir=$runs/$name" "$@" --checkpoint "$runs/$name/averaged.pt" \
            --src "$data/multi30k/val.de.gz" --ref "$data/multi30k/val.en.gz" --beam 5 \
            --precision fp32 --report-dir "$out/$name-val" > "$out/$name-val.log" 2>&1 \
            && beam=$($py -c 'import json, sys
print(json.load(open(sys.argv[1]))["test_sets"][0]["bleu"]["score"])' "$out/$name-val/report.json")
    fi
    $py - "$runs/$name/metrics.jsonl" "$name" "$rc" "$beam" "$*" <<'EOF' >> "$out/sweep.txt"
import json, sys
path, name, rc, beam, overrides = sys.argv[1:]
try:
    rows = [json.loads(line) for line in open(path)]
except OSError:
    rows = []
valid = [f"{r['step']}:{r['bleu']:.2f}" for r in rows if r["split"] == "valid"]
averaged = [f"{r['bleu']:.2f}" for r in rows if r["split"] == "averaged"]
print(f"{name} [{overrides}] exit {rc}; val greedy {' '.join(valid) or '-'}; "
      f"averaged.pt greedy {averaged[0] if averaged else '-'}, beam 5 {beam or '-'}")
EOF
}

while read -r name overrides; do
    [[ -n $name ]] || continue
    # shellcheck disable=SC2086  # the overrides are words
    one "$name" $overrides &
done <<< "$candidates"
wait
sort "$out/sweep.txt" -o "$out/sweep.txt"
cat "$out/sweep.txt"
