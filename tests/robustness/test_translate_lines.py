"""``seq2seq translate`` never loses or reorders a line, whatever the bytes of its input.

A line is what ends in ``"\\n"`` (a final line without one counts too; a lone ``"\\r"`` is
content), as for ``wc -l`` and ``paste``. Every check runs the real command on a tiny trained
checkpoint. Order is checked without knowing what the model says: with ``--scores`` the output of
a line is a function of its text, so identical lines must give identical output lines, and an
input followed by its own reversal must give a palindrome of output lines.
"""

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq.data.synthetic import generate_pairs
from tests.robustness.conftest import seq2seq

MAX_CHARS = 5000  # translate_io.DEFAULT_MAX_CHARS: longer lines are cut to this many characters
GREEDY = ["--beam", "1", "--alpha", "0", "--scores"]

FRAGMENTS = [
    b"the", b"dog", b" sees ", b"a small house", b".", b" ", b"\t", b"\r", b"\r\r",
    b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82",  # invalid UTF-8: stray, cut, surrogate
    "日本語の文".encode(), "Ελληνικά".encode(), "עברית".encode(), "🙂".encode(),
    "\u2028".encode(), "\u0085".encode(), "\u3000".encode(), "\u200b".encode(),
    b"\x00", b"\x01", b"\x1b[31m", b"\x0b\x0c",
]
LINE = st.lists(st.one_of(st.sampled_from(FRAGMENTS),
                          st.binary(max_size=3).filter(lambda b: b"\n" not in b)),
                max_size=6).map(b"".join)


def input_lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` as ``wc -l`` counts them, plus an unterminated last line."""
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    return parts


def text_of(line: bytes) -> str:
    """What the model is asked to translate for this input line ("" for a blank line)."""
    return line.decode("utf-8", "replace")[:MAX_CHARS].strip()


def valid_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def translate(data: bytes, *flags: str, checkpoint: Path):
    result = seq2seq("translate", "--checkpoint", checkpoint, *flags, cwd=checkpoint.parent,
                     stdin=data, timeout=600)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, err[-3000:]
    assert all(line.startswith("warning: ") for line in err.splitlines()), err[-3000:]
    out = result.stdout.decode("utf-8")
    assert out == "" or out.endswith("\n")
    return out.split("\n")[:-1], err


def check_line_exact(lines: list[bytes], outputs: list[str]) -> dict[str, str]:
    """One output per input line; equal inputs, equal outputs; blank inputs, blank outputs.

    Returns:
        The output of each distinct non-blank input text.
    """
    assert len(outputs) == len(lines)
    seen: dict[str, str] = {}
    for line, output in zip(lines, outputs):
        text = text_of(line)
        if not text:
            assert output == "0.0000\t", (line, output)
            continue
        assert seen.setdefault(text, output) == output, (line, output, seen[text])
    return seen


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=st.lists(LINE, max_size=10), final_newline=st.booleans())
def test_any_bytes_give_one_output_line_per_input_line_in_order(trained, lines, final_newline):
    data = b"\n".join(lines + lines[::-1]) + (b"\n" if final_newline and lines else b"")
    expected = input_lines(data)
    outputs, err = translate(data, *GREEDY, checkpoint=trained)
    check_line_exact(expected, outputs)
    if len(expected) == 2 * len(lines):  # (not so when an empty last line lacks its "\n")
        assert outputs == outputs[::-1]  # the input is a palindrome of lines, so is the output
    invalid = [i for i, line in enumerate(expected, 1) if not valid_utf8(line)]
    if invalid:
        assert f"{len(invalid)} line(s) had invalid UTF-8 (first: line {invalid[0]})" in err
    else:
        assert "invalid UTF-8" not in err


def test_a_hundred_thousand_lines_in_order(trained):
    """100,000 lines: every 20th one a sentence (200 distinct ones), the rest blank in many ways."""
    sentences = sorted({src for src, _ in generate_pairs("test", 400, 7)})[:200]
    blanks = [b"", b" ", b"\t", b"\r", " \u3000 ".encode(), b"\x0b"]
    lines = [sentences[(i // 20) % len(sentences)].encode() if i % 20 == 0
             else blanks[i % len(blanks)] for i in range(100_000)]
    data = b"\n".join(lines)  # the last line has no "\n": it still counts
    outputs, _ = translate(data, *GREEDY, "--batch-tokens", "8000", checkpoint=trained)
    seen = check_line_exact(lines, outputs)
    # The check above only bites if different sentences get different outputs.
    assert len(set(seen.values())) >= 0.5 * len(seen)


def test_extremely_long_lines_are_cut_by_the_documented_rule(trained):
    long_line = ("the dog sees a small house . " * 4000).encode()  # 116,000 characters
    lines = [b"the dog", long_line, b"", long_line + b"\xff", b"a house"]
    # A short --max-len-ratio: the untrained model would otherwise write ~1,700 tokens per line.
    outputs, err = translate(b"\n".join(lines) + b"\n", *GREEDY, "--max-len-ratio", "0.01",
                             checkpoint=trained)
    assert len(outputs) == 5 and outputs[2] == "0.0000\t"
    assert f"2 line(s) longer than {MAX_CHARS} characters were cut to {MAX_CHARS} " \
           "(first: line 2)" in err
    # Cut at MAX_CHARS characters, both long lines are the same sentence (the \xff is past it).
    assert outputs[1] == outputs[3]


def test_nbest_and_output_file_keep_every_line(trained):
    data = b"the dog\n\n\xff\xfe\n \r\nx\ry\n\xe2\x80\xa8\na small house"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.tsv"
        outputs, err = translate(data, "--nbest", "2", "--beam", "2", "--output", str(out),
                                 checkpoint=trained)
        assert outputs == []
        rows = [row.split("\t") for row in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert all(len(row) == 3 for row in rows)
    # Two rows per line, but the documented one row "index<TAB>0.0000<TAB>" for a blank line,
    # and for one of only what SentencePiece removes: U+FFFD, which invalid bytes become.
    blank = [text_of(line).replace("\ufffd", "") == "" for line in input_lines(data)]
    assert blank == [False, True, True, True, False, True, False]
    rows_per_line = [1 if is_blank else 2 for is_blank in blank]
    assert [int(row[0]) for row in rows] == [i for i in range(7) for _ in range(rows_per_line[i])]
    assert "invalid UTF-8 (first: line 3)" in err
