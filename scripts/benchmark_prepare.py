"""Benchmark ``prepare`` on 1,000,000 sentence pairs: wall time and peak memory against targets.

The corpus is Multi30k train (de-en) repeated to 1,000,000 pairs, written as plain text into a
temporary directory. ``prepare_data`` runs in a fresh Python process (tokenizer training
included, nothing cached), while this script samples the resident memory of that process and
all its children from /proc. It prints the figures against the targets (<= 90 s wall,
<= 2 GiB peak RSS) and writes them as JSON.

    python scripts/benchmark_prepare.py [--pairs 1000000] [--json benchmark_prepare.json]

The peak RSS judged is the sampled peak of the process tree: every 50 ms, the sum of the RSS
of the prepare process and all its children alive at that moment. It counts pages shared
between processes (forked workers, memory-mapped Arrow files) once per process, so it is an
upper bound of the memory really used. The ``getrusage`` figures (``ru_maxrss`` of the prepare
process and of its largest child) are reported too; their sum is a looser bound still, as it
adds peaks reached at different times (tokenizer training, then encoding in workers).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TARGET_WALL_S = 90.0
TARGET_RSS_GIB = 2.0
PAGE = os.sysconf("SC_PAGE_SIZE")

# Runs in the fresh process: prepare, then report its own and its children's ru_maxrss (KiB);
# a problem the user can fix (data too small for the vocabulary...) as {"error": one line}.
CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from seq2seq.config import RecipeError, load_recipe
from seq2seq.data.cache import prepare_data
from seq2seq.data.stats import format_stats
from seq2seq.errors import Seq2SeqError
try:
    prepared = prepare_data(load_recipe(sys.argv[1]), show_progress=False)
except (RecipeError, Seq2SeqError) as error:
    print(json.dumps({"error": "; ".join(str(error).splitlines())}))
    sys.exit(1)
seconds = time.perf_counter() - start
print(format_stats(prepared.stats), file=sys.stderr)
print(json.dumps({"inner_s": seconds, "kept": len(prepared.train),
                  "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write_corpus(root: Path, pairs: int, data_dir: Path) -> None:
    """Multi30k train (de-en) repeated until ``pairs`` pairs, as train.de / train.en."""
    for lang in ("de", "en"):
        with gzip.open(data_dir / f"multi30k/train.{lang}.gz", "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        name = f"train.{lang}"
        with open(root / name, "w", encoding="utf-8") as handle:
            handle.writelines(lines[i % len(lines)] + "\n" for i in range(pairs))


def recipe(root: Path, data_dir: Path, num_proc: int, sample: int) -> dict:
    m30k = data_dir / "multi30k"
    return {
        "name": "benchmark-prepare",
        "output_dir": str(root / "run"),
        "data": {
            "src_lang": "de", "trg_lang": "en", "num_proc": num_proc,
            "train": {"src": str(root / "train.de"), "trg": str(root / "train.en")},
            "valid": {"src": str(m30k / "val.de.gz"), "trg": str(m30k / "val.en.gz")},
            "test": {"flickr2016": {"src": str(m30k / "test_2016_flickr.de.gz"),
                                    "trg": str(m30k / "test_2016_flickr.en.gz")}},
        },
        "tokenizer": {"type": "unigram", "joint": True, "vocab_size": 8000,
                      "input_sentence_size": sample},
    }


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants right now."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text()
        except OSError:
            continue  # the process ended meanwhile
        # Fields after the ")" that closes the command name: state, ppid, ...
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm.split()[1]) * PAGE
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total


def run_prepare(recipe_path: Path) -> dict:
    """Run prepare in a fresh process; wall time, sampled peak RSS and its rusage report."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(recipe_path)],
                             stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out = child.stdout.read().strip().splitlines()
    if child.returncode != 0:
        error = json.loads(out[-1]).get("error") if out and out[-1].startswith("{") else None
        raise SystemExit(f"error: prepare: {error}" if error else
                         f"error: prepare failed with exit status {child.returncode}")
    report = json.loads(out[-1])
    report.update(wall_s=wall, sampled_peak_bytes=peak)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2, help="data.num_proc")
    parser.add_argument("--sample", type=int, default=500_000,
                        help="tokenizer.input_sentence_size (sentences SentencePiece trains on)")
    parser.add_argument("--json", default="benchmark_prepare.json", help="where to write results")
    parser.add_argument("--data", default=os.environ.get("SEQ2SEQ_DATA") or
                        str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
                        help="directory holding multi30k/ (default: $SEQ2SEQ_DATA)")
    args = parser.parse_args()
    if min(args.pairs, args.num_proc, args.sample) < 1:
        parser.error("--pairs, --num-proc and --sample must be at least 1")
    if not (Path(args.data) / "multi30k").is_dir():
        parser.error(f"--data {args.data}: holds no multi30k/ directory")
    from seq2seq.errors import Seq2SeqError
    from seq2seq.files import check_output

    try:
        check_output(args.json)
    except Seq2SeqError as error:
        parser.error(f"--json {error}")

    with tempfile.TemporaryDirectory(prefix="benchmark-prepare-") as tmp:
        root = Path(tmp)
        write_corpus(root, args.pairs, Path(args.data))
        recipe_path = root / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe(root, Path(args.data), args.num_proc,
                                                     args.sample)))
        report = run_prepare(recipe_path)

    peak_gib = report["sampled_peak_bytes"] / 2**30
    result = {
        "pairs": args.pairs, "kept": report["kept"], "num_proc": args.num_proc,
        "input_sentence_size": args.sample, "cpus": os.cpu_count(),
        "wall_s": round(report["wall_s"], 2), "prepare_s": round(report["inner_s"], 2),
        "peak_rss_gib": round(peak_gib, 3),
        "rusage_self_gib": round(report["self_kib"] / 2**20, 3),
        "rusage_largest_child_gib": round(report["children_kib"] / 2**20, 3),
        "target_wall_s": TARGET_WALL_S, "target_rss_gib": TARGET_RSS_GIB,
        "ok": report["wall_s"] <= TARGET_WALL_S and peak_gib <= TARGET_RSS_GIB,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"prepare of {args.pairs:,} pairs ({os.cpu_count()} CPUs, num_proc {args.num_proc})")
    print(f"  wall time  {result['wall_s']:7.1f} s    target <= {TARGET_WALL_S:.0f} s   "
          f"{'ok' if result['wall_s'] <= TARGET_WALL_S else 'MISSED'}")
    print(f"  peak RSS   {peak_gib:7.2f} GiB  target <= {TARGET_RSS_GIB:.0f} GiB "
          f"{'ok' if peak_gib <= TARGET_RSS_GIB else 'MISSED'}  (process tree, sampled; "
          f"ru_maxrss: self {result['rusage_self_gib']:.2f} GiB, largest child "
          f"{result['rusage_largest_child_gib']:.2f} GiB)")
    print(f"  written to {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
