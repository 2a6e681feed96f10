"""Decoding token ids in batches: length-sorted batches, padding, and the choice of search.

``seq2seq translate``, ``evaluate`` and validation decode through :func:`decode_ids`; the server
(:mod:`seq2seq.serve.worker`) makes the same choice of search with :func:`search_path`.
"""

from __future__ import annotations

from typing import Any

import torch

from seq2seq.config import DecodeConfig
from seq2seq.search import Hypothesis, beam_search, greedy_search
from seq2seq.search.shortlist import Lexicon, Shortlist
from seq2seq.search.static_beam import StaticBeamSearch
from seq2seq.tokenizer import EOS, PAD


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, each at most ``batch_tokens`` padded
    source tokens (a longer sentence goes alone). Sorting by length keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def pad_sources(src_ids: list[list[int]],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, S)`` padded sources (each ending in EOS) and ``(B,)`` lengths."""
    rows = [ids + [EOS] for ids in src_ids]
    src_lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    src = torch.full((len(rows), int(src_lens.max())), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        src[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return src.to(device), src_lens.to(device)


def bucketed_batches(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the searches should run at the few batch sizes of
    :func:`seq2seq.search.common.bucket` (``buckets=True``): on a CPU, with bf16 weights, whose
    products run on oneDNN kernels made for each number of rows. Measured on a Xeon with AMX
    (1,000 test sentences, beam 5, alternating): a first bf16 pass 1.18x faster, greedy 1.35x.
    Elsewhere the fillers only cost: greedy search with MKL's fp32 products or int8 weights ran
    8% slower, and a first beam-5 pass with fp32 products on oneDNN 1.4x slower."""
    if device.type != "cpu":
        return False
    return any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *model.buffers()))


def search_path(decode: DecodeConfig, device: torch.device, return_attention: bool) -> str:
    """Which search :func:`decode_ids` runs: "greedy" (beam 1, alpha 0: greedy and beam search
    agree then, greedy is cheaper), "graphs" (the CUDA-graphed static beam search) or "beam"."""
    if decode.beam_size == 1 and decode.alpha == 0:
        return "greedy"
    if (not decode.shortlist and decode.cuda_graphs and device.type == "cuda"
            and not return_attention and decode.no_repeat_ngram == 0):
        return "graphs"
    return "beam"


def make_shortlist(decode: DecodeConfig, lexicon: Lexicon | None) -> Shortlist | None:
    """The shortlist ``decode.shortlist`` asks for (None when 0)."""
    if not decode.shortlist:
        return None
    if lexicon is None:
        raise ValueError("decode.shortlist needs a lexicon")
    return Shortlist(lexicon, decode.shortlist, decode.shortlist_frequent)


@torch.no_grad()
def decode_ids(model: Any, src_ids: list[list[int]], decode: DecodeConfig, device: torch.device,
               return_attention: bool = False, lexicon: Lexicon | None = None
               ) -> list[list[Hypothesis]]:
    """Search every source (token ids without EOS); n-best lists in input order.

    Beam size 1 with alpha 0 uses greedy search (the two agree then; greedy is cheaper).
    ``decode.shortlist`` needs ``lexicon``, and applies to the plain beam search only.
    """
    results: list[list[Hypothesis]] = [[] for _ in src_ids]
    static = None
    shortlist = make_shortlist(decode, lexicon)
    path = search_path(decode, device, return_attention)
    buckets = bucketed_batches(model, device)
    if path == "graphs":
        # One searcher for all batches: its buffers and graphs serve every batch of a shape.
        static = StaticBeamSearch(model, decode.beam_size, decode.n_best, decode.alpha,
                                  decode.max_len_ratio, decode.max_len_add, decode.min_len,
                                  capture=True)
    for batch in length_batches([len(s) + 1 for s in src_ids], decode.batch_tokens):
        src, src_lens = pad_sources([src_ids[i] for i in batch], device)
        if path == "greedy":
            hyps = [[h] for h in greedy_search(
                model, src, src_lens, max_len_ratio=decode.max_len_ratio,
                max_len_add=decode.max_len_add, min_len=decode.min_len,
                no_repeat_ngram=decode.no_repeat_ngram, return_attention=return_attention,
                buckets=buckets)]
        elif static is not None:
            hyps = static(src, src_lens)
        else:
            hyps = beam_search(
                model, src, src_lens, beam_size=decode.beam_size, n_best=decode.n_best,
                alpha=decode.alpha, max_len_ratio=decode.max_len_ratio,
                max_len_add=decode.max_len_add, min_len=decode.min_len,
                no_repeat_ngram=decode.no_repeat_ngram, return_attention=return_attention,
                shortlist=shortlist, buckets=buckets)
        for i, nbest in zip(batch, hyps):
            results[i] = nbest
    return results
