"""Scores: sacreBLEU's BLEU, chrF and TER on detokenized text, nothing else.

Metrics live only here and always compare detokenized hypotheses with the raw reference lines,
so every number is reproducible with the ``sacrebleu`` command line from the signature stored
beside it. Confidence intervals and paired significance tests are sacreBLEU's own bootstrap
resampling over sentences (Koehn 2004): a score is recomputed from the summed per-sentence
statistics of each resample, so 1000 resamples take well under a second.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric
from sacrebleu.significance import PairedTest, _bootstrap_resample, estimate_ci

from seq2seq.errors import Seq2SeqError, warn

METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF", "ter": "TER"}
DEFAULT_BUCKETS = (5, 10, 15, 20, 30, 40)
# ``eval.tokenize: auto``: sacreBLEU's own choice for a target language (its command line's
# ``-l``): these scripts put no spaces between words, where 13a would see one word a sentence.
LANGUAGE_TOKENIZERS = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}
_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}


class EvaluationError(Seq2SeqError):
    """Hypotheses and references that cannot be scored, or a report that cannot be written."""


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def build_metrics(lowercase: bool, tokenize: str) -> dict[str, Metric]:
    """sacreBLEU metric objects keyed ``bleu``, ``chrf``, ``ter``.

    ``lowercase`` applies to BLEU and chrF; TER keeps sacreBLEU's default (case-insensitive,
    ``case:lc`` in its signature), so TER matches ``sacrebleu -m ter`` either way.
    """
    return {"bleu": _bleu(lowercase, tokenize), "chrf": CHRF(lowercase=lowercase), "ter": TER()}


def bleu_tokenizer(tokenize: str, trg_lang: str) -> str:
    """``eval.tokenize`` with ``auto`` resolved for the target language: zh, ja-mecab or
    ko-mecab for Chinese, Japanese and Korean (``zh``, ``ZH``, ``zh-CN``, ``ja_JP`` ...), else
    13a."""
    if tokenize != "auto":
        return tokenize
    primary = re.split(r"[-_]", trg_lang.strip().lower())[0]
    return LANGUAGE_TOKENIZERS.get(primary, "13a")


def check_bleu_tokenizer(tokenize: str, trg_lang: str) -> str:
    """The tokenizer :func:`bleu_tokenizer` resolves, checked before any work is done.

    Raises:
        EvaluationError: (one line) sacreBLEU cannot tokenize so: ja-mecab or ko-mecab
            without their extra dependencies, a flores model that cannot be downloaded.
    """
    name = bleu_tokenizer(tokenize, trg_lang)
    said = tokenize if name == tokenize else f"{tokenize} ({name} for data.trg_lang {trg_lang})"
    _bleu(False, name, said)
    return name


def _bleu(lowercase: bool, tokenize: str, said: str | None = None) -> BLEU:
    """sacreBLEU's BLEU; ``said``: how an error names ``eval.tokenize`` (default: as given)."""
    try:
        return BLEU(lowercase=lowercase, tokenize=tokenize)
    except Exception as error:  # noqa: BLE001 (sacreBLEU raises RuntimeError, URLError, ...)
        reason = next((line for line in str(error).splitlines() if line.strip()),
                      type(error).__name__).strip()
        hint = f" (pip install '{_EXTRAS[tokenize]}')" if tokenize in _EXTRAS else ""
        raise EvaluationError(f"eval.tokenize={said or tokenize}: sacreBLEU cannot tokenize: "
                              f"{reason}{hint}") from None


def corpus_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], lowercase: bool = False,
                tokenize: str = "13a") -> float:
    """Corpus BLEU alone, for validation during training; 0.0 when there are no sentences."""
    if len(hyps) == 0:
        return 0.0
    _check_inputs(hyps, refs, "corpus_bleu")
    score = _bleu(lowercase, tokenize).corpus_score(list(hyps), [list(s) for s in refs])
    return _round(score.score)


@contextlib.contextmanager
def _sacrebleu_seed(seed: int) -> Iterator[None]:
    """Seed sacreBLEU's bootstrap, which reads its seed from ``$SACREBLEU_SEED``.

    Setting it for the duration of the call makes our numbers equal those of
    ``SACREBLEU_SEED=<seed> sacrebleu ... --confidence``.
    """
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = old


def _check_inputs(hyps: Sequence[str], refs: Sequence[Sequence[str]], what: str) -> None:
    if len(hyps) == 0:
        raise EvaluationError(f"{what}: nothing to score (0 hypotheses)")
    if len(refs) == 0:
        raise EvaluationError(f"{what}: no reference stream given")
    for k, stream in enumerate(refs, start=1):
        if len(stream) != len(hyps):
            raise EvaluationError(f"{what}: reference stream {k} has {len(stream)} lines but "
                                  f"there are {len(hyps)} hypotheses")


