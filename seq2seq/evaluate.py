"""``seq2seq evaluate``: translate each test set, score it, print the summary, write the report.

The scores come from :mod:`seq2seq.scoring` and the report files are written by
:mod:`seq2seq.report`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from seq2seq.data.preflight import directory_problem
from seq2seq.errors import warn
from seq2seq.paths import check_distinct, check_output, first_repeat
from seq2seq.report import format_summary, report_files, write_report
from seq2seq.scoring import EvaluationError, build_result, check_bleu_tokenizer

# --------------------------------------------------------------------------------------------
# ``seq2seq evaluate``
# --------------------------------------------------------------------------------------------


def evaluate_command(args: Any, recipe: Any) -> int:
    """Translate each test set, score it, print the summary and write the report.

    With a recipe: every ``data.test`` corpus, with ``<output_dir>/<eval.checkpoint>.pt``
    unless ``--checkpoint`` is given. Without: ``--src`` scored against the ``--ref`` files.
    The report goes to ``--report-dir``, else to :func:`default_report_dir`.
    ``--compare FILE`` (another system's output, one line per source line) adds a paired
    bootstrap test; with a recipe it applies to every test set, so use it with one.

    Source lines are cut as ``seq2seq translate`` cuts its input (one warning); references and
    ``--compare`` lines, never decoded, are read whole: scores are against full references.
    """
    from seq2seq.checkpoint import check_language_pair
    from seq2seq.precision import resolve_precision
    from seq2seq.quantize import int8_kernel
    from seq2seq.translate import CLI_NAMES, Translator, command_settings, resolve_device

    if recipe is not None:
        checkpoints = args.checkpoint or [str(Path(recipe.output_dir) /
                                               f"{recipe.eval.checkpoint}.pt")]
    else:
        checkpoints = args.checkpoint
    # What --precision becomes on this device, known before the model loads.
    precision = "fp32" if args.quantize else resolve_precision(
        args.precision, resolve_device(args.device))[0]
    report_dir = Path(args.report_dir) if args.report_dir else default_report_dir(
        recipe, checkpoints, args.src, args.quantize, precision)
    # Before the model loads: a bad report directory must not cost a whole evaluation.
    if str(report_dir) == "-":  # (every output path takes - for stdout; a report is files)
        raise EvaluationError("--report-dir -: a report is several files; name a directory")
    problem = directory_problem(report_dir)
    if problem:
        raise EvaluationError(f"{report_dir}: cannot be the report directory: {problem}")
    names = [Path(args.src).name] if args.src else list(recipe.data.test) if recipe else []
    inputs = [*checkpoints, args.src, *(args.ref or []), args.compare,
              *(test_set_paths(recipe) if recipe and not args.src else [])]
    _check_outputs(report_files(report_dir, names, 0), inputs)
    test_sets = list(_test_sets(args, recipe))  # all read, and checked, before the model loads
    compare = _read_text_lines(args.compare) if args.compare else None
    if compare is not None and len(test_sets) > 1:  # one system's output of one test set
        raise EvaluationError(f"--compare {args.compare}: the recipe has {len(test_sets)} test "
                              "sets; compare on one with --src FILE --ref FILE")
    for name, srcs, _ in test_sets if compare is not None else []:
        if len(compare) != len(srcs):
            raise EvaluationError(f"{args.compare}: {len(compare)} lines but test set {name} "
                                  f"has {len(srcs)}")
    translator = Translator.from_checkpoint(checkpoints, device=args.device,
                                            quantize=args.quantize, precision=args.precision,
                                            names=CLI_NAMES)
    if recipe is not None:
        data = translator.recipe.data
        check_language_pair((data.src_lang, data.trg_lang),
                            (recipe.data.src_lang, recipe.data.trg_lang),
                            checkpoints[0], "the recipe's test sets")
    recipe = recipe or translator.recipe
    tokenize = check_bleu_tokenizer(recipe.eval.tokenize, recipe.data.trg_lang)
    # and with the attention plots, whose number the checkpoint's recipe may give
    _check_outputs(report_files(report_dir, names, recipe.eval.attention_plots), inputs)
    # The decode section of the recipe given here (with its overrides), else the checkpoint's.
    settings = command_settings(translator, args, nbest=1, base=recipe.decode)
    cfg = recipe.eval
    results = []
    for name, srcs, refs in test_sets:
        hyps, attention = _translate_all(translator, settings, srcs, cfg.attention_plots)
        results.append(build_result(
            name, srcs, hyps, refs, cfg.lowercase, tokenize, cfg.bootstrap, recipe.seed,
            decoding={**dataclasses.asdict(settings), "quantized": args.quantize,
                      **({"int8_kernel": int8_kernel()} if args.quantize else {}),
                      "precision": translator.precision},
            checkpoints=checkpoints,
            compare_hyps=compare, compare_name=args.compare, attention=attention))
    write_report(report_dir, results, inputs=inputs)
    print(format_summary(results))
    print(f"report: {report_dir / 'report.md'}")
    return 0


def _check_outputs(outputs: list[Path], inputs: list) -> None:
    """Refuse report files that cannot be written, or that are inputs of this evaluation."""
    for path in outputs:  # (each checked for a read-only file, a directory, a long name)
        check_output(path, missing_dir_ok=True)
    check_distinct(outputs, inputs)


def test_set_paths(recipe: Any) -> list[Path]:
    """The files the recipe's test sets read (none for hub datasets and the generated task)."""
    from seq2seq.data.corpus import corpus_files

    return [path for corpus in recipe.data.test.values()
            for path in corpus_files(corpus, recipe.data)]


def default_report_dir(recipe: Any, checkpoints: Sequence[str], src: str | None,
                       quantized: bool, precision: str = "fp32") -> Path:
    """Where ``seq2seq evaluate`` writes without ``--report-dir``; no two kinds of evaluation
    share a directory, so none overwrites another's report.

    * a recipe's test sets: ``eval.report_dir``, else ``<output_dir>/eval``;
    * ``--src FILE``: ``<directory of the (first) checkpoint>/eval-<FILE's name>`` (``.gz``
      dropped);
    * ``--quantize`` appends ``-int8`` to either, and bf16 weights (``--precision``)
      ``-bf16``, beside the full-precision report.
    """
    if src:
        name = "stdin" if src == "-" else Path(src).name.removesuffix(".gz")
        report_dir = Path(checkpoints[0]).parent / f"eval-{name}"
    else:
        report_dir = Path(recipe.eval.report_dir or Path(recipe.output_dir) / "eval")
    if quantized or precision == "bf16":
        return report_dir.with_name(f"{report_dir.name}-{'int8' if quantized else 'bf16'}")
    return report_dir


def _read_text_lines(path: str, cut: bool = False) -> list[str]:
    """All lines of a text file, line-exact (see seq2seq.translate_io); with ``cut``, lines
    past ``DEFAULT_MAX_CHARS`` characters are cut as ``seq2seq translate`` cuts them."""
    from seq2seq.translate_io import DEFAULT_MAX_CHARS, open_input, read_lines

    # Uncut, a line is still read whole: a reference is scored whole, never decoded.
    max_chars = DEFAULT_MAX_CHARS if cut else 10**9
    with open_input(path) as stream:
        return list(read_lines(stream, max_chars=max_chars,
                               name="<stdin>" if path == "-" else path))


def _cut_sources(srcs: list[str], name: str) -> list[str]:
    """``srcs`` of a recipe's test set cut, and said, as :func:`_read_text_lines` cuts a file:
    decoding a line of thousands of words takes minutes."""
    from seq2seq.translate_io import CUT_WARNING, DEFAULT_MAX_CHARS

    long = [number for number, src in enumerate(srcs, start=1) if len(src) > DEFAULT_MAX_CHARS]
    if not long:
        return srcs
    warn(CUT_WARNING.format(name=name, count=len(long), max_chars=DEFAULT_MAX_CHARS,
                            first=long[0]))
    return [src[:DEFAULT_MAX_CHARS] for src in srcs]


def _test_sets(args: Any, recipe: Any) -> Iterator[tuple[str, list[str], list[list[str]]]]:
    """``(name, sources, reference streams)`` of each test set to evaluate."""
    if args.src:
        srcs = _read_text_lines(args.src, cut=True)
        if not srcs:
            raise EvaluationError(f"{args.src}: empty; no sentence to evaluate")
        for path in args.ref:
            if first_repeat([args.src, path]):
                warn(f"{path}: is the --src file itself: the scores compare the sources with "
                     "themselves")
        refs = [_read_text_lines(path) for path in args.ref]
        for path, stream in zip(args.ref, refs):
            if len(stream) != len(srcs):
                raise EvaluationError(f"{path}: {len(stream)} lines but {args.src} has "
                                      f"{len(srcs)}")
        yield Path(args.src).name, srcs, refs
        return
    from seq2seq.data.corpus import corpus_files, read_pairs

    if not recipe.data.test:
        raise EvaluationError("the recipe has no data.test corpora; give --src and --ref")
    for name, corpus in recipe.data.test.items():
        pairs = list(read_pairs(corpus, recipe.data))
        if not pairs:
            raise EvaluationError(f"data.test.{name}: empty; no sentence to evaluate")
        # A pair is a line of the file that holds the sources (text, tsv, jsonl).
        files = corpus_files(corpus, recipe.data)
        srcs = _cut_sources([src for src, _ in pairs],
                            str(files[0]) if files else f"data.test.{name}")
        yield name, srcs, [[trg for _, trg in pairs]]


def _translate_all(translator: Any, settings: Any, srcs: list[str],
                   n_attention: int) -> tuple[list[str], list[tuple[list[str], list[str], Any]]]:
    """1-best translations (blank sources give "") and the attention of the first few.

    The attention comes from decoding those few sentences again (a sentence gets the same
    hypothesis alone as in any batch), so the whole set is decoded without keeping attention
    and can use the fastest search.
    """
    from seq2seq.translate_io import translate_stream

    def translate_batch(sentences: list[str]) -> list[Any]:
        return translator.translate_full(sentences, settings)

    results = list(translate_stream(srcs, translate_batch, empty=None))
    hyps = [r.hypotheses[0] if r is not None else "" for r in results]
    firsts = [line.strip() for line in srcs if line.strip()][:n_attention]
    attention = []
    for r in translator.translate_full(firsts, settings, True) if firsts else []:
        if r.attention[0] is None:
            continue
        # Rows: target pieces (EOS included unless the hypothesis was cut at the maximum
        # length); columns: source pieces (EOS included), no padding. The pieces label both.
        matrix = r.attention[0].detach().float().cpu()[:, :len(r.src_pieces)]
        hyp_tokens = list(r.hyp_pieces[0])
        if tuple(matrix.shape) == (len(hyp_tokens), len(r.src_pieces)):
            attention.append((list(r.src_pieces), hyp_tokens, matrix.tolist()))
    return hyps, attention
