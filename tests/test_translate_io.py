"""Line-exact streaming IO of ``seq2seq translate`` (seq2seq/translate_io.py)."""

import argparse
import gzip
import io
import itertools
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq.errors import Seq2SeqError
from seq2seq.translate_io import (
    InputError,
    format_nbest,
    open_input,
    read_lines,
    translate_file,
    translate_stream,
    write_lines,
)


def reverse_batch(sentences: list[str]) -> list[str]:
    """A fake model: each sentence reversed (so order mistakes show)."""
    assert all(s and s == s.strip() for s in sentences), "blank or unstripped line reached it"
    return [s[::-1] for s in sentences]


def run(data: bytes, chunk_lines: int = 1000, max_chars: int = 5000,
        translate_batch=reverse_batch) -> tuple[bytes, list[str]]:
    """bytes in -> bytes out, as ``seq2seq translate`` does it; also return the warnings."""
    warnings: list[str] = []
    out = io.BytesIO()
    lines = read_lines(io.BytesIO(data), max_chars=max_chars, warn=warnings.append)
    write_lines(translate_stream(lines, translate_batch, chunk_lines=chunk_lines), out)
    return out.getvalue(), warnings


def expected_output(data: bytes, max_chars: int) -> list[str]:
    """What the contract promises, computed straight from the bytes."""
    pieces = data.split(b"\n")
    terminated = [True] * (len(pieces) - 1) + [False]
    if pieces[-1] == b"":  # data is empty or ends in "\n": no unterminated last line
        pieces, terminated = pieces[:-1], terminated[:-1]
    outputs = []
    for piece, ends_in_newline in zip(pieces, terminated):
        if ends_in_newline and piece.endswith(b"\r"):
            piece = piece[:-1]
        piece = piece.removeprefix(b"\xef\xbb\xbf")  # a byte order mark starting a line
        text = piece.decode("utf-8", errors="replace")[:max_chars].strip()
        outputs.append(text[::-1].replace("\r", " ").replace("\n", " "))
    return outputs


texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n"), max_size=30)
line_bytes = st.one_of(
    texts.map(lambda t: t.encode("utf-8")),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"", b" ", b"  \t ", b"\r", b"a\rb", b"x\r", b"\xff\xfe", b"\xe2\x82",
                     b"\xc3", "ქართული 𓀀 中文 ☃".encode(), "\u3000\u2028".encode()]),
    st.integers(40, 400).map(lambda n: b"y" * n),
    st.integers(10, 200).map(lambda n: "ж𓀀".encode() * n),
)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(line_bytes, max_size=25), final_newline=st.booleans(),
       chunk_lines=st.integers(1, 7))
def test_one_output_line_per_input_line_in_order(lines, final_newline, chunk_lines):
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    out, warnings = run(data, chunk_lines=chunk_lines, max_chars=50)
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    assert out.count(b"\n") == n_lines
    assert out == b"".join(line.encode("utf-8") + b"\n" for line in expected_output(data, 50))
    assert len(warnings) <= 2
    any_invalid = any(_invalid(piece) for piece in data.split(b"\n"))
    assert any("invalid UTF-8" in w for w in warnings) == any_invalid