def _round(value: float) -> float:
    return round(float(value), 4)


def score_corpus(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    lowercase: bool = False,
    tokenize: str = "13a",
    bootstrap: int = 1000,
    seed: int = 1,
) -> dict[str, Any]:
    """Corpus BLEU, chrF and TER with signatures and bootstrap 95% confidence intervals.

    Args:
        hyps: detokenized hypotheses, one per sentence (empty strings are fine).
        refs: reference streams, each a list with one raw reference per sentence.
        lowercase: case-insensitive BLEU and chrF.
        tokenize: sacreBLEU tokenizer for BLEU ("13a", "intl", "zh", "ja-mecab", "char",
            "none").
        bootstrap: resamples for the confidence intervals; below 2, none are computed.
        seed: seed of the resampling.

    Returns:
        ``{"n_sentences": n, "bleu": m, "chrf": m, "ter": m}`` where each ``m`` is
        ``{"score", "signature", "ci"}``; ``ci`` is None or ``{"mean", "half_width", "low",
        "high"}`` — sacreBLEU's bootstrap mean ± half the width of the 2.5–97.5 percentile
        range, and that range's bounds. BLEU also has ``"details"`` (n-gram precisions,
        brevity penalty, lengths).
        With a bootstrap the signatures include ``bs:<n>|seed:<seed>``.

    Raises:
        EvaluationError: no sentences, or a reference stream of another length.
    """
    _check_inputs(hyps, refs, "score_corpus")
    hyps, refs = list(hyps), [list(stream) for stream in refs]
    result: dict[str, Any] = {"n_sentences": len(hyps)}
    for key, metric in build_metrics(lowercase, tokenize).items():
        # What corpus_score(n_bootstrap=...) does, minus its Score.estimate_ci, which fails
        # ("can't coerce float and float32") when some resamples score a plain 0.0.
        stats = metric._extract_corpus_statistics(hyps, refs)
        score = metric._aggregate_and_compute(stats)
        signature, ci = metric.get_signature(), None
        if bootstrap >= 2:
            with _sacrebleu_seed(seed):
                _, resampled = _bootstrap_resample(stats, metric, bootstrap)
            scores = np.sort([float(s.score) for s in resampled])
            mean, half = estimate_ci(scores)
            # The bounds whose half distance sacreBLEU reports (its estimate_ci): mean ± half
            # may pass 100 or 0 where the resamples are skewed.
            edge = len(scores) // 40
            ci = {"mean": _round(mean), "half_width": _round(half),
                  "low": _round(scores[edge]), "high": _round(scores[-1 - edge])}
            signature.update("bs", bootstrap)
            signature.update("seed", str(seed))
        entry: dict[str, Any] = {"score": _round(score.score), "signature": str(signature),
                                 "ci": ci}
        if key == "bleu":
            entry["details"] = {"precisions": [_round(p) for p in score.precisions],
                                "bp": _round(score.bp), "ratio": _round(score.ratio),
                                "hyp_len": int(score.sys_len), "ref_len": int(score.ref_len)}
        result[key] = entry
    return result


def compare_systems(
    hyps_a: Sequence[str],
    hyps_b: Sequence[str],
    refs: Sequence[Sequence[str]],
    lowercase: bool = False,
    tokenize: str = "13a",
    n_bootstrap: int = 1000,
    seed: int = 1,
) -> dict[str, Any]:
    """Paired bootstrap test (Koehn 2004) of system A against system B, with sacreBLEU's
    ``PairedTest`` (the Moses ``bootstrap-hypothesis-difference-significance.pl`` test).

    Args:
        hyps_a: hypotheses of the evaluated system.
        hyps_b: hypotheses of the system compared with (``--compare HYP_FILE``).
        refs: reference streams.
        n_bootstrap: resamples (0: sacreBLEU's default of 1000).
        seed: resampling seed. sacreBLEU's paired test treats 0 as "unseeded", so 0 is not
            reproducible (a warning says so).

    Returns:
        ``{"n_bootstrap", "seed", "bleu": c, "chrf": c, "ter": c}`` with each ``c`` =
        ``{"a", "b", "p_value", "signature"}``: the two scores and the probability of a
        difference at least this large by chance. Identical scores give p = 1.0 (sacreBLEU
        would report 1/(n+1) when every resample ties, which reads as significant).
    """
    _check_inputs(hyps_a, refs, "compare_systems (system A)")
    _check_inputs(hyps_b, refs, "compare_systems (system B)")
    metrics = build_metrics(lowercase, tokenize)
    if seed == 0:
        warn("seed 0: sacreBLEU's paired bootstrap test does not fix its draw for seed 0, so "
             "its p-values vary from run to run (the signature says seed:0); use another seed")
    with _sacrebleu_seed(seed):
        test = PairedTest([("b", list(hyps_b)), ("a", list(hyps_a))], metrics,
                          [list(stream) for stream in refs], test_type="bs",
                          n_samples=n_bootstrap)
        signatures, scores = test()
    result: dict[str, Any] = {"n_bootstrap": test.n_samples, "seed": seed}
    # PairedTest keys its results by score name ("BLEU", "chrF2", "TER") in metric order.
    for key, name in zip(metrics, signatures):
        baseline, system = scores[name]
        p_value = 1.0 if system.score == baseline.score else float(system.p_value)
        result[key] = {"a": _round(system.score), "b": _round(baseline.score),
                       "p_value": _round(p_value), "signature": str(signatures[name])}
    return result


