"""seq2seq beside Joey NMT 2.3.0 and OpenNMT-py 3.5.1, measured in one run on this machine.

    python scripts/compare_peers.py [--len 24] [--warmup 20] [--steps 20] [--peer-steps 60]
        [--rounds 1] [--json out.json]

Runs, one after the other on the same machine, so that every figure of the table comes from
the same hardware under comparable load (the load average is recorded beside each):

1. our ``scripts/benchmark.py recipes/multi30k/de-en.gru.yaml`` in fp32 (its products by
   oneDNN or BLAS, as ``SEQ2SEQ_FP32_GEMM=auto`` picks: :mod:`seq2seq.models.gemm`): training target
   tokens/s (``--warmup W --steps N``; W = 20 by default, the peers' own untimed first
   steps, since a fresh process builds oneDNN kernels for new shapes at first), then beam-5
   decoding at batch 100 of test_2016_flickr
   at a fixed output length (``decode.min_len=LEN decode.max_len_ratio=1e-9
   decode.max_len_add=LEN``: min = max = LEN tokens, so an untrained model costs what a
   trained one does), with fp32, int8 (``--quantize``) and bf16 (``--bf16``) weights;
2. where the CPU computes bf16 natively (amx_bf16 or avx512_bf16), the same training in bf16
   (``train.precision=bf16``); where ``auto`` picked oneDNN for fp32, the fp32 training again
   with ``SEQ2SEQ_FP32_GEMM=blas`` (what a CPU whose fp32 products stay with BLAS runs);
3. the peers' kit, ``../shared/peers/bench.sh`` (``$PEERS_BENCH``), which installs both peers
   in their own venv (never project dependencies) and prints one JSON line: their training
   target tokens/s (steps after the first 20 of ``--peer-steps``) and their beam-5 batch-100
   decoding of test_2016_flickr at the same fixed length.

With ``--rounds N`` it measures all of that N times, our parts first in odd rounds and the
peers' kit first in even ones. A machine whose speed drifts (a shared virtual one can change
by a third within minutes) then moves both sides of a round alike: each ratio is taken within
its round, and the table gives the median of the N ratios with their range, and each figure's
median with its N values. One round is a single pass, as before.

It prints the CPU model and its bf16 flags, then a table of figures and ratios, then one
line with the speed of a large matrix product in fp32 (ours, and BLAS's) and in bf16, and
bf16's gain over our fp32 in products, training and decoding: on a CPU whose bf16 units
multiply twice as fast as its fp32 ones (AVX512-BF16 without AMX), no step gains much more
than twice. A failed part is an error (one line naming its log): nothing is filled in from
elsewhere.

What a CPU without AVX-512 (and so without native bf16) runs can be measured on one that has
it, for both sides alike, since the peers' kit inherits the environment:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` holds
torch's kernels, oneDNN and MKL at AVX2; ``auto`` then trains in fp32 with BLAS's products,
and bf16 is left out (:func:`seq2seq.precision.held_below_avx512`). Decoding also runs numpy's
tanh (:func:`seq2seq.models.cells.tanh`), so numpy must be held too:
``NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"`` (numpy 2.4's names; numpy 1.x:
``"AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL"``). The script refuses to
run with torch held and numpy not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from seq2seq.arguments import at_least  # noqa: E402
from seq2seq.precision import (  # noqa: E402
    CPU_BF16_FLAGS,
    cpu_flags,
    cpu_native_bf16,
    held_below_avx512,
)

RECIPE = "recipes/multi30k/de-en.gru.yaml"
PRODUCT_SIZE = 2048
PEERS_BENCH = Path(os.environ.get("PEERS_BENCH", REPO.parent / "shared" / "peers" / "bench.sh"))
PEER_UNTIMED = 20  # the peers' kit times the training steps after these
PEER_FIGURES = ("train_target_tokens_per_s", "beam5_batch100_sent_per_s")  # per peer
MAX_LEN = 1000  # the most decode.min_len and decode.max_len_add take


def output_length(text: str) -> int:
    """``--len``: a whole number of tokens, 1 to MAX_LEN."""
    value = at_least(1)(text)
    if value > MAX_LEN:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LEN}, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=RECIPE, help="our recipe (the peers' kit builds "
                        "the de-en.gru model: another recipe is not like for like)")
    parser.add_argument("--repeat", type=at_least(1), default=1000,
                        help="sentences we decode (test_2016_flickr has 1,000)")
    parser.add_argument("--len", type=output_length, default=24,
                        help="fixed output length in tokens")
    parser.add_argument("--warmup", type=at_least(0), default=20,
                        help="our untimed first training steps (the peers': 20)")
    parser.add_argument("--steps", type=at_least(1), default=20,
                        help="our timed training steps")
    parser.add_argument("--peer-steps", type=at_least(PEER_UNTIMED + 10), default=60,
                        help="peers' training steps (timed: those after the 20th, whose "
                        "speed the peers log every 10)")
    parser.add_argument("--threads", type=at_least(1), default=2,
                        help="CPU threads for all three")
    parser.add_argument("--work-dir", help="logs and JSON of each part (default: a temp dir); "
                        "our benchmark's tokenizer and cache go to its bench/ folder")
    parser.add_argument("--shortlist", type=at_least(0), default=0, metavar="N",
                        help="also time our beam search with decode.shortlist=N")
    parser.add_argument("--rounds", type=int, default=1, help="measure both sides this many "
                        "times, alternating which goes first; each ratio is then the median "
                        "of the rounds' own ratios, with their range")
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: {args.rounds}: at least 1")
    # The parts run in the repository: paths the user gave are from where they run this.
    if args.recipe != RECIPE:
        args.recipe = os.path.abspath(args.recipe)
    for name in ("work_dir", "json"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.work_dir and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        parser.error(f"--work-dir {args.work_dir}: exists and is not a directory")
    from seq2seq.errors import Seq2SeqError
    from seq2seq.files import check_output

    try:
        if args.json is not None:
            check_output(args.json)
    except Seq2SeqError as error:
        parser.error(f"--json {error}")
    return args


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def run_part(name: str, cmd: list[str], work: Path, env: dict[str, str] | None = None) -> str:
    """Run one part, its output to ``work/name.log``; its stdout. Raises SystemExit on failure."""
    log = work / f"{name}.log"
    print(f"{name}: {' '.join(cmd)} (log {log})", file=sys.stderr)
    with open(log, "w", encoding="utf-8") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                              env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {name} failed (exit {done.returncode}); see {log}")
    return done.stdout


def ours(args: argparse.Namespace, work: Path, precision: str, decode: bool,
         gemm: str | None = None, bf16: bool = False) -> dict[str, Any]:
    """scripts/benchmark.py on the de-en.gru recipe in ``precision`` (``gemm``: fp32 products
    by this SEQ2SEQ_FP32_GEMM instead of the default; ``bf16``: decode with bf16 weights too,
    where the CPU computes bf16 natively); its JSON result."""
    name = f"seq2seq-{precision}" + (f"-{gemm}" if gemm else "")
    out = work / f"{name}.json"
    cmd = [sys.executable, "scripts/benchmark.py", args.recipe, f"train.precision={precision}",
           f"decode.min_len={args.len}", "decode.max_len_ratio=1e-9",
           f"decode.max_len_add={args.len}", "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads),
           "--work-dir", str(args.bench), "--json", str(out)]
    if decode:
        cmd += ["--beams", "5", "--repeat", str(args.repeat), "--decode-batch", "100",
                "--quantize", "--shortlist", str(args.shortlist)] + (["--bf16"] if bf16 else [])
    else:
        cmd.append("--no-decode")
    run_part(name, cmd, work, env={"SEQ2SEQ_FP32_GEMM": gemm} if gemm else None)
    return json.loads(out.read_text(encoding="utf-8"))


def peers(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The peers' kit: its one JSON line, plus the load average around it."""
    before = load_average()
    stdout = run_part("peers", ["bash", str(PEERS_BENCH)], work, env={
        "STEPS": str(args.peer_steps), "LEN": str(args.len), "THREADS": str(args.threads)})
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    log = work / "peers.log"
    if not lines:
        raise SystemExit(f"error: {PEERS_BENCH} printed no JSON line; see {log}")
    try:
        found = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {PEERS_BENCH} printed a line that is not JSON ({error}); "
                         f"see {log}") from None
    missing = [f"{peer}.{key}" for peer in ("onmt", "joey") for key in PEER_FIGURES
               if not isinstance(found, dict) or not isinstance(found.get(peer), dict)
               or key not in found[peer]]
    if missing:
        raise SystemExit(f"error: {PEERS_BENCH} printed JSON without {', '.join(missing)}; "
                         f"see {log}")
    return {**found, "load_average": [before, load_average()]}