def _invalid(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_blank_lines_give_blank_lines_like_wc_l():
    # printf 'a\n\n  \nb\n' | seq2seq translate | wc -l  ->  4
    out, _ = run(b"a\n\n  \nb\n")
    assert out == b"a\n\n\nb\n"


def test_final_line_without_newline_counts_and_is_terminated():
    out, _ = run(b"ab\ncd")
    assert out == b"ba\ndc\n"
    assert run(b"")[0] == b""
    assert run(b"\n")[0] == b"\n"


def test_crlf_is_stripped_but_a_lone_cr_is_content():
    seen = []

    def record(sentences):
        seen.extend(sentences)
        return sentences

    out, _ = run(b"ab\r\ncd\r\ne\rf\n", translate_batch=record)
    assert sorted(seen) == ["ab", "cd", "e\rf"]
    # A "\r" inside an output line is written as a space, so no tool sees two lines.
    assert out == b"ab\ncd\ne f\n"


def test_invalid_utf8_is_replaced_and_reported_once():
    out, warnings = run(b"ok\n\xff\nfine\n\xfe\xfdz\n")
    assert out.decode("utf-8").split("\n") == ["ko", "\ufffd", "enif", "z\ufffd\ufffd", ""]
    assert len(warnings) == 1
    assert "2 line(s) had invalid UTF-8 (first: line 2)" in warnings[0]


def test_long_lines_are_cut_and_reported_once():
    data = b"x" * 100_000 + b"\nshort\n" + "é".encode() * 40 + b"\n" + "𓀀".encode() * 9 + b"\n"
    out, warnings = run(data, max_chars=10, translate_batch=lambda s: s)
    assert out.decode("utf-8").split("\n") == ["x" * 10, "short", "é" * 10, "𓀀" * 9, ""]
    assert len(warnings) == 1
    assert "2 line(s) longer than 10 characters were cut to 10 (first: line 1)" in warnings[0]


def test_a_huge_line_is_never_held_in_memory():
    class Tracking(io.BytesIO):
        longest = 0

        def readline(self, size=-1):
            line = super().readline(size)
            Tracking.longest = max(Tracking.longest, len(line))
            return line

    stream = Tracking(b"z" * 1_000_000 + b"\nnext\n")
    assert list(read_lines(stream, max_chars=100, warn=lambda _: None)) == ["z" * 100, "next"]
    assert Tracking.longest <= 4 * 100 + 8


def test_ten_thousand_lines_in_order():
    data = "".join(f"line {i}\n" for i in range(10_000)).encode()
    out, warnings = run(data, chunk_lines=997)
    assert out.decode().split("\n")[:-1] == [f"line {i}"[::-1] for i in range(10_000)]
    assert warnings == []


def test_batches_are_sorted_by_length_and_skip_blank_lines():
    batches = []

    def record(sentences):
        batches.append(sentences)
        return [s.upper() for s in sentences]

    lines = ["ccc", "", "a", "   ", "bb", "dddd", "e"]
    outputs = list(translate_stream(lines, record, chunk_lines=4))
    assert outputs == ["CCC", "", "A", "", "BB", "DDDD", "E"]
    assert batches == [["a", "ccc"], ["e", "bb", "dddd"]]


def test_output_starts_before_the_input_ends():
    consumed = []

    def endless():
        for i in itertools.count():
            consumed.append(i)
            yield f"sentence {i}"

    first = list(itertools.islice(translate_stream(endless(), reverse_batch, chunk_lines=50), 3))
    assert first == ["0 ecnetnes", "1 ecnetnes", "2 ecnetnes"]
    assert len(consumed) <= 51


def test_wrong_output_count_is_an_internal_error():
    with pytest.raises(RuntimeError, match="internal error: translate_batch returned 1"):
        list(translate_stream(["a", "b"], lambda s: s[:1]))


def test_nbest_outputs_and_formatting():
    outputs = list(translate_stream(["x", "", "y"], lambda s: [[(-0.5, t), (-1.0, t * 2)]
                                                                 for t in s], empty=[]))
    assert outputs == [[(-0.5, "x"), (-1.0, "xx")], [], [(-0.5, "y"), (-1.0, "yy")]]
    assert format_nbest(3, -1.23456, "a\tb\nc\rd") == "3\t-1.2346\ta b c d"
    assert format_nbest(0, 2.0, "") == "0\t2.0000\t"


def test_write_lines_flushes_per_chunk():
    class Counting(io.BytesIO):
        flushes = 0

        def flush(self):
            Counting.flushes += 1

    stream = Counting()
    assert write_lines((str(i) for i in range(25)), stream, flush_lines=10) == 25
    assert Counting.flushes == 3  # after lines 10 and 20, and at the end
    assert stream.getvalue().count(b"\n") == 25


@pytest.mark.parametrize("argv", [
    ["translate", "--checkpoint", "{tmp}/nope.pt", "--output", "{tmp}/adir"],
    ["translate", "--checkpoint", "{tmp}/nope.pt", "--attention", "{tmp}/adir"],
    ["average", "{tmp}/nope.pt", "--output", "{tmp}/adir"],
], ids=["translate-output", "translate-attention", "average-output"])
def test_output_directories_are_refused_before_any_checkpoint_loads(argv, tmp_path, capsys):
    from seq2seq.cli import main

    (tmp_path / "adir").mkdir()
    # The checkpoint does not exist: an error about it would mean the model was loaded first.
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}/adir: is a directory, not an output file\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adir"]


def test_open_input_errors_name_the_file_and_gz_is_read(tmp_path):
    with pytest.raises(Seq2SeqError, match="nope.txt: no such input file"), \
            open_input(tmp_path / "nope.txt"):
        pass
    with pytest.raises(InputError, match="is a directory"), open_input(tmp_path):
        pass
    path = tmp_path / "in.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"a\r\nb")
    with open_input(path) as stream:
        assert list(read_lines(stream)) == ["a", "b"]


