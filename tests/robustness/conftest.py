"""Shared pieces of the robustness matrix: the CLI as a subprocess, directory snapshots, and one
tiny trained checkpoint shared by every robustness module."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.conftest import tiny_tree as base_tree


def seq2seq(*args, cwd: Path, stdin: bytes | None = None, timeout: float = 300):
    """Run ``python -m seq2seq ARGS`` in ``cwd``; stdout and stderr are captured as bytes."""
    # One thread: the tiny models gain nothing from more, and tests run beside each other.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "seq2seq", *map(str, args)], input=stdin,
                          capture_output=True, cwd=cwd, timeout=timeout, env=env)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: equal snapshots = nothing written."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1,
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def error_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode("utf-8", "replace").splitlines()
            if line.startswith("error:")]


def tiny_tree(output_dir: str) -> dict:
    """A tiny recipe on the generated task: trains in a few seconds on one CPU core."""
    tree = base_tree(output_dir, seed=1, tokenizer={"vocab_size": 100},
                     model={"dropout": 0.1}, train={"max_steps": 4, "valid_every": 4},
                     decode={"max_len_ratio": 1.0, "max_len_add": 3},
                     eval={"bootstrap": 0, "attention_plots": 0})
    tree["data"]["valid"]["size"] = 12
    tree["data"]["test"]["t"]["size"] = 12
    return tree


def write_recipe(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """``best.pt`` of one tiny run, trained once for all robustness modules."""
    root = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(root / "tiny.yaml", tiny_tree(str(root / "run")))
    result = seq2seq("train", recipe, cwd=root)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return root / "run" / "best.pt"
