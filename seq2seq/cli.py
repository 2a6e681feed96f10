"""The ``seq2seq`` command: parse arguments, load the recipe, call one function per subcommand.

User mistakes (a bad recipe, a missing file, bad input) end with one line per problem on stderr and
exit code 2, never a traceback. Heavy modules are imported inside the subcommands so that
``seq2seq check`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from seq2seq import __version__
from seq2seq.arguments import (
    EXIT_USAGE,
    ArgumentParser,
    bounded,
    decode_flags,
    path,
)
from seq2seq.config import Recipe, RecipeError, load_recipe, recipe_to_yaml
from seq2seq.config.memory import memory_problems, out_of_memory
from seq2seq.errors import Seq2SeqError, one_line, warn
from seq2seq.heap import keep_freed_memory
from seq2seq.serve.options import add_serve_arguments
from seq2seq.signals import STOP_SIGNALS
from seq2seq.stdout import NAME as STDOUT
from seq2seq.stdout import drop_unwritten, named_stdout


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=path, help="YAML recipe file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],  # optional
                        help="dotted overrides, e.g. train.lr=3e-4 model.cell=lstm")


def cmd_check(args: argparse.Namespace) -> int:
    """Every check ``prepare`` and ``train`` make before their work, all problems at once;
    nothing is written."""
    recipe = load_recipe(args.recipe, args.overrides)
    from seq2seq.config.checks import recipe_warnings
    from seq2seq.data.preflight import input_problems
    from seq2seq.training.run_dir import train_problems

    for message in recipe_warnings(recipe):  # (valid values the run would not honour)
        warn(f"{args.recipe}: {message}")
    problems = (memory_problems(recipe) + machine_problems(recipe)
                + input_problems(recipe, read_eval_sets=True))
    if not problems:  # (the run directory's checkpoints name corpora that must be there)
        problems = train_problems(recipe)
    if problems:
        raise RecipeError([f"{args.recipe}: {problem}" for problem in problems])
    print(recipe_to_yaml(recipe), end="")
    return 0


def machine_problems(recipe: Recipe) -> list[str]:
    """What this machine lacks for the recipe's process group."""
    if recipe.distributed.backend != "nccl":
        return []  # (nothing to ask torch, which takes a while to import)
    from seq2seq.distributed import backend_problem

    problem = backend_problem(recipe.distributed.backend, recipe.train.device)
    return [problem] if problem else []


def _load_sized(args: argparse.Namespace) -> Recipe:
    """The recipe, refused when its model or batches would not fit this machine's memory."""
    recipe = load_recipe(args.recipe, args.overrides)
    problems = memory_problems(recipe) + machine_problems(recipe)
    if problems:
        raise RecipeError([f"{args.recipe}: {problem}" for problem in problems])
    return recipe


def cmd_prepare(args: argparse.Namespace) -> int:
    recipe = _load_sized(args)  # before the heavy imports: fails fast
    from seq2seq.data.stats import format_stats
    from seq2seq.training.commands import prepare_command

    print(format_stats(prepare_command(recipe).stats))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _load_sized(args)  # before the heavy imports: fails fast
    from seq2seq.training.commands import train_command

    return train_command(recipe, recipe_path=Path(args.recipe), overrides=args.overrides)


