"""Bad corpora through ``seq2seq prepare``: each handled as seq2seq/data/corpus.py documents, or
rejected with one error line naming the file and the line, and no finished cache left behind."""

import gzip
import re

import pytest

from seq2seq.config import recipe_from_dict
from seq2seq.data.synthetic import generate_pairs
from tests.robustness.conftest import error_lines, seq2seq, tiny_tree, write_recipe

PAIRS = list(generate_pairs("train", 300, 0))
SRC = [src.encode() for src, _ in PAIRS]
TRG = [trg.encode() for _, trg in PAIRS]


def lines(items: list[bytes], final_newline: bool = True) -> bytes:
    return b"\n".join(items) + (b"\n" if final_newline else b"")


def text_recipe(root, **corpus_files) -> tuple:
    """A recipe reading train (and valid) from text files written under ``root``."""
    tree = tiny_tree(str(root / "run"))
    tree["data"]["root"] = str(root)
    tree["data"]["train"] = {"format": "text", "src": "train.en", "trg": "train.de"}
    files = {"train.en": lines(SRC), "train.de": lines(TRG)}
    files.update(corpus_files)
    for name, content in files.items():
        if content is not None:
            (root / name).write_bytes(content)
    return write_recipe(root / "r.yaml", tree), tree


def with_line(items: list[bytes], number: int, line: bytes) -> list[bytes]:
    return items[:number - 1] + [line] + items[number:]


