"""Line-exact, streaming input and output for ``seq2seq translate``.

The contract is the one ``paste`` and ``wc -l`` rely on: **one output line per input line, in
order**, whatever the input holds.

* A line is what ends in ``"\\n"``. A final line without ``"\\n"`` still counts, and every output
  line ends in ``"\\n"``, so ``printf 'a\\n\\n  \\nb' | seq2seq translate ... | wc -l`` prints 4.
* Input is read as bytes and decoded as UTF-8 line by line; invalid bytes become U+FFFD and are
  reported once on stderr (count and first line number) when the input ends. A UTF-8 byte
  order mark at the start is dropped, and gzip data is decompressed (:func:`open_input`).
* One trailing ``"\\r"`` (CRLF input) is removed before translation; any other ``"\\r"`` is
  content, as for ``wc -l``. Output lines end in ``"\\n"`` only.
* Empty and whitespace-only lines give an empty output line without reaching the model.
* Lines longer than ``max_chars`` characters are cut to their first ``max_chars`` characters
  (reported once on stderr); at most ``4 * max_chars + 8`` bytes of a line are held in memory.
* ``"\\n"`` and ``"\\r"`` inside a translation are written as spaces, so no output can split
  into two lines (``format_nbest`` does the same for tabs).

Input is consumed chunk by chunk (``chunk_lines`` lines at a time), so a file of ten million
lines never sits in memory and output starts before the input ends. Outputs are written by
:mod:`seq2seq.files`: a file is replaced atomically at the end, so a failed run leaves nothing
half-written.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from seq2seq.errors import Seq2SeqError, warn
from seq2seq.files import open_output

DEFAULT_MAX_CHARS = 5000
DEFAULT_CHUNK_LINES = 1000
# Said once when lines were cut, by translate and evaluate alike (``str.format`` fields).
CUT_WARNING = ("{name}: {count} line(s) longer than {max_chars} characters were cut to "
               "{max_chars} (first: line {first})")

T = TypeVar("T")


class InputError(Seq2SeqError):
    """An input or output file that cannot be opened, read or written."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"


def check_stdin() -> None:
    """Refuse stdin as input where this process has none: Python sets None for a descriptor
    closed at start (`<&-`)."""
    if sys.stdin is None:
        raise InputError("<stdin>: is closed; name an input file")


@contextlib.contextmanager
def open_input(path: str | Path) -> Iterator[BinaryIO]:
    """Open ``path`` for binary reading; ``"-"`` is stdin. gzip data is decompressed, known by
    its magic bytes whatever the name (as the corpus reader does): a ``.gz`` renamed, or piped.

    Raises:
        InputError: the file is missing, a directory, or unreadable (one line naming it).
    """
    if str(path) == "-":
        check_stdin()
        yield _gunzipped(sys.stdin.buffer)  # stdin itself is left open
        return
    try:
        # Closed by the ``with`` below; opening first lets the errors name the file.
        stream = open(path, "rb")  # noqa: SIM115
        head = stream.peek(2)[:2]
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an input file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot open input ({error.strerror or error})") from None
    with stream:
        yield _gunzipped(stream) if head == GZIP_MAGIC else stream


def _gunzipped(stream: BinaryIO) -> BinaryIO:
    """``stream`` decompressed when it starts with the gzip magic, else itself."""
    peek = getattr(stream, "peek", None)
    if peek is None or peek(2)[:2] != GZIP_MAGIC:
        return stream
    return gunzip(stream, close_stream=False)


def gunzip(stream: BinaryIO, close_stream: bool) -> BinaryIO:
    """The gzip data of ``stream``, decompressed, for reading by lines.

    Every line decompressed before a truncated or corrupt end is read before the error
    (``EOFError``, ``zlib.error``, ``gzip.BadGzipFile``) is raised: ``GzipFile.read(n)`` would
    drop what it had gathered towards ``n`` bytes. A large buffer keeps the gzip layer out of
    the per-line cost. Closing the result closes ``stream`` if ``close_stream``.
    """
    return io.BufferedReader(_GzipChunks(stream, close_stream), buffer_size=1 << 20)


