"""Validation during training: teacher-forced loss and perplexity, and BLEU of decoded output.

With several ranks, each rank scores and decodes its own shard of the sentences; the main rank
gathers (index, hypothesis) pairs, drops duplicates, restores the order and scores every sentence
exactly once, so the result does not depend on the world size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from seq2seq import distributed as dist
from seq2seq.config import Recipe
from seq2seq.decoding import decode_ids, length_batches, pad_sources
from seq2seq.scoring import bleu_tokenizer, corpus_bleu
from seq2seq.tokenizer import PAD


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Sentence indices of one rank: every world-th sentence (no padding, no drop)."""
    return list(range(rank, n, world))


@torch.no_grad()
def teacher_forced_nll(model: Any, src_ids: list[list[int]], trg_ids: list[list[int]],
                       batch_tokens: int, device: torch.device) -> tuple[float, int]:
    """Summed negative log-likelihood (no label smoothing) and target tokens (EOS included)."""
    from seq2seq.tokenizer import BOS, EOS

    total, tokens = 0.0, 0
    for batch in length_batches([len(t) + 1 for t in trg_ids], batch_tokens):
        src, src_lens = pad_sources([src_ids[i] for i in batch], device)
        rows = [trg_ids[i] for i in batch]
        width = max(len(r) for r in rows) + 1
        trg_in = torch.full((len(rows), width), PAD, dtype=torch.long)
        trg_out = torch.full((len(rows), width), PAD, dtype=torch.long)
        for j, row in enumerate(rows):
            trg_in[j, :len(row) + 1] = torch.tensor([BOS] + row)
            trg_out[j, :len(row) + 1] = torch.tensor(row + [EOS])
        logits = model(src, src_lens, trg_in.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), trg_out.to(device).flatten(),
                                 ignore_index=PAD, reduction="sum").item()
        tokens += int((trg_out != PAD).sum())
    return total, tokens


def validate(model: Any, valid: Any, tokenizer: Any, recipe: Recipe,
             device: torch.device) -> dict[str, float]:
    """Loss, perplexity and detokenized sacreBLEU on the validation set (every rank calls it)."""
    was_training = model.training
    model.eval()
    mine = shard_indices(len(valid.src_ids), dist.rank(), dist.world_size())
    src_ids = [valid.src_ids[i] for i in mine]
    nll, tokens = teacher_forced_nll(model, src_ids, [valid.trg_ids[i] for i in mine],
                                     recipe.decode.batch_tokens, device)
    totals = dist.all_reduce_sum(torch.tensor([nll, float(tokens)], dtype=torch.float64))
    decode = recipe.decode
    # (a shortlist is for decoding a trained model: the lexicon is made at the run's end)
    if recipe.train.valid_search == "greedy":
        decode = dataclasses.replace(decode, beam_size=1, n_best=1, alpha=0.0, shortlist=0)
    else:
        decode = dataclasses.replace(decode, n_best=1, shortlist=0)
    hyps = decode_ids(model, src_ids, decode, device)
    texts = tokenizer.decode_trg([h[0].tokens for h in hyps])
    gathered = dist.gather_objects(list(zip(mine, texts)))
    metrics = None
    if dist.is_main():
        by_index = dict(pair for part in gathered for pair in part)
        ordered = [by_index[i] for i in range(len(valid.src_ids))]
        loss = float(totals[0] / max(totals[1], 1))
        metrics = {"loss": loss, "ppl": perplexity(loss),
                   "bleu": corpus_bleu(ordered, [valid.trg_text],
                                       lowercase=recipe.eval.lowercase,
                                       tokenize=bleu_tokenizer(recipe.eval.tokenize,
                                                               recipe.data.trg_lang)),
                   "n_sentences": len(ordered)}
    metrics = dist.broadcast_object(metrics)
    model.train(was_training)
    return metrics


def perplexity(loss: float) -> float:
    """``exp(loss)``, held at ``exp(700)`` (a float64 overflows past 709): finite, and in the
    order of the losses up to 700 nats a token for ``train.early_stop_metric: ppl`` (a cap at
    ``exp(100)`` made the validations of a diverging run equal, so a recovery was no best)."""
    return math.exp(min(loss, 700.0))
