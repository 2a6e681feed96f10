"""The command line's argument parsing: argparse with the project's errors, and the flags and
value types that several commands (and the scripts) share."""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections.abc import Iterable
from typing import Any

from seq2seq.errors import one_line
from seq2seq.stdout import drop_unwritten

EXIT_USAGE = 2
_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)*=")  # a dotted recipe override, KEY=VALUE


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in the project's form: one ``error:`` line, exit code 2, and
    an option that takes one value refused when given twice (argparse keeps the last one:
    ``--input a --input b`` read ``b`` without a word).

    Two more of argparse's answers are mended: an unknown option was reported only after any
    argument missing (``seq2seq --bogus`` said that a command is required, ``seq2seq --bogus
    translate`` that --checkpoint is), and ``--help`` or
    ``--version`` into a full disk exited 0 with nothing written (argparse ignores a failed
    write)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._arguments = list(sys.argv[1:] if args is None else args)
        commands = {name for action in self._actions
                    if isinstance(action, argparse._SubParsersAction) for name in action.choices}
        if commands:  # the options before the command are this parser's, else unknown
            ahead = itertools.takewhile(lambda argument: argument not in commands,
                                        self._arguments)
            if unknown := self._unknown_options(ahead):
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
        parsed, extras = super().parse_known_args(args, namespace)
        if hasattr(parsed, _StoreOnce.GIVEN):
            delattr(parsed, _StoreOnce.GIVEN)
        if not commands and extras:  # a command's parser: its own words, said by its name
            if isinstance(getattr(parsed, "overrides", None), list):
                # argparse takes positionals in one run: `evaluate R --beam 3 eval.x=1` left
                # the override after the option unknown
                parsed.overrides += [e for e in extras if _OVERRIDE.match(e)]
                extras = [e for e in extras if not _OVERRIDE.match(e)]
            if extras:
                self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> None:  # type: ignore[override]
        if "arguments are required" in message:  # said by argparse before what it does not know
            if unknown := self._unknown_options(getattr(self, "_arguments", [])):
                message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(EXIT_USAGE, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")

    def _unknown_options(self, arguments: Iterable[str]) -> list[str]:
        """The options among ``arguments`` that this parser has no name for, nor a name that
        they begin (argparse takes ``--check`` for ``--checkpoint``); a negative number is a
        value."""
        known = self._option_string_actions
        unknown = []
        for argument in arguments:
            if argument == "--":
                break
            name = argument.split("=", 1)[0]
            if (name.startswith("-") and name != "-" and not _number(name)
                    and not any(option.startswith(name) for option in known)):
                unknown.append(argument)
        return unknown

    def _print_message(self, message: str, file: Any = None) -> None:
        """Help, usage and version text written and flushed; a failure to write stdout is said,
        with exit 1 (argparse ignores it). Where stderr fails there is no one to tell, and the
        exit status stays the caller's, as argparse has it."""
        if not message:
            return
        file = file or sys.stderr
        try:
            file.write(message)
            file.flush()
        except OSError as error:
            drop_unwritten(file)
            if file is not sys.stdout:
                return
            if isinstance(error, BrokenPipeError):  # `seq2seq --help | head -1`
                raise SystemExit(0) from None
            sys.stderr.write(f"error: <stdout>: {error.strerror or error}\n")
            raise SystemExit(1) from None


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _StoreOnce(argparse._StoreAction):
    """``store``, refusing a second value for the same option."""

    GIVEN = "_options_given"  # on the namespace while it is parsed

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        given = getattr(namespace, self.GIVEN, set())
        if option_string is not None and self.dest in given:
            parser.error(f"argument {'/'.join(self.option_strings)}: given more than once")
        setattr(namespace, self.GIVEN, given | {self.dest})
        super().__call__(parser, namespace, values, option_string)


def path(text: str) -> str:
    """An argparse type for a file or directory: any text but the empty one, which one call
    takes for the current directory and another for stdin (``--input ""`` read stdin)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


def at_least(low: int) -> Any:
    """An argparse type: a whole number of at least ``low`` (the scripts' counts)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def bounded(key: str) -> Any:
    """An argparse type for a search flag: a number in the range of ``decode.<key>``, finite.

    The same :class:`~seq2seq.config.ranges.Range` checks the recipe, so ``translate`` and
    ``evaluate`` (which share these flags) and the recipe accept the same values.
    """
    from seq2seq.config import DECODE_RANGES

    bounds = DECODE_RANGES[key]

    def parse(text: str) -> int | float:
        try:
            value = int(text) if bounds.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {bounds.expected()}, got {text!r}") from None
        problem = bounds.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def decode_flags(parser: argparse.ArgumentParser) -> None:
    """Search flags, each overriding the recipe's decode section when given, and
    :func:`precision_flag`."""
    parser.add_argument("--beam", type=bounded("beam_size"),
                        help="beam size (1 with --alpha 0: greedy search)")
    parser.add_argument("--alpha", type=bounded("alpha"), help="GNMT length penalty alpha")
    parser.add_argument("--max-len-ratio", type=bounded("max_len_ratio"),
                        help="max output length / source length")
    parser.add_argument("--batch-tokens", type=bounded("batch_tokens"),
                        help="source tokens per decoding batch")
    parser.add_argument("--shortlist", type=bounded("shortlist"), metavar="N",
                        help="beam search scores only the best N target tokens the "
                        "checkpoint's lexicon aligns to each source token, plus the most "
                        "frequent (decode.shortlist_frequent); 0: all")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 Linear layers and decoder RNN, activations scaled per row so "
                        "that a sentence's output never depends on its batch (CPU decoding: "
                        "faster, slightly lower BLEU)")
    precision_flag(parser)


def precision_flag(parser: argparse.ArgumentParser) -> None:
    """--precision of translate and evaluate (weights cast once, beside --quantize)."""
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="weights to decode with, cast once: bf16 is faster on a GPU or a "
                        "CPU with native bf16 and may change a few outputs, also with the "
                        "batch a sentence is decoded in (its products round differently at "
                        "other batch sizes); auto: bf16 there, else fp32")
