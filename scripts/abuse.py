"""Hostile invocations against a freshly trained quickstart run, as a careless user makes them.

    python scripts/abuse.py [--work DIR] [--max-steps N] [--only NAME ...]

Trains ``recipes/quickstart.yaml`` into ``DIR/run`` (``train.max_steps=N``: quality does not
matter here), then runs every case below as a subprocess. For each it checks

- the exit code (a refusal is 1 or 2, a case that should work is 0);
- that stderr holds no traceback, and a refusal says why in ``error:`` line(s);
- that no file changed except the case's expected outputs: the sha256 of every file under DIR
  (inputs, the run directory, checkpoints) is taken before and after.

It prints one line per case and the counts: tried, refused cleanly (or worked as expected),
failed. The exit code is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFUSED = (1, 2)
MARK = ".seq2seq-abuse"  # in a work directory this script made: a rerun may clear it


@dataclasses.dataclass
class Case:
    name: str
    argv: list[str]
    codes: tuple[int, ...] = REFUSED
    changes: tuple[str, ...] = ()  # paths (relative to the work dir) the case may write
    stdin: bytes = b""


def cases(run: str) -> list[Case]:
    ckpt = f"{run}/best.pt"
    t = ["translate", "--checkpoint", ckpt]
    return [
        Case("version", ["--version"], (0,)),
        Case("translate works", [*t, "--input", "in.txt", "--output", "out.txt"], (0,),
             ("out.txt",)),
        Case("translate output = input", [*t, "--input", "in.txt", "--output", "in.txt"]),
        Case("translate output = ./input", [*t, "--input", "in.txt", "--output", "./in.txt"]),
        Case("translate output = symlink to input",
             [*t, "--input", "in.txt", "--output", "link.txt"]),
        Case("translate output = hard link of input",
             [*t, "--input", "in.txt", "--output", "hard.txt"]),
        Case("translate output = checkpoint", [*t, "--input", "in.txt", "--output", ckpt]),
        Case("translate attention = input", [*t, "--input", "in.txt", "--attention", "in.txt"]),
        Case("translate output = attention",
             [*t, "--input", "in.txt", "--output", "o.txt", "--attention", "o.txt"]),
        Case("translate output is a directory", [*t, "--input", "in.txt", "--output", run]),
        Case("translate output in a missing directory",
             [*t, "--input", "in.txt", "--output", "nodir/out.txt"]),
        Case("translate output read-only", [*t, "--input", "in.txt", "--output", "ro.txt"]),
        Case("translate output is a socket", [*t, "--input", "in.txt", "--output", "sock"]),
        Case("translate output full device", [*t, "--input", "in.txt", "--output", "full"]),
        Case("translate output a character device (like /dev/null)",
             [*t, "--input", "in.txt", "--output", "null"], (0,)),
        Case("translate input missing", [*t, "--input", "missing.txt"]),
        Case("translate input is a directory", [*t, "--input", run]),
        Case("translate input is the checkpoint", [*t, "--input", ckpt]),
        Case("translate beam 0", [*t, "--beam", "0"], stdin=b"a dog\n"),
        Case("translate beam -3", [*t, "--beam", "-3"], stdin=b"a dog\n"),
        Case("translate beam 10**9", [*t, "--beam", "1000000000"], stdin=b"a dog\n"),
        Case("translate nbest above beam", [*t, "--beam", "2", "--nbest", "5"],
             stdin=b"a dog\n"),
        Case("translate alpha nan", [*t, "--alpha", "nan"], stdin=b"a dog\n"),
        Case("translate alpha inf", [*t, "--alpha", "inf"], stdin=b"a dog\n"),
        Case("translate alpha -1", [*t, "--alpha", "-1"], stdin=b"a dog\n"),
        Case("translate max-len-ratio 1e9", [*t, "--max-len-ratio", "1e9"], stdin=b"a dog\n"),
        Case("translate batch-tokens 0", [*t, "--batch-tokens", "0"], stdin=b"a dog\n"),
        Case("translate device cuda:7", [*t, "--device", "cuda:7"], stdin=b"a dog\n"),
        Case("translate device potato", [*t, "--device", "potato"], stdin=b"a dog\n"),
        Case("translate checkpoint missing", ["translate", "--checkpoint", "nope.pt"],
             stdin=b"a dog\n"),
        Case("translate checkpoint is a text file",
             ["translate", "--checkpoint", f"{run}/recipe.yaml"], stdin=b"a dog\n"),
        Case("translate checkpoint is a directory", ["translate", "--checkpoint", run],
             stdin=b"a dog\n"),
        Case("translate checkpoint truncated", ["translate", "--checkpoint", "truncated.pt"],
             stdin=b"a dog\n"),
        Case("translate checkpoint with a flipped bit, no side file",
             ["translate", "--checkpoint", "flipped.pt"], stdin=b"a dog\n"),
        Case("evaluate beam 0", ["evaluate", "--checkpoint", ckpt, "--src", "in.txt", "--ref",
                                 "in.txt", "--beam", "0", "--report-dir", "rep"]),
        Case("evaluate ref shorter than src", ["evaluate", "--checkpoint", ckpt, "--src",
                                               "in.txt", "--ref", "short.txt", "--report-dir",
                                               "rep"]),
        Case("evaluate report dir is a file", ["evaluate", "--checkpoint", ckpt, "--src",
                                               "in.txt", "--ref", "in.txt", "--report-dir",
                                               "in.txt"]),
        Case("evaluate report onto its ref", ["evaluate", "--checkpoint", ckpt, "--src",
                                              "in.txt", "--ref", "rep2/in.txt.hyp.txt",
                                              "--report-dir", "rep2"]),
        Case("average onto an input", ["average", ckpt, f"{run}/last.pt", "--output", ckpt]),
        Case("average into a directory", ["average", ckpt, "--output", run]),
        Case("average of a missing checkpoint", ["average", "nope.pt", "--output", "avg.pt"]),
        Case("train while another holds the run", ["train", "recipe.yaml",
                                                   "train.max_steps=100000"]),
        Case("train resume with another model", ["train", "recipe.yaml",
                                                 "model.dec_hidden=64", "train.max_steps=9999"]),
        Case("train seed -1", ["train", "recipe.yaml", "seed=-1"]),
        Case("train seed 2**40", ["train", "recipe.yaml", "seed=1099511627776"]),
        Case("train empty output_dir", ["train", "recipe.yaml", "output_dir="]),
        Case("train misspelt key", ["train", "recipe.yaml", "train.lrr=0.1"]),
        Case("check huge model", ["check", "recipe.yaml", "model.dec_hidden=200000"]),
        Case("train nan lr", ["train", "recipe.yaml", "train.lr=nan"]),
        Case("check duplicate keys", ["check", "dup.yaml"]),
        Case("check recursive alias", ["check", "alias.yaml"]),
        Case("check binary recipe", ["check", f"{run}/best.pt"]),
        Case("check recipe is a directory", ["check", run]),
        Case("check empty validation set", ["check", "emptyvalid.yaml"]),
        Case("generate-data into a file", ["generate-data", "in.txt"]),
        Case("generate-data negative size", ["generate-data", "gen", "--train", "-5"]),
        Case("prepare missing corpus", ["prepare", "missingcorpus.yaml"]),
    ]


def prepare_inputs(work: Path, run: Path) -> list[str]:
    """The files the cases read; returns notes on cases this machine cannot set up."""
    notes = []
    (work / "in.txt").write_bytes(b"the dog sees the cat\n\na man reads\n")
    (work / "short.txt").write_bytes(b"one line\n")
    (work / "link.txt").symlink_to(work / "in.txt")
    os.link(work / "in.txt", work / "hard.txt")
    (work / "o.txt").write_bytes(b"old\n")
    (work / "ro.txt").write_bytes(b"read-only\n")
    (work / "ro.txt").chmod(0o444)
    (work / "rep2").mkdir()
    (work / "rep2" / "in.txt.hyp.txt").write_bytes(b"a\n\nb\n")
    data = (run / "best.pt").read_bytes()
    (work / "truncated.pt").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x10
    (work / "flipped.pt").write_bytes(bytes(flipped))
    recipe = (REPO / "recipes" / "quickstart.yaml").read_text()
    (work / "dup.yaml").write_text(recipe + "seed: 7\n")
    (work / "alias.yaml").write_text("a: &x [*x]\n")
    (work / "emptyvalid.yaml").write_text(recipe.replace("size: 500}", "size: 0}", 1))
    (work / "missingcorpus.yaml").write_text(
        "output_dir: mc\ndata:\n  train: {format: text, src: no.en, trg: no.de}\n"
        "  valid: {format: text, src: no.en, trg: no.de}\n")
    try:
        os.mknod(work / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        os.mknod(work / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        notes.append("mknod not permitted: the device cases write regular files instead")
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(work / "sock"))
    return notes


def clear(work: Path) -> None:
    """Remove everything an earlier run left in ``work`` (read-only files, device nodes and
    sockets included)."""
    for path in work.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def digests(root: Path) -> dict[str, str]:
    """sha256 (or the kind, for special files) of everything under ``root``."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            found[name] = "link:" + os.readlink(path)
        elif stat.S_ISREG(mode):
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif not stat.S_ISDIR(mode):
            found[name] = f"special:{stat.S_IFMT(mode):o}"
    return found


