"""What ``prepare`` checks before it writes anything, as one function that ``check`` calls too.

:func:`input_problems` finds every problem with the directories and corpora a recipe names:
an ``output_dir`` or ``data.cache_dir`` that a file stands in the way of, a BLEU tokenizer
sacreBLEU cannot run (``eval.tokenize``), a corpus file that is missing or unreadable, a
corpus without a sentence pair with text on both sides (an empty validation set would give a
run that scores BLEU 0, an empty test set nothing to score), test set names that would share a
report file. It reads nothing it does not have to (the first
useful pair of each corpus) and writes nothing. ``prepare`` raises the first problem; ``check``
prints all.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from pathlib import Path

from seq2seq.config import Corpus, DataConfig, Recipe
from seq2seq.data.corpus import (
    DataError,
    check_corpus,
    corpus_files,
    read_pairs,
    resolve_path,
)
from seq2seq.errors import warn
from seq2seq.paths import same_file
from seq2seq.scoring import EvaluationError, check_bleu_tokenizer
from seq2seq.tokenizer import INFO_FILE, JOINT_MODEL, SRC_MODEL, TRG_MODEL

MAX_GENERATED_EVAL = 100_000
# What a run writes in <output_dir>/tokenizer and in a training cache: nothing else is replaced.
TOKENIZER_FILES = {JOINT_MODEL, SRC_MODEL, TRG_MODEL, INFO_FILE}
CACHE_FILES = {"stats.json", "train"}


def input_problems(recipe: Recipe, read_eval_sets: bool = False, say: bool = True
                   ) -> list[str]:
    """Every problem ``prepare`` would meet with the recipe's directories and corpora.

    Args:
        recipe: the whole recipe (``output_dir`` and ``data`` are read).
        read_eval_sets: read the validation and test sets to their end, as ``prepare`` does
            right after this check (a misaligned or badly encoded line anywhere is reported).
        say: warn about what is likely a mistake but may be meant (a corpus whose source and
            target are one file: the model learns to copy).

    Returns:
        One line per problem, each starting with the recipe key it is about.
    """
    data = recipe.data
    problems = []
    out_dir = Path(recipe.output_dir)
    # The directories prepare makes (a file or a link to nothing where one goes failed it after
    # the tokenizer's training); a current tokenizer's is only read, so need not be writable.
    directories = [("output_dir", out_dir, True), ("output_dir", out_dir / "tokenizer", False),
                   ("data.cache_dir" if data.cache_dir else "output_dir",
                    cache_root(data, out_dir), True),
                   ("eval.report_dir" if recipe.eval.report_dir else "output_dir",
                    Path(recipe.eval.report_dir or out_dir / "eval"), True)]
    seen = set()
    for key, path, written in directories:
        problem = directory_problem(path, written)
        if problem and problem not in seen:  # (a file for output_dir is in the way of all)
            seen.add(problem)
            problems.append(f"{key} {path}: {problem}")
    problems += _test_name_problems(list(data.test))
    try:  # validation scores BLEU too: a missing extra must not cost the first updates
        check_bleu_tokenizer(recipe.eval.tokenize, data.trg_lang)
    except EvaluationError as error:
        problems.append(str(error))
    # (key, corpus, read to its end, must hold a pair): no set may be empty (a test set with
    # nothing to score would fail evaluate after the other sets were decoded).
    corpora = [("data.train", data.train, False, True),
               ("data.valid", data.valid, read_eval_sets, True)]
    corpora += [(f"data.test.{name}", corpus, read_eval_sets, True)
                for name, corpus in data.test.items()]
    read: list[Path] = []  # the corpus files
    for where, corpus, read_all, needs_text in corpora:
        # One drawn sentence in 40 is a validation one (one in 40 a test one): ten million of
        # them took hours to draw. (Here, not in the schema: a checkpoint's recipe may hold more.)
        if (corpus.format == "generated" and corpus.split != "train"
                and corpus.size > MAX_GENERATED_EVAL):
            problems.append(f"{where}.size: at most {MAX_GENERATED_EVAL:,} pairs of a generated "
                            f"{corpus.split} split, got {corpus.size:,}")
            continue
        try:
            paths = corpus_files(corpus, data)
            read += paths
            if say and corpus.format == "text" and len(paths) == 2 and same_file(*paths):
                warn(f"{where}: src and trg are one file ({paths[0]}): the model learns to "
                     "copy its input")
            for path in paths:
                if written_by_the_run(path, out_dir):
                    raise DataError(f"{path}: a file the run writes in its output_dir "
                                    f"{out_dir}; keep corpora outside it, or use another "
                                    "output_dir")
            check_corpus(corpus, data)
            if needs_text or read_all:
                _check_some_text(corpus, data, read_all, needs_text)
        except DataError as error:
            problems.append(f"{where}: {error}")
    tokenizer_dir = out_dir / "tokenizer"  # (a corpus in it is refused above, by its key)
    foreign = [name for name in _foreign_entries(tokenizer_dir, TOKENIZER_FILES)
               if not any(same_file(tokenizer_dir / name, path) for path in read)]
    if foreign:
        problems.append(f"output_dir {out_dir}: {tokenizer_dir} holds what seq2seq does not "
                        f"write there ({', '.join(foreign[:3])}); a new tokenizer replaces "
                        "that directory: move them, or use another output_dir")
    return problems


def _test_name_problems(names: list[str]) -> list[str]:
    """Test set names whose report files would be one file (``a/b`` and ``a_b``)."""
    from seq2seq.report import file_stem

    first: dict[str, str] = {}
    problems = []
    for name in names:
        stem = file_stem(name)
        if stem in first:
            problems.append(f"data.test: the names {first[stem]!r} and {name!r} would share "
                            f"the report file {stem}.hyp.txt; rename one")
        first.setdefault(stem, name)
    return problems


# What a run writes at the top of its output_dir (training/run_dir.py, tokenizer.py,
# data/cache.py, evaluate.py): a corpus there would be appended to or replaced.
RUN_DIRECTORIES = ("tokenizer", "cache", "tensorboard", "sampled")
RUN_FILES = ("recipe.yaml", "metrics.jsonl", ".lock")


def written_by_the_run(path: Path, out_dir: Path) -> bool:
    """Whether ``path`` is (or is inside) something a run writes in ``out_dir``."""
    try:
        parts = path.resolve().relative_to(out_dir.resolve()).parts
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False
    if not parts:
        return False
    top = parts[0]
    if len(parts) > 1:
        return top in RUN_DIRECTORIES or top == "eval" or top.startswith("eval-")
    return is_run_file(top) or top.endswith(".tmp")


def is_run_file(name: str) -> bool:
    """Whether a run writes files of this name in its output_dir (checkpoints among them)."""
    return name in RUN_FILES or name.endswith((".pt", ".pt.sha256"))


def cache_root(data: DataConfig, out_dir: Path) -> Path:
    """Where the training caches live: ``data.cache_dir``, else ``<output_dir>/cache``."""
    if data.cache_dir:
        return Path(os.path.expandvars(os.path.expanduser(data.cache_dir)))
    return out_dir / "cache"


def directory_problem(path: Path, written: bool = True) -> str | None:
    """Why ``path`` cannot be used or created as a directory (a file on its way), if it can't;
    with ``written=False`` an existing directory that is only read passes unwritable."""
    for ancestor in [path, *path.parents]:
        if ancestor.is_symlink() and not ancestor.exists():
            try:
                os.stat(ancestor)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    return f"{ancestor} is a symbolic link in a loop ({os.readlink(ancestor)})"
            return f"{ancestor} is a symbolic link to nothing ({os.readlink(ancestor)})"
        if ancestor.exists():
            if not ancestor.is_dir():
                return f"{ancestor} exists and is not a directory"
            if written or ancestor != path:
                if not os.access(ancestor, os.W_OK | os.X_OK):
                    return f"{ancestor} is not writable"  # what prepare would then fail on
                if _refuses_new_entries(ancestor):
                    return (f"{ancestor} is on a kernel filesystem (like /proc or /sys) where "
                            "no directory can be made")
            return None
    return None


def _refuses_new_entries(directory: Path) -> bool:
    """Whether ``directory`` is on a kernel's pseudo filesystem (no blocks, no inodes: /proc,
    /sys) that refuses new entries, which ``os.access`` does not tell root. Only there, a
    directory is made and removed to be sure, since some network filesystems report no blocks
    either."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    if stats.f_blocks or stats.f_files:
        return False
    probe = directory / f".seq2seq-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except FileExistsError:
        return False
    except OSError:
        return True
    probe.rmdir()
    return False


