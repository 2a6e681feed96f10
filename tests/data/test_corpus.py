"""Corpus readers: every format read back, every user mistake reported on one line."""

import gzip
import json
import time
import zlib
from pathlib import Path

import pytest

from seq2seq.config import Corpus, DataConfig
from seq2seq.data.corpus import DataError, read_pairs, resolve_path
from seq2seq.data.synthetic import generate_pairs
from seq2seq.errors import Seq2SeqError

PAIRS = [("a small house", "ein kleines Haus"), ("the dog", "der Hund"), ("", ""),
         ("Grüße ✓", "héllo")]


def data_config(root: Path) -> DataConfig:
    return DataConfig(root=str(root), src_lang="en", trg_lang="de")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    return write(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def read_text(root: Path, src: str = "s.en", trg: str = "s.de") -> list[tuple[str, str]]:
    return list(read_pairs(Corpus(format="text", src=src, trg=trg), data_config(root)))


def one_line_error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# -------------------------------------------------------------------------------- paths


def test_resolve_path_relative_absolute_home_and_vars(tmp_path, monkeypatch):
    data = data_config(tmp_path)
    assert resolve_path("a/b.txt", data) == tmp_path / "a" / "b.txt"
    assert resolve_path("/abs/file", data) == Path("/abs/file")
    monkeypatch.setenv("CORPUS_DIR", "/somewhere")
    assert resolve_path("$CORPUS_DIR/x", data) == Path("/somewhere/x")
    assert resolve_path("~/x", data) == Path.home() / "x"


def test_resolve_path_default_root_is_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQ2SEQ_DATA", str(tmp_path))
    assert resolve_path("x.en", DataConfig(src_lang="en", trg_lang="de")) == tmp_path / "x.en"


# -------------------------------------------------------------------------------- text


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_text_roundtrip_plain_and_gzip(tmp_path, suffix):
    write_lines(tmp_path / f"s.en{suffix}", [s for s, _ in PAIRS])
    write_lines(tmp_path / f"s.de{suffix}", [t for _, t in PAIRS])
    assert read_text(tmp_path, f"s.en{suffix}", f"s.de{suffix}") == PAIRS


def test_gzip_recognised_by_magic_bytes_without_suffix(tmp_path):
    (tmp_path / "s.en").write_bytes(gzip.compress(b"hello\n"))
    write_lines(tmp_path / "s.de", ["hallo"])
    assert read_text(tmp_path) == [("hello", "hallo")]


def test_reads_lazily(tmp_path):
    write_lines(tmp_path / "s.en", ["a", "b"])
    write(tmp_path / "s.de", b"x\n\xff\n")  # the bad line is never reached
    pairs = read_pairs(Corpus(src="s.en", trg="s.de"), data_config(tmp_path))
    assert next(pairs) == ("a", "x")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mismatched_line_counts_name_both_files_and_counts(tmp_path, suffix):
    write_lines(tmp_path / f"s.en{suffix}", ["a", "b", "c"])
    write_lines(tmp_path / f"s.de{suffix}", ["x", "y"])
    message = one_line_error(lambda: read_text(tmp_path, f"s.en{suffix}", f"s.de{suffix}"))
    assert f"s.en{suffix} has 3 lines but" in message and f"s.de{suffix} has 2" in message
    message = one_line_error(lambda: read_text(tmp_path, f"s.de{suffix}", f"s.en{suffix}"))
    assert f"s.de{suffix} has 2 lines but" in message and f"s.en{suffix} has 3" in message


def test_mismatch_counts_use_thousands_separators(tmp_path):
    write_lines(tmp_path / "s.en.gz", ["a"] * 1500)
    write_lines(tmp_path / "s.de.gz", ["b"] * 1499)
    message = one_line_error(lambda: read_text(tmp_path, "s.en.gz", "s.de.gz"))
    assert "1,500 lines" in message and "1,499" in message


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
    write_lines(tmp_path / f"s.en{suffix}", ["a", "b", "c"])
    write(tmp_path / f"s.de{suffix}", b"ok\nfine\nbad \xc3\x28 byte\n")
    message = one_line_error(lambda: read_text(tmp_path, f"s.en{suffix}", f"s.de{suffix}"))
    assert f"s.de{suffix}" in message and "line 3" in message and "UTF-8" in message


def test_nul_byte_rejected_with_file_and_line(tmp_path):
    write_lines(tmp_path / "s.en", ["a", "b"])
    write(tmp_path / "s.de", b"x\ny\x00z\n")
    message = one_line_error(lambda: read_text(tmp_path))
    assert "s.de" in message and "line 2" in message and "NUL" in message


def test_bom_crlf_whitespace_and_control_characters(tmp_path):
    write(tmp_path / "s.en", b"\xef\xbb\xbfhello\r\n  two  words \t\r\nin\rside\r\nkeep\x1fme\r\n")
    write(tmp_path / "s.de", "\u00a0hallo\u3000\nzwei\n\ufeffinnen\nbe\ufeffhalte\n".encode())
    assert read_text(tmp_path) == [
        ("hello", "hallo"),
        ("two  words", "zwei"),
        ("in\rside", "innen"),  # a BOM starting a line: files joined with cat
        ("keep\x1fme", "be\ufeffhalte"),  # inside a line it is a character
    ]


def test_last_line_without_newline_counts(tmp_path):
    write(tmp_path / "s.en", b"a\nb")
    write(tmp_path / "s.de", b"x\ny\n")
    assert read_text(tmp_path) == [("a", "x"), ("b", "y")]


def test_empty_lines_are_kept(tmp_path):
    write(tmp_path / "s.en", b"\n\na\n")
    write(tmp_path / "s.de", b"x\n\n\n")
    assert read_text(tmp_path) == [("", "x"), ("", ""), ("a", "")]


def test_empty_files(tmp_path):
    write(tmp_path / "s.en", b"")
    write(tmp_path / "s.de", b"")
    assert read_text(tmp_path) == []
    write_lines(tmp_path / "s.de", ["x"])
    message = one_line_error(lambda: read_text(tmp_path))
    assert "s.en has 0 lines but" in message and "s.de has 1" in message


def test_missing_file_and_directory(tmp_path):
    write_lines(tmp_path / "s.en", ["a"])
    message = one_line_error(lambda: read_text(tmp_path, "s.en", "nope.de"))
    assert str(tmp_path / "nope.de") in message and "no such file" in message
    (tmp_path / "dir").mkdir()
    assert "dir" in one_line_error(lambda: read_text(tmp_path, "s.en", "dir"))


def test_truncated_gzip(tmp_path):
    write_lines(tmp_path / "s.en", ["a"] * 5000)
    data = gzip.compress("".join(f"line {i} of a file\n" for i in range(5000)).encode())
    (tmp_path / "s.de.gz").write_bytes(data[: len(data) // 2])
    message = one_line_error(lambda: read_text(tmp_path, "s.en", "s.de.gz"))
    # The error names the last whole line the damaged file holds, as zcat would print it.
    whole = zlib.decompressobj(wbits=31).decompress(data[: len(data) // 2]).count(b"\n")
    assert whole > 2000 and f"s.de.gz: cannot read after line {whole} (" in message


def test_text_corpus_without_files_is_an_error(tmp_path):
    message = one_line_error(
        lambda: list(read_pairs(Corpus(format="text", src="a"), data_config(tmp_path))))
    assert "trg" in message


def test_data_error_is_a_seq2seq_error():
    assert issubclass(DataError, Seq2SeqError)


def test_gzip_reading_is_fast(tmp_path):
    # The prepare step reads 1,000,000 pairs within its budget: a few seconds per million.
    lines = [f"sentence number {i} with a few more words, ünïcödé ✓" for i in range(200_000)]
    write_lines(tmp_path / "s.en.gz", lines)
    write_lines(tmp_path / "s.de.gz", lines)
    start = time.process_time()
    count = sum(1 for _ in read_pairs(Corpus(src="s.en.gz", trg="s.de.gz"),
                                      data_config(tmp_path)))
    assert count == 200_000
    assert time.process_time() - start < 2.0  # about 0.5 s on one core


# -------------------------------------------------------------------------------- tsv


def test_tsv_roundtrip(tmp_path):
    write(tmp_path / "c.tsv.gz", "".join(f"{s}\t{t}\r\n" for s, t in PAIRS).encode())
    corpus = Corpus(format="tsv", path="c.tsv.gz")
    assert list(read_pairs(corpus, data_config(tmp_path))) == PAIRS


@pytest.mark.parametrize("line", ["no tab here", "one\ttwo\tthree", ""])
def test_tsv_line_without_exactly_one_tab(tmp_path, line):
    write(tmp_path / "c.tsv", f"a\tb\n{line}\n".encode())
    message = one_line_error(
        lambda: list(read_pairs(Corpus(format="tsv", path="c.tsv"), data_config(tmp_path))))
    assert "c.tsv" in message and "line 2" in message and "tab" in message


def test_tsv_missing_file(tmp_path):
    message = one_line_error(
        lambda: list(read_pairs(Corpus(format="tsv", path="x.tsv"), data_config(tmp_path))))
    assert "x.tsv" in message


# -------------------------------------------------------------------------------- jsonl


def read_jsonl(root: Path, records: list, **fields) -> list[tuple[str, str]]:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    write_lines(root / "c.jsonl", lines)
    corpus = Corpus(format="jsonl", path="c.jsonl", **fields)
    return list(read_pairs(corpus, data_config(root)))


def test_jsonl_language_fields(tmp_path):
    assert read_jsonl(tmp_path, [{"en": s, "de": t, "id": 1} for s, t in PAIRS]) == PAIRS


def test_jsonl_translation_dicts(tmp_path):
    records = [{"translation": {"en": s, "de": t}} for s, t in PAIRS]
    assert read_jsonl(tmp_path, records) == PAIRS


def test_jsonl_named_and_dotted_fields(tmp_path):
    records = [{"source": " a ", "meta": {"target": "b"}}]
    assert read_jsonl(tmp_path, records, src_field="source", trg_field="meta.target") == [
        ("a", "b")]


def test_jsonl_invalid_json(tmp_path):
    message = one_line_error(lambda: read_jsonl(tmp_path, [{"en": "a", "de": "b"}, "{oops"]))
    assert "c.jsonl" in message and "line 2" in message and "invalid JSON" in message


def test_jsonl_missing_field(tmp_path):
    message = one_line_error(lambda: read_jsonl(tmp_path, [{"en": "a", "de": "b"}, {"en": "c"}]))
    assert "c.jsonl" in message and "line 2" in message and "'de'" in message


def test_jsonl_field_not_a_string_or_record_not_an_object(tmp_path):
    message = one_line_error(lambda: read_jsonl(tmp_path, [{"en": "a", "de": 3}]))
    assert "line 1" in message and "'de'" in message and "string" in message
    message = one_line_error(lambda: read_jsonl(tmp_path, [{"en": "a", "de": "b"}, "[1, 2]"]))
    assert "line 2" in message and "object" in message


@pytest.mark.parametrize("record,words", [
    ('{"en": "a", "de": "b", "n": ' + "9" * 5000 + "}", ["line 2", "unreadable JSON"]),
    ("[" * 100_000 + "]" * 100_000, ["line 2", "unreadable JSON"]),
    ('{"en": "bad \\ud800 here", "de": "b"}', ["line 2", "'en'", "lone surrogate at "
                                                  "character 5"]),
])
def test_jsonl_that_json_or_a_tokenizer_cannot_take(tmp_path, record, words):
    """A number past Python's 4,300 digits, nesting past its recursion limit, and JSON's
    lone surrogate escape (no UTF-8 text: SentencePiece failed on it) are one line each."""
    message = one_line_error(lambda: read_jsonl(tmp_path, [{"en": "a", "de": "b"}, record]))
    assert "c.jsonl" in message and all(word in message for word in words), message


# -------------------------------------------------------------------------------- hf


def test_hf_translation_column(tmp_path):
    datasets = pytest.importorskip("datasets")  # a declared dependency: never missing in CI
    rows = [{"en": s, "de": t, "fr": "x"} for s, t in PAIRS]
    datasets.Dataset.from_dict({"translation": rows}).save_to_disk(str(tmp_path / "ds"))
    corpus = Corpus(format="hf", path="ds")
    assert list(read_pairs(corpus, data_config(tmp_path))) == PAIRS


def test_hf_plain_columns_and_named_fields(tmp_path):
    import datasets

    columns = {"en": [s for s, _ in PAIRS], "de": [t for _, t in PAIRS], "other": [1] * 4}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    assert list(read_pairs(Corpus(format="hf", path="ds"), data_config(tmp_path))) == PAIRS
    corpus = Corpus(format="hf", path="ds", src_field="de", trg_field="en")
    assert list(read_pairs(corpus, data_config(tmp_path))) == [(t, s) for s, t in PAIRS]


def test_hf_dataset_dict_split(tmp_path):
    import datasets

    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"en": ["a"], "de": ["b"]}),
        "validation": datasets.Dataset.from_dict({"en": ["c", "e"], "de": ["d", "f"]}),
    })
    splits.save_to_disk(str(tmp_path / "dd"))
    corpus = Corpus(format="hf", path="dd", split="validation")
    assert list(read_pairs(corpus, data_config(tmp_path))) == [("c", "d"), ("e", "f")]
    message = one_line_error(lambda: list(read_pairs(
        Corpus(format="hf", path="dd", split="test"), data_config(tmp_path))))
    assert "'test'" in message and "train" in message and "validation" in message


def test_hf_missing_language_names_the_columns(tmp_path):
    import datasets

    rows = {"translation": [{"en": "a", "fr": "b"}], "id": [0]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    message = one_line_error(
        lambda: list(read_pairs(Corpus(format="hf", path="ds"), data_config(tmp_path))))
    assert "'de'" in message and "translation (en, fr)" in message and "id" in message


def test_hf_bad_directory(tmp_path):
    message = one_line_error(
        lambda: list(read_pairs(Corpus(format="hf", path="nope"), data_config(tmp_path))))
    assert "nope" in message
    (tmp_path / "empty").mkdir()
    message = one_line_error(
        lambda: list(read_pairs(Corpus(format="hf", path="empty"), data_config(tmp_path))))
    assert "empty" in message and "save_to_disk" in message


def test_hf_null_sentence_names_row_and_field(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"en": ["a", None], "de": ["b", "c"]}).save_to_disk(
        str(tmp_path / "ds"))
    message = one_line_error(
        lambda: list(read_pairs(Corpus(format="hf", path="ds"), data_config(tmp_path))))
    assert "row 2" in message and "'en'" in message


# -------------------------------------------------------------------------------- generated


def test_generated_corpus_matches_generate_pairs(tmp_path):
    corpus = Corpus(format="generated", split="valid", size=20, seed=3)
    pairs = list(read_pairs(corpus, data_config(tmp_path)))
    assert pairs == list(generate_pairs("valid", 20, seed=3))


def test_generated_corpus_needs_a_size_and_a_known_split(tmp_path):
    message = one_line_error(lambda: list(read_pairs(
        Corpus(format="generated", split="train", size=0), data_config(tmp_path))))
    assert "size" in message
    message = one_line_error(lambda: list(read_pairs(
        Corpus(format="generated", split="dev", size=3), data_config(tmp_path))))
    assert "'dev'" in message


# -------------------------------------------------------------------------------- real data


def test_real_multi30k_train(data_root):
    data = DataConfig(root=str(data_root / "multi30k"), src_lang="de", trg_lang="en")
    pairs = list(read_pairs(Corpus(src="train.de.gz", trg="train.en.gz"), data))
    assert len(pairs) == 29_000
    assert all(src and trg for src, trg in pairs)
    assert pairs[0][1].startswith("Two young")