def gzipped_and_cut(data: bytes) -> bytes:
    packed = gzip.compress(data)
    return packed[: len(packed) // 2]


# (files to write, the problem's file, words the error must hold)
REJECTED = {
    "source-has-one-line-more": ({"train.en": lines(SRC + [b"extra"])},
                                 "train.en", ["train.de", "301 lines", "has 300"]),
    "target-has-one-line-more": ({"train.de": lines(TRG + [b"mehr"])},
                                 "train.de", ["train.en", "300 lines", "has 301"]),
    "invalid-utf8": ({"train.de": lines(with_line(TRG, 7, b"ein \xff hund"))},
                     "train.de", ["line 7", "not valid UTF-8", "\\xff"]),
    "utf16-file": ({"train.en": "\n".join(s.decode() for s in SRC).encode("utf-16")},
                   "train.en", ["line 1", "NUL byte"]),  # UTF-16 ASCII is half NULs
    "nul-byte": ({"train.en": lines(with_line(SRC, 5, b"the \x00 dog"))},
                 "train.en", ["line 5", "NUL byte"]),
    "truncated-gzip": ({"train.en": gzipped_and_cut(lines(SRC))},
                       "train.en", ["cannot read after line"]),
    "invalid-utf8-in-valid": ({"valid.en": b"ok\n\xc3(\n", "valid.de": b"gut\nja\n"},
                              "valid.en", ["data.valid", "line 2", "not valid UTF-8"]),
}


@pytest.mark.parametrize("case", REJECTED, ids=list(REJECTED))
def test_a_bad_corpus_is_rejected_naming_file_and_line(case, tmp_path):
    files, bad_file, words = REJECTED[case]
    path, tree = text_recipe(tmp_path, **files)
    if "valid.en" in files:
        tree["data"]["valid"] = {"format": "text", "src": "valid.en", "trg": "valid.de"}
        write_recipe(path, tree)
    result = seq2seq("prepare", path, cwd=tmp_path)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    (line,) = error_lines(result.stderr)
    assert re.search(rf"{re.escape(str(tmp_path / bad_file))}\b", line), line
    for word in words:
        assert word in line, (word, line)
    cache = tmp_path / "run" / "cache"
    if "valid.en" not in files:  # (a bad valid set is found after the train cache is built)
        assert not cache.exists() or not list(cache.iterdir()), "a cache was left behind"
    assert not cache.exists() or not list(cache.glob(".*")), "a temporary was left behind"


# Lines of a corpus that are read, not rejected: (raw line, the sentence it must give).
HANDLED = {
    "byte-order-mark-at-the-start": (b"\xef\xbb\xbfthe dog", "the dog"),
    "crlf-line-end": (b"a cat\r", "a cat"),
    "lone-cr-is-content": (b"x\ry", "x\ry"),
    "control-characters-kept": (b"\x01a\x1fb\x1b[0m", "\x01a\x1fb\x1b[0m"),
    "unicode-line-separators-are-not-line-ends": ("a\u2028b\u0085c".encode(), "a\u2028b\u0085c"),
    "surrounding-whitespace-stripped": (" \t\u3000word\u00a0 ".encode(), "word"),
    "byte-order-mark-starting-a-later-line": (b"\xef\xbb\xbfmid", "mid"),  # files joined
    "byte-order-mark-inside-a-line-is-content": (b"in\xef\xbb\xbfside", "in\ufeffside"),
    "empty-line-kept": (b"", ""),
    "whitespace-only-line": (b" \t ", ""),
    "hundred-thousand-characters": (b"ab " * 33_333 + b"a", "ab " * 33_333 + "a"),
    "other-scripts": ("日本語 Ελληνικά עברית 🙂".encode(), "日本語 Ελληνικά עברית 🙂"),
    "last-line-without-newline": (b"the end", "the end"),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One ``seq2seq prepare`` whose train, valid and test corpora hold every HANDLED line."""
    root = tmp_path_factory.mktemp("corpora")
    special = [raw for raw, _ in HANDLED.values()]
    other = [b"x"] * len(special)
    path, tree = text_recipe(
        root, **{"train.en": lines(special[:-1] + SRC + special[-1:], False),
                 "train.de": lines(other[:-1] + TRG + other[-1:], False),
                 "valid.en": lines(special, False), "valid.de": lines(other, False)})
    tree["data"]["valid"] = {"format": "text", "src": "valid.en", "trg": "valid.de"}
    write_recipe(path, tree)
    result = seq2seq("prepare", path, cwd=root)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    from seq2seq.data.cache import prepare_data

    data = prepare_data(recipe_from_dict(tree), show_progress=False)  # reuses the cache
    assert data.stats["cache"]["reused"]
    return data, result.stdout.decode()


@pytest.mark.parametrize("case", HANDLED, ids=list(HANDLED))
def test_an_odd_line_is_read_as_documented(case, prepared):
    data, _ = prepared
    index = list(HANDLED).index(case)
    assert len(data.valid) == len(HANDLED)  # no line lost, none split, none merged
    assert data.valid.src_text[index] == HANDLED[case][1]
    assert data.valid.trg_text[index] == "x"


def test_training_pairs_are_counted_and_filtered_per_reason(prepared):
    data, stdout = prepared
    train = data.stats["train"]
    assert f"{300 + len(HANDLED):,} pairs read" in stdout
    dropped = train["dropped"]
    assert dropped["empty"] == 2  # the empty and the whitespace-only line
    assert dropped["src_too_long"] >= 1  # the 100,000-character line
    assert len(data.train) == 300 + len(HANDLED) - sum(dropped.values())


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_an_empty_test_corpus_is_refused_before_any_work(tmp_path, command):
    """It passed, and evaluate then failed on it after decoding the other test sets."""
    path, tree = text_recipe(tmp_path, **{"empty.en": b"\n", "empty.de": b"\n"})  # blank
    tree["data"]["test"] = {"empty": {"format": "text", "src": "empty.en", "trg": "empty.de"}}
    write_recipe(path, tree)
    result = seq2seq(command, path, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "data.test.empty: " in line and "an empty corpus" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("split", "command"), [("test", "check"), ("train", "check"),
                                               ("train", "train")])
def test_a_corpus_that_is_a_pipe_is_refused_and_check_does_not_block(tmp_path, split, command):
    """A FIFO (or bash's <(...)) lost what the first read took, and opening one blocked; the
    training corpus's fingerprint, which hashes its files, must not open one either."""
    import os

    path, tree = text_recipe(tmp_path)
    os.mkfifo(tmp_path / "pipe.en")
    corpus = {"format": "text", "src": "pipe.en", "trg": "train.de"}
    if split == "test":
        tree["data"]["test"] = {"t": corpus}
    else:
        tree["data"]["train"] = corpus
    write_recipe(path, tree)
    # Its timeout fails the test if it blocks.
    result = seq2seq(command, path, "train.max_steps=1", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    where = "data.test.t: " if split == "test" else "data.train: "
    assert where in line and "pipe.en: not a regular file" in line, line


def test_test_set_names_that_would_share_a_report_file_are_refused(tmp_path):
    path, tree = text_recipe(tmp_path)
    corpus = {"format": "text", "src": "train.en", "trg": "train.de"}
    tree["data"]["test"] = {"a/b": corpus, "a_b": corpus}
    write_recipe(path, tree)
    result = seq2seq("check", path, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.endswith("data.test: the names 'a/b' and 'a_b' would share the report file "
                         "a_b.hyp.txt; rename one"), line


def test_empty_training_files_are_rejected_with_one_line(tmp_path):
    path, _ = text_recipe(tmp_path, **{"train.en": b"", "train.de": b""})
    result = seq2seq("prepare", path, cwd=tmp_path)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    (line,) = error_lines(result.stderr)
    assert "data.train" in line and "train.en" in line and "no sentence pair" in line, line


@pytest.mark.parametrize("name", ["metrics.jsonl", "recipe.yaml", "last.pt",
                                  "tokenizer/spm.vocab", "cache/x.de", "eval/t.hyp",
                                  "sampled/epoch-notes.en"])
def test_a_corpus_file_the_run_would_write_is_refused_and_left_alone(tmp_path, name):
    """A corpus kept in the output_dir under a name the run writes would be appended to or
    replaced (metrics rows in the training data); refused before anything is written."""
    path, tree = text_recipe(tmp_path)
    run = tmp_path / "run"
    (run / name).parent.mkdir(parents=True)
    (run / name).write_bytes(lines(SRC))
    tree["data"]["train"]["src"] = str(run / name)
    write_recipe(path, tree)
    for command in ("check", "prepare", "train"):
        result = seq2seq(command, path, cwd=tmp_path)
        assert result.returncode == 2, result.stderr.decode()[-2000:]
        (line,) = error_lines(result.stderr)
        assert f"data.train: {run / name}: a file the run writes in its output_dir" in line \
            or command != "check" and "cannot resume" in line, line  # (last.pt: not one)
        assert (run / name).read_bytes() == lines(SRC)
    written = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert written == sorted([name, ".lock"])  # the lock train and prepare took, no more


def test_a_corpus_beside_the_run_files_under_its_own_name_is_read(tmp_path):
    path, tree = text_recipe(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.en").write_bytes(lines(SRC))
    tree["data"]["train"]["src"] = str(tmp_path / "run" / "train.en")
    write_recipe(path, tree)
    result = seq2seq("prepare", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