def test_gzip_is_known_by_its_magic_bytes_whatever_the_name(tmp_path, monkeypatch):
    data = gzip.compress(b"a\nb\n")
    for name in ("renamed.txt", "plain.gz"):  # a .gz renamed, and a .gz that is plain text
        (tmp_path / name).write_bytes(data if name == "renamed.txt" else b"a\nb\n")
        with open_input(tmp_path / name) as stream:
            assert list(read_lines(stream)) == ["a", "b"], name
    piped = io.BufferedReader(io.BytesIO(data))  # zcat forgotten: gzip on stdin
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(piped))
    with open_input("-") as stream:
        assert list(read_lines(stream)) == ["a", "b"]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_gzip_input_is_one_line_naming_the_file(tmp_path, damage):
    data = gzip.compress("".join(f"line {i}\n" for i in range(5000)).encode(), mtime=0)
    path = tmp_path / "in.txt.gz"
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    read = []
    with pytest.raises(InputError, match=r"in.txt.gz: cannot read after line \d+ \(") as error:
        with open_input(path) as stream:
            read.extend(read_lines(stream, name=str(path)))
    assert "\n" not in str(error.value)
    if damage == "truncated":
        # Every whole line the damaged file still holds is read, and the error names the last
        # (it said "after line 0": the reader asked gzip for 1 MiB and lost what came first).
        whole = zlib.decompressobj(wbits=31).decompress(path.read_bytes()).count(b"\n")
        assert whole > 2000 and read == [f"line {i}" for i in range(whole)]
        assert f"cannot read after line {whole} (" in str(error.value)


def test_a_byte_order_mark_is_not_text():
    """Editors on Windows start UTF-8 files with one: kept, it became part of the first
    sentence (a reference's first line scored against the hypotheses with it)."""
    lines = list(read_lines(io.BytesIO(b"\xef\xbb\xbfab\n\xef\xbb\xbfcd\nc\xef\xbb\xbfd\n")))
    assert lines == ["ab", "cd", "c\ufeffd"]  # starting any line (files joined); inside: content
    assert list(read_lines(io.BytesIO(b"\xef\xbb\xbf\n"))) == [""]
    # A line that fills the read buffer is cut whatever it starts with: its rest was read as
    # the next line, and every later output was one line off.
    warnings = []
    long = b"\xef\xbb\xbf" + "\u00e4".encode() * 60
    lines = list(read_lines(io.BytesIO(b"a\n" + long + b"\nb\n"), max_chars=10,
                            warn=warnings.append))
    assert lines == ["a", "\u00e4" * 10, "b"]
    assert len(warnings) == 1 and "cut to 10" in warnings[0], warnings


class FakeTranslation:
    def __init__(self, sentence: str, k: int):
        self.hypotheses = [sentence[::-1] + "!" * i for i in range(k)]
        self.scores = [-0.5 * (i + 1) for i in range(k)]


class FakeTranslator:
    """Stands in for seq2seq.translate.Translator: k reversed hypotheses per sentence."""

    def __init__(self, k: int = 1):
        self.k = k
        self.calls = []

    def translate_full(self, sentences, settings, return_attention):
        self.calls.append(list(sentences))
        return [FakeTranslation(s, self.k) for s in sentences]


def translate_args(tmp_path, **changes):
    source = tmp_path / "in.txt"
    source.write_bytes(b"ab\n\ncd\r\n  \nef")
    values = {"input": str(source), "output": str(tmp_path / "out.txt"), "nbest": None,
              "scores": False, "attention": None}
    values.update(changes)
    return argparse.Namespace(**values)


def test_translate_file_modes(tmp_path):
    out = tmp_path / "out.txt"
    assert translate_file(FakeTranslator(), None, translate_args(tmp_path)) == 0
    assert out.read_bytes() == b"ba\n\ndc\n\nfe\n"
    translate_file(FakeTranslator(), None, translate_args(tmp_path, scores=True))
    assert out.read_bytes() == b"-0.5000\tba\n0.0000\t\n-0.5000\tdc\n0.0000\t\n-0.5000\tfe\n"
    translator = FakeTranslator(k=2)
    translate_file(translator, None, translate_args(tmp_path, nbest=2))
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == [
        "0\t-0.5000\tba", "0\t-1.0000\tba!", "1\t0.0000\t", "2\t-0.5000\tdc",
        "2\t-1.0000\tdc!", "3\t0.0000\t", "4\t-0.5000\tfe", "4\t-1.0000\tfe!"]
    assert translator.calls == [["ab", "cd", "ef"]]


def test_translate_file_failure_leaves_no_output(tmp_path):
    class Broken(FakeTranslator):
        def translate_full(self, sentences, settings, return_attention):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        translate_file(Broken(), None, translate_args(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