def bleu_by_length(
    srcs: Sequence[str] | Sequence[int],
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    lowercase: bool = False,
    tokenize: str = "13a",
) -> list[tuple[str, int, float | None]]:
    """Corpus BLEU of the sentences in each source-length bucket.

    Args:
        srcs: source sentences (length = whitespace-separated words) or their lengths.
        hyps, refs: as for :func:`score_corpus`.
        buckets: ascending upper edges; ``(10, 20)`` gives ``"<=10"``, ``"11-20"``, ``">20"``.

    Returns:
        ``(label, n_sentences, bleu)`` per bucket, every bucket listed; ``bleu`` is None for
        an empty bucket. The counts add up to ``len(hyps)``.
    """
    _check_inputs(hyps, refs, "bleu_by_length")
    if len(srcs) != len(hyps):
        raise EvaluationError(f"bleu_by_length: {len(srcs)} sources but {len(hyps)} hypotheses")
    edges = list(buckets)
    if any(b <= a for a, b in itertools.pairwise(edges)) or not edges:
        raise ValueError(f"buckets must be ascending and non-empty, got {edges}")
    lengths = [s if isinstance(s, int) else len(s.split()) for s in srcs]
    labels = ([f"<={edges[0]}"] + [f"{a + 1}-{b}" for a, b in itertools.pairwise(edges)]
              + [f">{edges[-1]}"])
    members: list[list[int]] = [[] for _ in labels]
    for i, length in enumerate(lengths):
        members[sum(length > edge for edge in edges)].append(i)
    metric = _bleu(lowercase, tokenize)
    rows = []
    for label, idx in zip(labels, members):
        bleu = None
        if idx:
            score = metric.corpus_score([hyps[i] for i in idx],
                                        [[stream[i] for i in idx] for stream in refs])
            bleu = _round(score.score)
        rows.append((label, len(idx), bleu))
    return rows


def build_result(
    name: str,
    srcs: Sequence[str],
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    lowercase: bool,
    tokenize: str,
    bootstrap: int,
    seed: int,
    decoding: dict[str, Any],
    checkpoints: Sequence[str],
    compare_hyps: Sequence[str] | None = None,
    compare_name: str | None = None,
    attention: Sequence[tuple[Sequence[str], Sequence[str], Any]] = (),
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> dict[str, Any]:
    """Everything the report shows for one test set, as one dict for
    :func:`seq2seq.report.write_report`.

    Args:
        name: test set name (file names use it with unsafe characters replaced).
        srcs, hyps, refs: raw sources, detokenized hypotheses, raw reference streams.
        decoding: the decoding settings (e.g. beam_size, alpha, max_len), stored as given.
        checkpoints: checkpoint path(s) the hypotheses came from (several when averaged).
        compare_hyps: another system's hypotheses for a paired bootstrap test, if any.
        compare_name: how the report names that system (e.g. its file).
        attention: a few ``(src_tokens, hyp_tokens, matrix)`` to draw, matrix ``(T, S)`` =
            ``(len(hyp_tokens), len(src_tokens))``, as nested lists or a CPU array.

    Returns:
        :func:`score_corpus`'s dict plus ``name``, ``decoding``, ``checkpoints``,
        ``bleu_by_length``, ``compare`` (None or :func:`compare_systems`'s dict plus ``name``),
        ``hypotheses`` and ``attention``.
    """
    result = {"name": name, **score_corpus(hyps, refs, lowercase, tokenize, bootstrap, seed)}
    result["bleu_by_length"] = bleu_by_length(srcs, hyps, refs, buckets, lowercase, tokenize)
    result["decoding"] = dict(decoding)
    result["checkpoints"] = [str(path) for path in checkpoints]
    result["compare"] = None
    if compare_hyps is not None:
        if len(compare_hyps) != len(hyps):
            raise EvaluationError(f"{compare_name or 'compared file'}: {len(compare_hyps)} lines "
                                  f"but the test set {name} has {len(hyps)}")
        compare = compare_systems(hyps, compare_hyps, refs, lowercase, tokenize,
                                  bootstrap, seed)
        result["compare"] = {"name": compare_name or "other", **compare}
    result["hypotheses"] = list(hyps)
    result["attention"] = list(attention)
    return result
