"""Search: greedy and beam decoding over any model with the search interface.

Search depends only on torch and on three methods of the model (or :class:`Ensemble`):

- ``encode(src (B, S) long, src_lens (B,) long) -> enc``: a (named) tuple of batch-first tensors;
- ``init_state(enc) -> state``: a tuple of batch-first tensors;
- ``step(prev_tokens (B,) long, state, enc) -> (log_probs (B, V), state, attn (B, S))``.

:class:`BeamSearch`, which sentences can join while it runs, also uses
``resize_source(enc, length) -> enc`` (padding added or cut) when a longer sentence joins.

Token ids are the tokenizer's fixed ``PAD, UNK, BOS, EOS = 0, 1, 2, 3``.
"""

from seq2seq.search.beam import BeamSearch, beam_search
from seq2seq.search.common import BOS, EOS, PAD, UNK, Hypothesis, length_penalty, reorder
from seq2seq.search.ensemble import Ensemble
from seq2seq.search.greedy import greedy_search

__all__ = ["BOS", "EOS", "PAD", "UNK", "BeamSearch", "Ensemble", "Hypothesis", "beam_search",
           "greedy_search", "length_penalty", "reorder"]
