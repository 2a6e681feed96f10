"""Corpus statistics: what ``prepare`` read, kept and dropped, and how long the sentences are.

Counts per drop reason and token totals with length percentiles (p50/p90/p99/max, in subword
tokens without EOS) of the training, validation and test sets, and :func:`format_stats`, the
summary ``seq2seq prepare`` prints.
"""

from __future__ import annotations

import numpy as np

from seq2seq.data.encoding import DROP_REASONS, KEEP
from seq2seq.tokenizer import UNK


def describe_train(drop: np.ndarray, src_len: np.ndarray, trg_len: np.ndarray,
                   unknown: tuple[int, int]) -> dict:
    """Counts per drop reason and length statistics of the kept pairs; ``unknown``: how many
    of their source and target tokens are the unknown piece."""
    counts = np.bincount(drop, minlength=len(DROP_REASONS) + 1)
    return {"read": len(drop), "kept": int(counts[KEEP]),
            "dropped": {name: int(counts[code]) for code, name in DROP_REASONS.items()},
            **describe_lengths(src_len, trg_len), "unknown": list(unknown)}


def describe_eval_set(src_ids: list[list[int]], trg_ids: list[list[int]]) -> dict:
    """Pair count, length statistics and unknown pieces of a validation or test set."""
    src_len = np.array([len(ids) for ids in src_ids], dtype=np.int64)
    trg_len = np.array([len(ids) for ids in trg_ids], dtype=np.int64)
    unknown = [sum(row.count(UNK) for row in side) for side in (src_ids, trg_ids)]
    return {"pairs": len(src_ids), **describe_lengths(src_len, trg_len), "unknown": unknown}


def describe_lengths(src_len: np.ndarray, trg_len: np.ndarray) -> dict:
    """Token totals and length percentiles of the (N,) source and (N,) target lengths."""
    def percentiles(lens: np.ndarray) -> dict:
        if len(lens) == 0:
            return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
        p50, p90, p99 = np.percentile(lens, [50, 90, 99], method="nearest")
        return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lens.max())}

    return {"src_tokens": int(src_len.sum()), "trg_tokens": int(trg_len.sum()),
            "src_len": percentiles(src_len), "trg_len": percentiles(trg_len)}


def format_stats(stats: dict) -> str:
    """A human-readable summary of :func:`seq2seq.data.cache.prepare_data`'s ``stats``."""
    tok, train = stats["tokenizer"], stats["train"]
    vocab = (f"joint vocabulary {tok['src_vocab']:,}" if tok["joint"] else
             f"vocabularies {tok['src_vocab']:,} (source) / {tok['trg_vocab']:,} (target)")
    lines = [
        f"tokenizer: {vocab}, {'reused' if tok['reused'] else 'trained'} ({tok['path']})",
        f"cache: {'reused' if stats['cache']['reused'] else 'built'} ({stats['cache']['path']})",
        (f"train: {train['read']:,} pairs read, {train['kept']:,} kept, "
         f"{train['read'] - train['kept']:,} dropped"),
    ]
    labels = {"empty": "empty", "src_too_long": "too long source",
              "trg_too_long": "too long target", "ratio": "length ratio"}
    lines.append("  dropped: " + ", ".join(f"{labels[k]} {v:,}"
                                           for k, v in train["dropped"].items()))
    rows = [("train", train)] + [("valid", stats["valid"])] + [
        (f"test {name}", test) for name, test in stats["tests"].items()]
    width = max(len(name) for name, _ in rows)
    lines.append(f"{'':{width}}  {'pairs':>11}  {'src tokens':>12}  {'trg tokens':>12}  "
                 f"src len p50/p90/p99/max  trg len p50/p90/p99/max")
    for name, row in rows:
        pairs = row.get("kept", row.get("pairs", 0))
        lines.append(f"{name:{width}}  {pairs:>11,}  {row['src_tokens']:>12,}  "
                     f"{row['trg_tokens']:>12,}  {_quartet(row['src_len']):>23}  "
                     f"{_quartet(row['trg_len']):>23}")
    # Characters outside the vocabulary: each a ⁇ in a translation, or a reference word the
    # model cannot write. (A cache made before these counts has none.)
    unknown = [f"{name} {row['unknown'][0]:,} / {row['unknown'][1]:,}" for name, row in rows
               if any(row.get("unknown") or ())]
    if unknown:
        lines.append("unknown pieces, source / target tokens (characters outside the "
                     "vocabulary, ⁇ in translations): "
                     + ", ".join(unknown) + "; tokenizer.byte_fallback: true spells such "
                     "characters in bytes")
    return "\n".join(lines)


def _quartet(p: dict) -> str:
    return f"{p['p50']}/{p['p90']}/{p['p99']}/{p['max']}"