def check_peers_kit() -> str | None:
    """What is wrong with the peers' kit, in one line (None: nothing), checked before our parts
    run for minutes. It runs as ``bash KIT``: it must be a readable file, not executable."""
    if not PEERS_BENCH.is_file():
        problem = "is not a file" if PEERS_BENCH.exists() else "no such file"
    elif not os.access(PEERS_BENCH, os.R_OK):
        problem = "not readable"
    else:
        return None
    return f"PEERS_BENCH {PEERS_BENCH}: {problem} (the peers' kit, bench.sh)"


def product_rates(threads: int, size: int = 2048, repeats: int = 3,
                  bf16: bool = True) -> dict[str, float | None]:
    """GFLOP/s of one product of two ``size`` x ``size`` matrices on ``threads`` threads: fp32
    as our fp32 runs it (:func:`seq2seq.models.gemm.product`: oneDNN or BLAS), fp32 by torch's
    BLAS, and bf16 (None unless ``bf16``). A whole step in bf16 can gain over fp32 about what
    its products gain."""
    import time

    import torch

    from seq2seq.models.gemm import product

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a16, b16 = a.bfloat16(), b.bfloat16()
    runs = {"fp32": lambda: product(a, b.t()), "fp32_blas": lambda: a @ b}
    if bf16:
        runs["bf16"] = lambda: a16 @ b16
    rates: dict[str, float | None] = {"bf16": None}
    for name, run in runs.items():
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        rates[name] = round(2 * size**3 * repeats / (time.perf_counter() - start) / 1e9, 1)
    return rates


