"""Kill a CPU training run with SIGKILL again and again; resuming must end where an
uninterrupted run ends, bit for bit.

    python scripts/kill_resume.py [--kills 20] [--seed 0] [--workdir DIR]

The script trains the tiny generated-data recipe below once without interruption, then runs the
same command in a second directory and SIGKILLs it ``--kills`` times at random moments, re-running
the same command after each kill: random delays after the updates began, every 5th kill during
start-up (imports, data, resuming) instead, and every 3rd of the others on a checkpoint being
written (the script polls for the temporary file of an atomic write and kills as soon as a new one
appears). A last run finishes the job. The script prints the number of kills survived and, for
every tensor whose final weights differ from the uninterrupted run's, the maximum absolute
difference. Exit code 0 only if the weights are identical (and no temporary file is left).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

# Checkpoints every 5 updates (keep_last 2); one uninterrupted run takes about 30-60 s on 2 cores.
RECIPE = {
    "name": "kill-resume", "output_dir": "run", "seed": 7,
    "data": {"src_lang": "en", "trg_lang": "de", "num_proc": 1,
             "train": {"format": "generated", "split": "train", "size": 2000},
             "valid": {"format": "generated", "split": "valid", "size": 20},
             "test": {}},
    "tokenizer": {"vocab_size": 200},
    "model": {"emb_size": 32, "enc_hidden": 32, "enc_layers": 1, "dec_hidden": 64,
              "dec_layers": 1, "attention_size": 32, "dropout": 0.2},
    "train": {"batch_tokens": 600, "max_steps": 300, "max_epochs": 0, "valid_every": 5,
              "log_every": 5, "lr": 0.005, "keep_last": 2, "threads": 1,
              "early_stop_metric": "loss"},
    "decode": {"beam_size": 1, "alpha": 0.0, "max_len_ratio": 1.2, "max_len_add": 3},
}


def train_command(recipe: Path, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "seq2seq", "train", str(recipe), f"output_dir={output_dir}"]


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def training_started(log: Path) -> bool:
    """Whether the run logging to ``log`` has begun its updates (its progress bar is out)."""
    return b"\rtrain: " in log.read_bytes()  # not "reading train:" etc. of the data bars


def partial_writes(run: Path) -> set[str]:
    """Temporary files of atomic checkpoint writes in ``run`` right now."""
    try:
        return {e.name for e in os.scandir(run) if e.name.startswith(".")
                and e.name.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def run_to_the_end(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` to completion; return (its start-up time, its whole wall time)."""
    start = time.monotonic()
    log.write_bytes(b"")
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env=environment())
        startup = None
        while process.poll() is None:
            if startup is None and training_started(log):
                startup = time.monotonic() - start
            time.sleep(0.01)
    if process.returncode != 0:
        sys.exit(f"training failed with exit code {process.returncode}; see {log}")
    total = time.monotonic() - start
    return startup or total, total


def kill_once(command: list[str], run: Path, log: Path, kind: str, delay: float
              ) -> tuple[str, bool]:
    """Start ``command`` and SIGKILL it; returns (how it ended, killed mid-write).

    ``kind`` says when: "startup" kills ``delay`` seconds after the launch (imports, data
    loading, resuming); "training" kills ``delay`` seconds after the updates began; "write"
    waits as "training" does, then kills as soon as a checkpoint write is in progress.
    """
    log.write_bytes(b"")
    stale = partial_writes(run)  # left by the previous kill; the run deletes them on resume
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env=environment())
        launched = time.monotonic()
        began = launched if kind == "startup" else None
        mid_write = False
        while process.poll() is None:
            now = time.monotonic()
            if began is None and training_started(log):
                began = now
            if began is not None and now - began >= delay:
                if kind != "write":
                    break
                if partial_writes(run) - stale:
                    mid_write = True
                    break
            time.sleep(0.0002 if kind == "write" and began is not None else 0.005)
        if process.poll() is not None:
            return f"finished on its own (exit {process.returncode})", False
        mid_write = mid_write or bool(partial_writes(run) - stale)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return f"{kind} kill after {time.monotonic() - launched:.2f} s", mid_write


def compare(a: Path, b: Path) -> dict[str, float]:
    """Max absolute difference per tensor of two checkpoints' weights (identical: not listed)."""
    import torch

    from seq2seq.checkpoint import load_checkpoint

    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    if wa.keys() != wb.keys():
        return {"<different tensor names>": float("inf")}
    return {k: (wa[k].double() - wb[k].double()).abs().max().item()
            for k in wa if not torch.equal(wa[k], wb[k])}


def main() -> int:
    # The docstring's whole first sentence: its first line alone stops mid-sentence.
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the final run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE), encoding="utf-8")
    log = work / "train.log"  # the output of the latest run
    rng = random.Random(args.seed)

    reference, killed = work / "uninterrupted", work / "killed"
    for path in (reference, killed):
        shutil.rmtree(path, ignore_errors=True)
    startup, seconds = run_to_the_end(train_command(recipe, reference), log)
    print(f"uninterrupted run: {seconds:.1f} s ({startup:.1f} s of it before the first update)",
          flush=True)

    command = train_command(recipe, killed)
    # Kill delays inside training add up to about 80% of one run's training time, so the kills
    # spread over the whole run; every 5th kill lands in the start-up instead, every 3rd (of the
    # others) on a checkpoint being written.
    training = max(seconds - startup, 1.0)
    survived, mid_write, attempts = 0, 0, 0
    while survived < args.kills and attempts < 3 * args.kills:
        attempts += 1
        if survived % 5 == 4:
            kind, delay = "startup", rng.uniform(0.1, startup)
        else:
            kind = "write" if survived % 3 == 2 else "training"
            delay = rng.uniform(0.0, 1.6 * training / args.kills)
        outcome, during_write = kill_once(command, killed, log, kind, delay)
        if outcome.startswith("finished"):
            # The run got to the end before the kill: start over so every kill lands in a run.
            print(f"attempt {attempts}: {outcome}; restarting from scratch", flush=True)
            shutil.rmtree(killed)
            continue
        survived += 1
        mid_write += during_write
        note = " while a checkpoint was being written" if during_write else ""
        print(f"kill {survived:2d}: {outcome}{note}; newest complete checkpoint at step "
              f"{last_step(killed)}", flush=True)
    _, seconds = run_to_the_end(command, log)
    print(f"final resumed run: {seconds:.1f} s", flush=True)

    diffs = compare(reference / "last.pt", killed / "last.pt")
    print(f"kills survived: {survived} ({mid_write} while a checkpoint was being written)")
    leftovers = [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]
    if leftovers:
        print(f"temporary files left behind: {leftovers}")
    if diffs:
        print("weights differ from the uninterrupted run (max abs difference per tensor):")
        for name, diff in diffs.items():
            print(f"  {name}: {diff:.3e}")
    else:
        print("final weights identical to the uninterrupted run (every tensor bit for bit)")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not diffs and not leftovers and survived == args.kills else 1


def last_step(run: Path) -> str:
    """The step of the newest checkpoint that loads, or '-' (a quick look, for the log)."""
    import warnings

    from seq2seq.checkpoint import load_latest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = sorted(run.glob("step_*.pt"))[::-1] if run.is_dir() else []
        found = load_latest([run / "last.pt", *steps], lambda _: None) if run.is_dir() else None
    return str(found[1]["step"]) if found else "-"


if __name__ == "__main__":
    sys.exit(main())