def run_case(case: Case, work: Path, env: dict) -> str | None:
    """Run one case; returns what went wrong, or None."""
    before = digests(work)
    try:
        result = subprocess.run([sys.executable, "-m", "seq2seq", *case.argv], cwd=work,
                                env=env, input=case.stdin, capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "timed out after 600 s"
    err = result.stderr.decode("utf-8", "replace")
    problems = []
    if result.returncode not in case.codes:
        problems.append(f"exit {result.returncode}, expected {case.codes}")
    if "Traceback" in err:
        problems.append("traceback: " + err.strip().splitlines()[-1])
    if case.codes == REFUSED and not any(line.startswith("error:") for line in err.splitlines()):
        problems.append("no error line")
    after = digests(work)
    changed = sorted(name for name in set(before) | set(after)
                     if before.get(name) != after.get(name)
                     and not any(name == c or name.startswith(c.rstrip("/") + "/")
                                 for c in case.changes))
    if changed:
        problems.append("changed: " + ", ".join(changed[:5]))
    return "; ".join(problems) or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="work directory (default: a new temp dir)")
    parser.add_argument("--max-steps", type=int, default=60, help="training updates")
    parser.add_argument("--only", nargs="*", help="run only the cases with these names")
    args = parser.parse_args()
    if args.max_steps < 1:
        parser.error(f"--max-steps: must be at least 1, got {args.max_steps}")
    names = {case.name for case in cases("run")}
    unknown = sorted(set(args.only or []) - names)
    if unknown:  # else nothing runs, and "failed 0" reads as a pass
        parser.error(f"--only: no case named {unknown[0]!r}; the cases are: "
                     + "; ".join(sorted(names)))
    # absolute: the commands run in it, from where the case needs
    work = (args.work or Path(tempfile.mkdtemp(prefix="seq2seq-abuse-"))).absolute()
    if work.exists() and not work.is_dir():
        parser.error(f"--work {work}: exists and is not a directory")
    if work.is_dir() and any(work.iterdir()):
        if not (work / MARK).is_file():
            parser.error(f"--work {work}: not empty, and not a work directory of an earlier "
                         "abuse.py run; name a new or empty one")
        clear(work)  # an earlier run's: its inputs, run and outputs are made afresh
    work.mkdir(parents=True, exist_ok=True)
    (work / MARK).write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    recipe = work / "recipe.yaml"
    shutil.copy(REPO / "recipes" / "quickstart.yaml", recipe)
    run = work / "run"
    trained = subprocess.run([sys.executable, "-m", "seq2seq", "train", str(recipe),
                              f"output_dir={run}", f"train.max_steps={args.max_steps}",
                              f"train.valid_every={args.max_steps}"],
                             cwd=work, env=env, capture_output=True)
    if trained.returncode != 0:
        print(trained.stderr.decode()[-3000:], file=sys.stderr)
        return 1
    recipe.write_text(recipe.read_text().replace("output_dir: runs/quickstart",
                                                 f"output_dir: {run}"))
    notes = prepare_inputs(work, run)
    # One case needs the run held by another process, as a training run would hold it.
    holder = open(run / ".lock", "a")  # noqa: SIM115 (held until the end)
    fcntl.flock(holder, fcntl.LOCK_EX)
    failed = 0
    selected = [c for c in cases("run") if not args.only or c.name in args.only]
    for case in selected:
        if case.name == "train resume with another model":
            fcntl.flock(holder, fcntl.LOCK_UN)  # this one must reach the resume check
        problem = run_case(case, work, env)
        if case.name == "train resume with another model":
            fcntl.flock(holder, fcntl.LOCK_EX)
        failed += problem is not None
        print(f"{'FAIL' if problem else 'ok  '} {case.name}" + (f": {problem}" if problem else ""),
              flush=True)
    for note in notes:
        print(f"note: {note}")
    print(f"tried {len(selected)}, as expected {len(selected) - failed}, failed {failed} "
          f"(work dir {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