def own_ratios(result: dict[str, Any]) -> str:
    """One line: bf16 against our own fp32, in products, training and decoding (each the
    median of the rounds' ratios)."""
    rates, rounds = result["products"], [r["seq2seq"] for r in result["rounds"]]
    parts = [f"products bf16 / fp32 {ratio(rates['bf16'], rates['fp32'])}"]
    if "bf16" in rounds[0]:
        parts.append("training " + spread(
            [ours["bf16"]["train"]["target_tokens_per_s"] for ours in rounds],
            [ours["fp32"]["train"]["target_tokens_per_s"] for ours in rounds]))
    decode = [{row["weights"]: row["sentences_per_s"] for row in ours["fp32"].get("decode", [])
               if not row.get("shortlist")} for ours in rounds]
    if "bf16" in decode[0] and "fp32" in decode[0]:
        parts.append("beam 5 with bf16 weights " + spread([d["bf16"] for d in decode],
                                                           [d["fp32"] for d in decode]))
    threads, backend = result["threads"], rounds[0]["fp32"]["fp32_products"].split()[0]
    return (f"Products of two {PRODUCT_SIZE} x {PRODUCT_SIZE} matrices, {threads} "
            f"thread{'s' if threads != 1 else ''}: fp32 {rates['fp32']:,.1f} GFLOP/s "
            f"(by {backend}), fp32 by BLAS {rates['fp32_blas']:,.1f}, bf16 "
            f"{format(rates['bf16'], ',.1f') if rates['bf16'] else 'not run (no native bf16)'}. "
            f"bf16 against our fp32: {', '.join(parts)}.")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def figures(result: dict[str, Any], length: int) -> list[tuple[str, float, Any, Any, Any]]:
    """``(figure, seq2seq, OpenNMT-py, Joey NMT, seq2seq's load average)`` for one round
    (decoding at the fixed output ``length``)."""
    onmt, joey = result["peers"]["onmt"], result["peers"]["joey"]
    train_key, decode_key = PEER_FIGURES
    rows = []
    for precision, run in result["seq2seq"].items():
        train = run["train"]
        rows.append((f"training, target tokens/s (seq2seq {precision})",
                     train["target_tokens_per_s"], onmt[train_key], joey[train_key],
                     train["load_average"]))
    for row in result["seq2seq"]["fp32"].get("decode", []):
        listed = (", shortlist {}+{}".format(*row["shortlist"]) if row.get("shortlist")
                  else "")
        rows.append((f"beam 5, batch 100, {length} tokens, sentences/s (seq2seq "
                     f"{row['weights']} weights{listed})", row["sentences_per_s"], onmt[decode_key],
                     joey[decode_key], row["load_average"]))
    return rows


def spread(ours: list[float], theirs: list[Any]) -> str:
    """The median of the rounds' ratios ``ours / theirs``, with their range when there are
    several; n/a where a round lacks a figure."""
    if not all(ours) or not all(theirs):
        return "n/a"
    ratios = [a / b for a, b in zip(ours, theirs)]
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def cell(values: list[Any]) -> str:
    """A figure: its value, or its rounds' median and the values themselves."""
    if not all(values):
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:,}" if isinstance(values[0], int) else f"{values[0]:,.1f}"
    return f"{statistics.median(values):,.1f} ({', '.join(f'{v:,.0f}' for v in values)})"