class _GzipChunks(io.RawIOBase):
    """A gzip stream read one decompressed chunk at a time (``read1``)."""

    def __init__(self, stream: BinaryIO, close_stream: bool) -> None:
        self._stream, self._close_stream = stream, close_stream
        self._gzip = gzip.GzipFile(fileobj=stream, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._gzip.read1(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._gzip.close()  # leaves the stream it was given open
            if self._close_stream:
                self._stream.close()
        super().close()


def read_lines(
    stream: BinaryIO,
    max_chars: int = DEFAULT_MAX_CHARS,
    name: str = "<stdin>",
    warn: Callable[[str], None] = warn,
) -> Iterator[str]:
    """Yield the lines of a binary stream as text, one per ``"\\n"``-terminated line.

    Args:
        stream: a binary stream (``sys.stdin.buffer``, a file opened ``"rb"``, ``io.BytesIO``).
        max_chars: lines longer than this many characters are cut to this many.
        name: how warnings name the input.
        warn: receives the one-line warnings about invalid UTF-8 and truncation, once each,
            after the last line.

    Yields:
        Each line without its ``"\\n"`` and without one trailing ``"\\r"``.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    # A UTF-8 character (or a replaced invalid byte) takes at most 4 bytes, so this many bytes
    # hold more than max_chars characters, even after a character cut in two is held back.
    max_bytes = 4 * max_chars + 8
    invalid, first_invalid = 0, 0
    truncated, first_truncated = 0, 0
    line_no = 0
    while True:
        try:
            raw = stream.readline(max_bytes)
        except (EOFError, OSError, zlib.error) as error:
            # also truncated or corrupt gzip data
            raise InputError(f"{name}: cannot read after line {line_no} "
                             f"({error.__class__.__name__}: {error})") from None
        if not raw:
            break
        line_no += 1
        complete = raw.endswith(b"\n")
        # A line that fills max_bytes has more than max_chars characters (see above), so it
        # is cut in any case: drop its rest unread into memory.
        cut = not complete and len(raw) == max_bytes
        if cut:
            _skip_rest_of_line(stream, max_bytes)
        if raw.startswith(BOM):  # a byte order mark is not text (files joined: on any line)
            raw = raw[len(BOM):]
        if complete:
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        text, ok = _decode(raw, final=not cut)
        if not ok:
            invalid += 1
            first_invalid = first_invalid or line_no
        if cut or len(text) > max_chars:
            text = text[:max_chars]
            truncated += 1
            first_truncated = first_truncated or line_no
        yield text
    if invalid:
        warn(f"{name}: {invalid} line(s) had invalid UTF-8 (first: line {first_invalid}); "
             "invalid bytes were replaced by U+FFFD")
    if truncated:
        warn(CUT_WARNING.format(name=name, count=truncated, max_chars=max_chars,
                                first=first_truncated))


def _skip_rest_of_line(stream: BinaryIO, max_bytes: int) -> None:
    """Read and drop the rest of an over-long line, up to and including its ``"\\n"``."""
    while (rest := stream.readline(max_bytes)) and not rest.endswith(b"\n"):
        pass


def _decode(raw: bytes, final: bool) -> tuple[str, bool]:
    """Decode UTF-8, replacing invalid bytes; ``final=False`` drops a character cut in two.

    Returns:
        The text and whether the bytes were valid UTF-8.
    """
    if final:
        try:
            return raw.decode("utf-8"), True
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), False
    try:
        return codecs.getincrementaldecoder("utf-8")("strict").decode(raw), True
    except UnicodeDecodeError:
        return codecs.getincrementaldecoder("utf-8")("replace").decode(raw), False


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (JSON and Python strings allow ``"\\ud800"``) replaced by
    U+FFFD, which no tokenizer can take as they are.

    They are what invalid UTF-8 becomes in a file read by ``seq2seq translate``: the same bytes,
    decoded with replacement, give the same text.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Translating chunk by chunk
# --------------------------------------------------------------------------------------------


def translate_stream(
    lines: Iterable[str],
    translate_batch: Callable[[list[str]], list[T]],
    chunk_lines: int = DEFAULT_CHUNK_LINES,
    batch_key: Callable[[str], int] = len,
    empty: T = "",
) -> Iterator[T]:
    """Translate a stream of lines, yielding exactly one output per input line, in order.

    Lines are taken ``chunk_lines`` at a time. Within a chunk the non-blank lines (stripped of
    surrounding whitespace) are sorted by ``batch_key`` so that ``translate_batch`` sees
    sentences of similar length next to each other and pads little; the outputs are put back in
    input order before they are yielded. Blank lines never reach ``translate_batch``.

    Args:
        lines: the input lines (e.g. from :func:`read_lines`); consumed lazily.
        translate_batch: takes a list of sentences and returns one output for each, in the same
            order; it may split the list into smaller batches itself.
        chunk_lines: lines read before translating; the output of a chunk is yielded before
            the next chunk is read (use 1 for interactive use).
        batch_key: the sort key that groups sentences of similar length.
        empty: the output for a blank line ("" for text; e.g. [] for n-best lists).

    Yields:
        One output per input line.

    Raises:
        RuntimeError: ``translate_batch`` returned the wrong number of outputs (a bug).
    """
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}")
    lines = iter(lines)
    while chunk := list(islice(lines, chunk_lines)):
        sentences = [line.strip() for line in chunk]
        todo = sorted((i for i, s in enumerate(sentences) if s),
                      key=lambda i: batch_key(sentences[i]))
        outputs = translate_batch([sentences[i] for i in todo]) if todo else []
        if len(outputs) != len(todo):
            raise RuntimeError(f"internal error: translate_batch returned {len(outputs)} "
                               f"outputs for {len(todo)} sentences")
        results: list[T] = [empty] * len(chunk)
        for i, output in zip(todo, outputs):
            results[i] = output
        yield from results


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    """``text`` with ``"\\n"`` and ``"\\r"`` replaced by spaces, so it stays one line."""
    return text.replace("\r", " ").replace("\n", " ")


def format_nbest(index: int, score: float, hyp: str) -> str:
    """One n-best TSV row, ``"index\\tscore\\thypothesis"`` (no trailing newline).

    The score has 4 decimals; tabs, ``"\\n"`` and ``"\\r"`` in the hypothesis become spaces so
    the row keeps three columns on one line.
    """
    return f"{index}\t{score:.4f}\t{one_line(hyp).replace(chr(9), ' ')}"


def write_lines(lines: Iterable[str], stream: BinaryIO,
                flush_lines: int = DEFAULT_CHUNK_LINES) -> int:
    """Write each string as one UTF-8 line ending in ``"\\n"``; return the number written.

    The stream is flushed every ``flush_lines`` lines and at the end, so a reader downstream of
    stdout sees translations chunk by chunk.
    """
    count = 0
    for line in lines:
        stream.write(one_line(line).encode("utf-8", errors="replace") + b"\n")
        count += 1
        if count % flush_lines == 0:
            stream.flush()
    stream.flush()
    return count


def write_attention_jsonl(handle: Any, index: int, translation: Any) -> None:
    """One JSON line for ``--attention``: ``index``, ``src`` and ``hyp`` pieces (each ending in
    ``"</s>"`` where the sentence has an EOS step) and ``attention``, one row per ``hyp`` label
    and one column per ``src`` label."""
    attn = translation.attention[0]
    row = {"index": index, "src": translation.src_pieces, "hyp": translation.hyp_pieces[0],
           "attention": [] if attn is None else attn.tolist()}
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# ``seq2seq translate``
# --------------------------------------------------------------------------------------------


def translate_file(translator: Any, settings: Any, args: Any) -> int:
    """Stream ``args.input`` (or stdin) through ``translator`` to ``args.output`` (or stdout).

    Output modes, each line-exact with respect to the input:

    * default: one translation per input line;
    * ``--scores``: ``score\\ttranslation`` per input line;
    * ``--nbest K``: ``K`` rows ``index\\tscore\\thypothesis`` per input line (index from 0);
      a blank input line gives the one row ``index\\t0.0000\\t``.

    ``--attention FILE`` also writes one JSON line per non-blank input line. Reading from a
    terminal translates line by line (``chunk_lines=1``) so answers appear as lines are typed.

    Args:
        translator: has ``translate_full(sentences, settings, return_attention)`` returning one
            object with ``hypotheses`` and ``scores`` lists per sentence (seq2seq.translate).
        settings: the decoding settings passed to ``translate_full``.
        args: the parsed ``translate`` arguments (input, output, nbest, scores, attention).

    Returns:
        The exit code, 0.
    """
    source = args.input or "-"
    interactive = source == "-" and sys.stdin is not None and sys.stdin.isatty()
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(open_input(source))
        out = stack.enter_context(open_output(args.output))
        attention = None
        if args.attention:
            attention = io.TextIOWrapper(stack.enter_context(open_output(args.attention)),
                                         encoding="utf-8", newline="\n")
            # Flushed and let go of: collected, the wrapper would close the stream under it,
            # stdout's own with --attention -.
            stack.callback(attention.detach)

        def translate_batch(sentences: list[str]) -> list[Any]:
            return translator.translate_full(sentences, settings, attention is not None)

        lines = read_lines(stream, name=args.input or "<stdin>")
        results = translate_stream(lines, translate_batch, empty=None,
                                   chunk_lines=1 if interactive else DEFAULT_CHUNK_LINES)

        def rows() -> Iterator[str]:
            for index, result in enumerate(results):
                if attention is not None and result is not None:
                    write_attention_jsonl(attention, index, result)
                if args.nbest:
                    pairs = zip(result.scores, result.hypotheses) if result else [(0.0, "")]
                    yield from (format_nbest(index, score, hyp) for score, hyp in pairs)
                elif args.scores:
                    score, hyp = (result.scores[0], result.hypotheses[0]) if result else (0.0, "")
                    yield f"{score:.4f}\t{hyp.replace(chr(9), ' ')}"
                else:
                    yield result.hypotheses[0] if result else ""

        write_lines(rows(), out, flush_lines=1 if interactive else DEFAULT_CHUNK_LINES)
    return 0