def cmd_translate(args: argparse.Namespace) -> int:
    from seq2seq.translate import translate_command

    return translate_command(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from seq2seq.evaluate import evaluate_command

    if args.recipe is None and not args.checkpoint:
        raise Seq2SeqError("evaluate needs a RECIPE or --checkpoint CKPT --src FILE --ref FILE")
    if args.recipe is None and (not args.src or not args.ref):
        raise Seq2SeqError("evaluate --checkpoint needs --src FILE and at least one --ref FILE")
    if bool(args.src) != bool(args.ref):  # with a recipe, which would score its test sets
        raise Seq2SeqError("evaluate --src FILE needs at least one --ref FILE" if args.src else
                           "evaluate --ref FILE needs --src FILE (the sentences it translates)")
    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    return evaluate_command(args, recipe)


def cmd_average(args: argparse.Namespace) -> int:
    from seq2seq.checkpoint import average_checkpoints, check_checkpoint_output
    from seq2seq.paths import check_distinct
    from seq2seq.training.run_dir import run_changes

    check_checkpoint_output(args.output)  # before loading every checkpoint
    check_distinct([args.output], args.checkpoints)
    average_checkpoints([Path(p) for p in args.checkpoints], Path(args.output), run_changes)
    count = len(args.checkpoints)
    print(f"wrote {args.output} (average of {count} checkpoint{'s' if count > 1 else ''})")
    return 0


def cmd_generate_data(args: argparse.Namespace) -> int:
    from seq2seq.data.preflight import MAX_GENERATED_EVAL, directory_problem
    from seq2seq.data.synthetic import write_synthetic

    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    for split, size in sizes.items():  # as a recipe's generated corpus (data.*.size)
        most = 10_000_000 if split == "train" else MAX_GENERATED_EVAL
        if not 0 <= size <= most:
            raise Seq2SeqError(f"--{split} must be in [0, {most}], got {size}")
    if args.output in ("", "-"):  # "" would be the current directory; "-" is no directory
        raise Seq2SeqError(f"generate-data {args.output!r}: name a directory to write into")
    if problem := directory_problem(Path(args.output)):
        raise Seq2SeqError(f"{args.output}: {problem}")
    try:
        written = write_synthetic(Path(args.output), sizes)
    except OSError as error:
        raise Seq2SeqError(f"{args.output}: cannot write the data there "
                           f"({error.strerror or error})") from None
    for name in written:
        print(name)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from seq2seq.serve.server import serve_command  # FastAPI loads for this command only

    return serve_command(args)



def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="seq2seq", description="Recurrent neural machine translation driven by YAML recipes.")
    parser.add_argument("--version", action="version", version=f"seq2seq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=ArgumentParser)

    p = sub.add_parser("check", help="validate a recipe, its corpora and output directory "
                       "(all that prepare and train check first; nothing is written) and "
                       "print it resolved, as YAML")
    _recipe_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("prepare", help="train the tokenizer, build the encoded corpus cache")
    _recipe_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (or resume) a model")
    _recipe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("translate", help="translate lines from stdin or a file")
    p.add_argument("--checkpoint", action="extend", nargs="+", required=True, type=path,
                   metavar="CKPT", help="checkpoint file; give several for an ensemble "
                   "(--checkpoint a.pt b.pt, or --checkpoint repeated) of one tokenizer and "
                   "language pair")
    p.add_argument("--input", type=path, help="input file (default: stdin)")
    p.add_argument("--output", type=path, help="output file (default: stdout)")
    p.add_argument("--nbest", type=bounded("n_best"),
                   help="write K hypotheses per line as TSV: index, score, text")
    p.add_argument("--scores", action="store_true",
                   help="prefix each line with its score and a tab")
    p.add_argument("--attention", type=path, help="write attention matrices here (JSON lines)")
    decode_flags(p)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("evaluate", help="translate test sets and write BLEU/chrF/TER reports")
    p.add_argument("recipe", nargs="?", type=path,
                   help="recipe of a trained run (evaluates every test set)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    p.add_argument("--checkpoint", action="extend", nargs="+", metavar="CKPT", type=path,
                   help="checkpoint file; several (--checkpoint a.pt b.pt, or --checkpoint "
                   "repeated) are an ensemble; default: the run's eval.checkpoint (best.pt)")
    p.add_argument("--src", type=path, help="source file to translate and score")
    p.add_argument("--ref", action="append", type=path, help="reference file (repeat for several)")
    p.add_argument("--compare", type=path,
                   help="another system's output on the same source: paired test")
    p.add_argument("--report-dir", type=path,
                   help="where to write the report (default: the recipe's eval.report_dir, "
                   "else <output_dir>/eval; with --src FILE: eval-<FILE name> beside the "
                   "checkpoint; --quantize adds -int8, --precision bf16 -bf16 to either "
                   "default)")
    decode_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("average", help="average the weights of several checkpoints")
    p.add_argument("checkpoints", nargs="+", type=path, help="checkpoint files of one run")
    p.add_argument("--output", required=True, type=path, help="the averaged checkpoint file")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("serve", help="serve checkpoints over HTTP: LibreTranslate's API, "
                       "dynamic batching, a page to try them")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", type=path,
                   help="checkpoint file, one per language pair (its recipe's "
                   "data.src_lang -> data.trg_lang)")
    add_serve_arguments(p)
    decode_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate-data",
                       help="write the built-in synthetic en->de task as text files")
    p.add_argument("output", help="directory to write train/valid/test .en/.de files into")
    p.add_argument("--train", type=int, default=24000,
                   help="training pairs (0: no train files written, any there left alone)")
    p.add_argument("--valid", type=int, default=500, help="validation pairs (likewise)")
    p.add_argument("--test", type=int, default=500, help="test pairs (likewise)")
    p.set_defaults(func=cmd_generate_data)
    return parser


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, so that ``finally`` blocks remove
    temporary files. Like ``KeyboardInterrupt``, not an ``Exception``: code that handles
    failures (a damaged checkpoint skipped, a library's optional import) must not take it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _hold_closed_outputs() -> None:
    """Point a closed stdout or stderr (``2>&-``) at /dev/null. Else the next file opened takes
    its number, and what C code writes to it lands in that file; and Python's ``print`` to a
    closed stderr (None) writes to stdout: warnings and errors went into translations."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)  # noqa: SIM115


def main(argv: list[str] | None = None) -> int:
    _hold_closed_outputs()
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: keep the defaults
        for sig in STOP_SIGNALS:
            if sig == signal.SIGINT:
                # Python keeps a SIGINT that its launcher ignored (a background job of a
                # script): every command stops on SIGINT all the same, cleaning up, as `train`
                # always has.
                previous[sig] = signal.signal(sig, signal.default_int_handler)
            elif sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _terminate)  # (nohup's SIGHUP stays ignored)
    try:
        if os.environ.get("SEQ2SEQ_FP32_GEMM"):  # a bad value is said now, before any work
            from seq2seq.models.gemm import fp32_backend
            fp32_backend()
        if os.environ.get("SEQ2SEQ_NATIVE"):
            from seq2seq.native import wanted
            wanted()
        from seq2seq.cpuinfo import cap_torch_threads
        cap_torch_threads()
        with named_stdout():
            code = args.func(args)
            if sys.stdout is not None and not sys.stdout.closed:
                sys.stdout.flush()  # a failure to write the output is this command's
        return code
    except RecipeError as error:
        for problem in error.problems:
            print(f"error: {one_line(problem)}", file=sys.stderr)
        return EXIT_USAGE
    except Seq2SeqError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        print("terminated" if stop.signum == signal.SIGTERM else "hung up", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:
        # `seq2seq translate ... | head` closes the pipe early: not an error.
        sys.stderr.close()
        return 0
    except (RuntimeError, MemoryError) as error:
        line = out_of_memory(error, args.command)  # (imports nothing: memory may be short)
        if line is None and isinstance(error, RuntimeError):
            from seq2seq.distributed import peer_lost

            line = peer_lost(error)
        if line is None:
            raise
        print(f"error: {one_line(line)}", file=sys.stderr)
        return 1
    except OSError as error:  # the machine, not the user: a full disk, a vanished directory
        where = f"{error.filename}: " if error.filename else ""
        if error.filename == STDOUT:
            drop_unwritten(sys.stdout)
        print(f"error: {one_line(where)}{error.strerror or error}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to restore
                signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