def _check_some_text(corpus: Corpus, data: DataConfig, read_all: bool,
                     needs_text: bool = True) -> None:
    """Refuse (with ``needs_text``) a corpus without one pair holding text on both sides; read
    it all with ``read_all``, else only up to that pair. A hub dataset is not downloaded."""
    if corpus.format == "hf" and not corpus.path:
        return
    found = False
    for src, trg in read_pairs(corpus, data):
        found = found or bool(src and trg)
        if found and not read_all:
            return
    if needs_text and not found:
        files = [f for f in (corpus.src, corpus.trg, corpus.path) if f]
        where = ", ".join(str(resolve_path(f, data)) for f in files) or corpus.format
        raise DataError(f"{where}: no sentence pair has text on both sides (an empty corpus)")


def remove_stale_caches(current: Path, out_dir: Path, shared: bool, show_progress: bool
                        ) -> None:
    """Delete what killed builds left (a tokenizer in training, ``.tokenizer-<pid>-*`` in
    ``out_dir``; a cache, ``.train-<pid>-*``) once their process is gone, and the training
    caches other than ``current`` in the run's own cache directory.

    Only this run reads ``<output_dir>/cache``, and a cache there that is not the current one
    was built from inputs the run no longer has (an older corpus, other filter settings), so
    it is dead weight: for a large corpus, gigabytes per change. A ``shared`` cache directory
    (``data.cache_dir``) keeps every cache and every build in progress: other runs use it.
    """
    left = [*out_dir.glob(".tokenizer-*")]
    stale = []
    if not shared:
        left += current.parent.glob(".train-*")
        stale = [path for path in current.parent.glob("train-*")
                 if path != current and _is_cache(path)]
    for path in sorted([*stale, *filter(_orphaned, left)]):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if show_progress:
                what = "the stale training cache" if path.name[0] != "." else "what a build " \
                       "that did not end left:"
                print(f"removed {what} {path}", file=sys.stderr)


def _foreign_entries(directory: Path, ours: set[str]) -> list[str]:
    """The names in ``directory`` (if it is one) that are not among ``ours``."""
    try:
        return sorted(entry.name for entry in directory.iterdir() if entry.name not in ours)
    except OSError:  # missing, or not a directory (reported as such)
        return []


def _is_cache(path: Path) -> bool:
    """Whether ``path`` is a training cache as :mod:`seq2seq.data.cache` names and fills them
    (never a directory of the user's that happens to be called ``train-...``)."""
    return (re.fullmatch(r"train-[0-9a-f]{24}", path.name) is not None and path.is_dir()
            and not _foreign_entries(path, CACHE_FILES))


def _orphaned(path: Path) -> bool:
    """Whether the temporary directory ``path`` (``.<what>-<pid>-<random>``) is of a process
    of this machine that is gone, or of this one (whose builds have ended when this runs)."""
    parts = path.name.split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return False  # not named by this version: it may be a build in progress
    if int(parts[1]) == os.getpid():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, and another user's
        return False
    return False
