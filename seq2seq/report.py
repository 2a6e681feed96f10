"""Evaluation reports: JSON, Markdown, hypotheses and PNG plots.

A report directory holds:

* ``report.json`` — per test set: name, n_sentences, bleu / chrf / ter (score, signature,
  95% CI), BLEU by source length, decoding settings, checkpoint path(s), comparison p-values;
* ``report.md`` — the same as tables;
* ``<name>.hyp.txt`` — the detokenized hypotheses of each test set, one line per source line
  (always this name, also when there is a single test set);
* ``bleu_by_length_<name>.png`` and ``attention_<name>_<i>.png`` — only when matplotlib is
  installed (the ``plots`` extra); otherwise one warning on stderr.

Every file is written to a temporary file and renamed, so a report is never half-written.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sacrebleu

from seq2seq.files import Output, output_set
from seq2seq.locks import directory_held
from seq2seq.scoring import METRIC_NAMES, EvaluationError
from seq2seq.translate_io import write_lines

# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def file_stem(name: str) -> str:
    """``name`` made safe for a file name (``[A-Za-z0-9._-]`` kept, others become ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return stem or "test"


def report_files(report_dir: Path, names: Sequence[str], attention_plots: int) -> list[Path]:
    """Every file :func:`write_report` may write for test sets ``names``, with at most
    ``attention_plots`` attention plots each."""
    files = [report_dir / "report.json", report_dir / "report.md"]
    for stem in map(file_stem, names):
        files += [report_dir / f"{stem}.hyp.txt", report_dir / f"bleu_by_length_{stem}.png"]
        files += [report_dir / f"attention_{stem}_{i}.png" for i in range(1, attention_plots + 1)]
    return files


def write_report(report_dir: str | Path, results: Sequence[dict[str, Any]],
                 plots: bool = True, inputs: Sequence[str | Path | None] = ()) -> list[Path]:
    """Write report.json, report.md, ``<name>.hyp.txt`` and the plots; return the paths.

    Args:
        report_dir: created if missing.
        results: one dict per test set as built by :func:`seq2seq.scoring.build_result`.
            Needed keys: name, n_sentences, bleu, chrf, ter, hypotheses; the others are
            optional.
        plots: draw the PNG plots (skipped with a warning if matplotlib is missing).
        inputs: files this evaluation read (``--compare``, ``--src``, ...): never removed as
            files of the earlier report.
    """
    report_dir = Path(report_dir)
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EvaluationError(f"{report_dir}: cannot create report directory "
                              f"({error.strerror or error})") from None
    stems = [file_stem(r["name"]) for r in results]
    if len(set(stems)) != len(stems):
        raise EvaluationError(f"test set names collide as file names: {stems}")
    written: list[Path] = []
    entries = []
    # One set: an error or a signal leaves every file of an earlier report as it was, never
    # new hypotheses beside the old report.json; and two evaluations into one directory each
    # leave their whole report.
    with directory_held(report_dir):
        earlier = _files_of_report(report_dir)
        with output_set() as output:
            for result, stem in zip(results, stems):
                hyp_path = report_dir / f"{stem}.hyp.txt"
                write_lines(result["hypotheses"], output(hyp_path))
                written.append(hyp_path)
                entry = {k: v for k, v in result.items() if k not in ("hypotheses", "attention")}
                entry["hypotheses_file"] = hyp_path.name
                entry["plots"] = ([p.name for p in _draw_plots(output, report_dir, stem, result)]
                                  if plots else [])
                written += [report_dir / p for p in entry["plots"]]
                entries.append(entry)
            report = {"sacrebleu_version": sacrebleu.__version__, "test_sets": entries}
            text = json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"
            for name, content in (("report.json", text), ("report.md", format_markdown(entries))):
                output(report_dir / name).write(content.encode("utf-8"))
                written.append(report_dir / name)
        _remove_old_plots(report_dir, stems, written)
        read = {os.path.realpath(path) for path in inputs if path}
        for name in earlier - {path.name for path in written}:  # test sets it no longer has
            old = report_dir / name
            if not old.is_dir() and os.path.realpath(old) not in read:
                old.unlink(missing_ok=True)
    return written


def _files_of_report(report_dir: Path) -> set[str]:
    """The hypotheses and plots that the report.json in ``report_dir`` lists (none if it
    has none or cannot be read): files this module wrote, so they may be replaced."""
    try:
        report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
        entries = report["test_sets"]
        names = {e["hypotheses_file"] for e in entries} | {p for e in entries for p in e["plots"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    # Only names of this module's pattern, in the directory itself.
    return {n for n in names if isinstance(n, str) and n == Path(n).name
            and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.(hyp\.txt|png)", n)}


def _remove_old_plots(report_dir: Path, stems: Sequence[str], written: Sequence[Path]) -> None:
    """Remove the plots of these test sets that an earlier report drew and this one did not
    (fewer attention plots, or none), so that every plot beside report.json is its own."""
    kept = {path.name for path in written}
    for stem in stems:
        pattern = re.compile(rf"(attention_{re.escape(stem)}_\d+|bleu_by_length_{re.escape(stem)})"
                             r"\.png")
        for path in report_dir.iterdir():
            if pattern.fullmatch(path.name) and path.name not in kept and not path.is_dir():
                path.unlink(missing_ok=True)


def _ci_text(entry: dict[str, Any]) -> str:
    ci = entry.get("ci")
    return f"±{ci['half_width']:.2f}" if ci else "-"


def format_summary(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the scores of each test set, then the distinct signatures."""
    width = max([len("test set")] + [len(r["name"]) for r in results])
    header = (f"{'test set':<{width}}  {'sents':>6}  {'BLEU':>6} {'95% CI':>7}  "
              f"{'chrF':>6} {'95% CI':>7}  {'TER':>6} {'95% CI':>7}")
    lines = [header]
    for r in results:
        cells = "  ".join(f"{r[k]['score']:>6.2f} {_ci_text(r[k]):>7}" for k in METRIC_NAMES)
        lines.append(f"{r['name']:<{width}}  {r['n_sentences']:>6}  {cells}")
    for key, label in METRIC_NAMES.items():
        for signature in dict.fromkeys(r[key]["signature"] for r in results):
            lines.append(f"{label} signature: {signature}")
    for r in results:
        compare = r.get("compare")
        if compare:
            p_values = ", ".join(f"{METRIC_NAMES[k]} p={compare[k]['p_value']:.4f}"
                                 for k in METRIC_NAMES)
            lines.append(f"{r['name']} vs {compare['name']}: {p_values}")
    return "\n".join(lines)


def format_markdown(entries: Sequence[dict[str, Any]]) -> str:
    """report.md: a summary table, then per test set its settings, comparison and buckets."""
    lines = ["# Evaluation report", "",
             ("Scores by sacreBLEU on detokenized output against the raw references; the 95% "
              "confidence interval is ± half the bootstrap percentile range. TER: lower is "
              "better."), "",
             "| test set | sentences | BLEU | chrF | TER |", "|---|---:|---:|---:|---:|"]
    for e in entries:
        cells = " | ".join(f"{e[k]['score']:.2f} {_ci_text(e[k])}" for k in METRIC_NAMES)
        name = e["name"].replace("|", "\\|")  # (a bare | would start another cell)
        lines.append(f"| {name} | {e['n_sentences']} | {cells} |")
    for e in entries:
        lines += ["", f"## {e['name']}", ""]
        if e.get("checkpoints"):
            lines.append("- checkpoint(s): " + ", ".join(f"`{c}`" for c in e["checkpoints"]))
        if e.get("decoding"):
            lines.append("- decoding: " + ", ".join(f"{k}={v}" for k, v in e["decoding"].items()))
        lines.append(f"- hypotheses: `{e.get('hypotheses_file', '')}`")
        details = e["bleu"].get("details")
        if details:
            lines.append(f"- BLEU n-gram precisions: "
                         f"{'/'.join(f'{p:.1f}' for p in details['precisions'])} "
                         f"(BP = {details['bp']:.3f}, ratio = {details['ratio']:.3f}, "
                         f"hyp_len = {details['hyp_len']}, ref_len = {details['ref_len']})")
        for key, label in METRIC_NAMES.items():
            lines.append(f"- {label} signature: `{e[key]['signature']}`")
        compare = e.get("compare")
        if compare:
            lines += ["", (f"### Paired bootstrap test against {compare['name']} "
                           f"({compare['n_bootstrap']} resamples)"), "",
                      "| metric | this system | other | p-value |", "|---|---:|---:|---:|"]
            for key, label in METRIC_NAMES.items():
                c = compare[key]
                lines.append(f"| {label} | {c['a']:.2f} | {c['b']:.2f} | {c['p_value']:.4f} |")
        if e.get("bleu_by_length"):
            lines += ["", "### BLEU by source length (words)", "",
                      "| source length | sentences | BLEU |", "|---|---:|---:|"]
            for label, n, bleu in e["bleu_by_length"]:
                lines.append(f"| {label} | {n} | {'-' if bleu is None else f'{bleu:.2f}'} |")
        for plot in e.get("plots", []):
            lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots (matplotlib is optional: the ``plots`` extra)
# --------------------------------------------------------------------------------------------

_warned_no_matplotlib = False


def _draw_plots(output: Output, report_dir: Path, stem: str, result: dict[str, Any]
                ) -> list[Path]:
    """Draw the BLEU-by-length bars and the attention heatmaps of one test set."""
    global _warned_no_matplotlib
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, no display
    except ImportError:
        if not _warned_no_matplotlib:
            print("warning: matplotlib is not installed; plots skipped "
                  "(pip install 'seq2seq[plots]')", file=sys.stderr)
            _warned_no_matplotlib = True
        return []
    with warnings.catch_warnings():
        # Tokens in scripts the default font lacks draw as boxes; one warning each is noise.
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*missing")
        warnings.filterwarnings("ignore", message=".*tight_layout.*")
        return _draw_plots_with(Figure, output, report_dir, stem, result)


def _draw_plots_with(Figure: Any, output: Output, report_dir: Path, stem: str,
                     result: dict[str, Any]) -> list[Path]:
    paths = []
    if result.get("bleu_by_length"):
        fig = Figure(figsize=(6, 3.5))
        _draw_bleu_by_length(fig, result["name"], result["bleu_by_length"])
        paths.append(_save_png(output, fig, report_dir / f"bleu_by_length_{stem}.png"))
    for i, (src_tokens, hyp_tokens, matrix) in enumerate(result.get("attention", []), start=1):
        rows = [[float(x) for x in row] for row in matrix]
        if len(rows) != len(hyp_tokens) or any(len(row) != len(src_tokens) for row in rows):
            raise ValueError(f"attention matrix {i} of {result['name']} is not (T, S) = "
                             f"({len(hyp_tokens)}, {len(src_tokens)})")
        fig = Figure(figsize=(min(max(2.5 + 0.3 * len(src_tokens), 4), 30),
                              min(max(2 + 0.3 * len(hyp_tokens), 3), 30)))
        _draw_attention(fig, src_tokens, hyp_tokens, rows)
        paths.append(_save_png(output, fig, report_dir / f"attention_{stem}_{i}.png"))
    return paths


def _draw_bleu_by_length(fig: Any, name: str, rows: Sequence[tuple[str, int, Any]]) -> None:
    ax = fig.add_subplot()
    labels = [label for label, _, _ in rows]
    values = [0.0 if bleu is None else bleu for _, _, bleu in rows]
    bars = ax.bar(range(len(rows)), values, color="tab:blue")
    for bar, (_, n, _) in zip(bars, rows):
        ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("source length (words)")
    ax.set_ylabel("BLEU")
    ax.set_title(f"BLEU by source length: {name}")
    fig.tight_layout()


def _draw_attention(fig: Any, src_tokens: Sequence[str], hyp_tokens: Sequence[str],
                    rows: list[list[float]]) -> None:
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(src_tokens)), list(src_tokens), rotation=90, fontsize=7)
    ax.set_yticks(range(len(hyp_tokens)), list(hyp_tokens), fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("hypothesis")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()


def _save_png(output: Output, fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    output(path).write(buffer.getvalue())
    return path