def table(rounds: list[dict[str, Any]], length: int) -> list[str]:
    """Markdown rows: one per figure, seq2seq beside each peer, with ratios (of the same
    round: medians and ranges over several)."""
    per_round = [figures(result, length) for result in rounds]
    lines = ["| figure | seq2seq | OpenNMT-py 3.5.1 | Joey NMT 2.3.0 | seq2seq / OpenNMT-py | "
             "seq2seq / Joey NMT | load avg (seq2seq) |", "|---|---|---|---|---|---|---|"]
    for i, (what, *_) in enumerate(per_round[0]):
        mine, onmt, joey, load = ([rows[i][k] for rows in per_round] for k in (1, 2, 3, 4))
        lines.append(f"| {what} | {cell(mine)} | {cell(onmt)} | {cell(joey)} | "
                     f"{spread(mine, onmt)} | {spread(mine, joey)} | "
                     f"{load[0] if len(load) == 1 else ', '.join(map(str, load))} |")
    return lines


def measure_round(args: argparse.Namespace, work: Path, native: str | None,
                  peers_first: bool) -> dict[str, Any]:
    """One round: our parts (fp32 with decoding, bf16 training where the CPU computes it
    natively, fp32 training by BLAS where ``auto`` picked oneDNN) and the peers' kit."""
    result: dict[str, Any] = {}
    if peers_first:
        result["peers"] = peers(args, work)
    result["seq2seq"] = {"fp32": ours(args, work, "fp32", decode=True, bf16=bool(native))}
    if native:
        result["seq2seq"]["bf16"] = ours(args, work, "bf16", decode=False)
    if result["seq2seq"]["fp32"]["fp32_products"].startswith("onednn"):
        # the fp32 training of a CPU whose products stay with BLAS (AVX2 only, or Intel's)
        result["seq2seq"]["fp32, BLAS products"] = ours(args, work, "fp32", decode=False,
                                                          gemm="blas")
    if not peers_first:
        result["peers"] = peers(args, work)
    return result


def numpy_avx512() -> bool:
    """Whether numpy dispatches to AVX-512 kernels in this process (``NPY_DISABLE_CPU_FEATURES``
    can turn them off at its start)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return bool(features.get("X86_V4", features.get("AVX512_SKX", False)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if problem := check_peers_kit():
        print(f"error: {problem}", file=sys.stderr)
        return 2
    held = held_below_avx512()
    if held and numpy_avx512():
        sys.exit(f"error: torch's kernels are held at {held} but numpy's are not (our decoding "
                 'runs numpy\'s tanh): set NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL '
                 'AVX512_SPR" as well')
    os.environ.setdefault("SEQ2SEQ_DATA", str(REPO.parent / "shared" / "data"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="seq2seq-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    args.bench = work / "bench"  # our benchmark's tokenizer and data cache, for every round
    native = cpu_native_bf16()
    flags = sorted(set(CPU_BF16_FLAGS + ("amx_tile",)) & cpu_flags())
    from scripts.benchmark import cpu_model

    result: dict[str, Any] = {"cpu": cpu_model(), "bf16_flags": flags, "native_bf16": native,
                              "threads": args.threads, "fixed_output_length": args.len,
                              "rounds": []}
    for number in range(args.rounds):
        part_work = work if args.rounds == 1 else work / f"round-{number + 1}"
        part_work.mkdir(parents=True, exist_ok=True)
        # every other round the peers go first, so that a drift of the machine's speed
        # during the run does not favour one side
        result["rounds"].append(measure_round(args, part_work, native, number % 2 == 1))
    result["products"] = product_rates(args.threads, PRODUCT_SIZE, bf16=bool(native))
    loads = "; ".join(str(r["peers"]["load_average"]) for r in result["rounds"])
    print(f"CPU: {result['cpu']}; bf16 flags: {', '.join(flags) or 'none'} "
          f"(native bf16: {native or 'no'}); {args.threads} threads for each toolkit; "
          f"peers' load average {loads}" + (f"; {args.rounds} rounds, the peers first in "
                                            "every other" if args.rounds > 1 else ""))
    print("\n".join(table(result["rounds"], args.len)))
    print(own_ratios(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
