"""Token batching: each pair once per epoch, bounded batches, determinism, rank shards, resume."""

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq.data.batching import collate, epoch_batches, rank_steps, sentence_batches
from seq2seq.errors import Seq2SeqError
from seq2seq.tokenizer import BOS, EOS, PAD


def lengths(n: int, seed: int = 0, high: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, high, n), rng.integers(1, high, n)


def check_epoch(batches, trg_lens, batch_tokens, batch_sentences=0, group_size=1):
    flat = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    assert np.array_equal(np.sort(flat), np.arange(len(trg_lens)))  # each pair exactly once
    assert len(batches) % group_size == 0
    for batch in batches:
        assert len(batch) >= 1
        assert len(batch) == 1 or len(batch) * (trg_lens[batch].max() + 1) <= batch_tokens
        if batch_sentences:
            assert len(batch) <= batch_sentences


@pytest.mark.parametrize("batch_tokens,batch_sentences", [(200, 0), (1000, 0), (1000, 7)])
def test_every_pair_once_and_bounds_respected(batch_tokens, batch_sentences):
    trg_lens, src_lens = lengths(1000)
    batches = epoch_batches(trg_lens, src_lens, batch_tokens, batch_sentences, seed=1, epoch=0)
    check_epoch(batches, trg_lens, batch_tokens, batch_sentences)


def test_batches_are_length_bucketed():
    trg_lens, src_lens = lengths(5000)
    batches = epoch_batches(trg_lens, src_lens, 500, 0, seed=1, epoch=0)
    padded = sum(len(b) * (trg_lens[b].max() + 1) for b in batches)
    assert (trg_lens + 1).sum() / padded > 0.9  # a random split would waste far more


def test_deterministic_for_seed_and_epoch_different_across_epochs():
    trg_lens, src_lens = lengths(1000)

    def run(seed, epoch):
        return [b.tolist() for b in epoch_batches(trg_lens, src_lens, 300, 0, seed, epoch, 4)]

    assert run(1, 0) == run(1, 0)
    assert run(1, 0) != run(1, 1)
    assert run(1, 0) != run(2, 0)


def test_sort_chunks_smaller_than_the_corpus():
    trg_lens, src_lens = lengths(1000)
    batches = epoch_batches(trg_lens, src_lens, 300, 0, 1, 0, group_size=3, sort_chunk=128)
    check_epoch(batches, trg_lens, 300, group_size=3)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_rank_shards_disjoint_equal_and_cover_the_epoch(world_size, accumulate):
    trg_lens, src_lens = lengths(997)
    group = world_size * accumulate
    batches = epoch_batches(trg_lens, src_lens, 400, 0, seed=3, epoch=2, group_size=group)
    check_epoch(batches, trg_lens, 400, group_size=group)
    shards = [rank_steps(batches, r, world_size, accumulate) for r in range(world_size)]
    assert len({len(steps) for steps in shards}) == 1  # every rank takes the same steps
    assert all(len(micro) == accumulate for steps in shards for micro in steps)
    seen = np.concatenate([b for steps in shards for micro in steps for b in micro])
    assert np.array_equal(np.sort(seen), np.arange(len(trg_lens)))  # disjoint, union = epoch
    for s in range(len(shards[0])):  # step s of all ranks is exactly group s of the epoch
        mine = [b.tolist() for r in range(world_size) for b in shards[r][s]]
        assert mine == [b.tolist() for b in batches[s * group:(s + 1) * group]]


@pytest.mark.parametrize("world_size,accumulate,start", [(1, 1, 5), (2, 2, 3), (3, 1, 0)])
def test_resume_from_step_gives_the_remaining_steps(world_size, accumulate, start):
    trg_lens, src_lens = lengths(800)
    group = world_size * accumulate
    batches = epoch_batches(trg_lens, src_lens, 300, 0, seed=5, epoch=1, group_size=group)
    for rank in range(world_size):
        full = rank_steps(batches, rank, world_size, accumulate)
        resumed = rank_steps(batches, rank, world_size, accumulate, start_step=start)
        assert len(resumed) == len(full) - start
        assert [[b.tolist() for b in m] for m in resumed] == \
            [[b.tolist() for b in m] for m in full[start:]]


def test_splitting_reaches_a_multiple_even_for_tiny_corpora():
    trg_lens, src_lens = lengths(7)
    batches = epoch_batches(trg_lens, src_lens, 10_000, 0, 0, 0, group_size=6)
    check_epoch(batches, trg_lens, 10_000, group_size=6)
    # More batches per update than pairs: no batch bound helps (the advice said "raise
    # train.batch_sentences"), fewer batches per update does.
    with pytest.raises(Seq2SeqError, match="multiple of 4 batches .* lower train.accumulate"):
        epoch_batches(trg_lens[:3], src_lens[:3], 10_000, 0, 0, 0, group_size=4)
    with pytest.raises(Seq2SeqError, match="raise train.batch_sentences"):  # (bounds: 5 of 1)
        epoch_batches(trg_lens[:5], src_lens[:5], 10_000, 1, 0, 0, group_size=3)


def test_a_pair_longer_than_the_bound_gets_its_own_batch():
    trg_lens = np.array([5, 500, 6, 7])
    batches = epoch_batches(trg_lens, trg_lens, 100, 0, 0, 0)
    check_epoch(batches, trg_lens, 100)
    assert [1] in [b.tolist() for b in batches]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=300), st.integers(61, 2000),
       st.integers(0, 20), st.integers(1, 6), st.integers(0, 3))
def test_epoch_invariants_hold_for_any_lengths(trg, batch_tokens, batch_sentences, group, seed):
    trg_lens = np.array(trg)
    src_lens = trg_lens[::-1].copy()
    try:
        batches = epoch_batches(trg_lens, src_lens, batch_tokens, batch_sentences, seed, 0, group)
    except Seq2SeqError:
        # Only when even all-singleton splitting cannot reach a multiple of the group size.
        needed = len(epoch_batches(trg_lens, src_lens, batch_tokens, batch_sentences, seed, 0))
        assert -(-needed // group) * group > len(trg_lens)
        return
    check_epoch(batches, trg_lens, batch_tokens, batch_sentences, group)


# --------------------------------------------------------------------------------------------
# collate and sentence_batches
# --------------------------------------------------------------------------------------------

ROWS = {"src_ids": [[5, 6, 7], [8], [9, 10]], "trg_ids": [[11, 12], [13, 14, 15, 16], []]}


@pytest.mark.parametrize("kind", ["table", "dataset", "selected"])
def test_collate_pads_and_adds_bos_eos(kind):
    schema = pa.schema([("src_ids", pa.list_(pa.int32())), ("trg_ids", pa.list_(pa.int32()))])
    table = pa.Table.from_pydict(ROWS, schema=schema)
    rows = table
    if kind != "table":
        rows = datasets.Dataset(table)
    if kind == "selected":  # an indices mapping in front of the table
        rows = datasets.Dataset(pa.concat_tables([table, table])).select([3, 4, 5, 0])
    batch = collate(rows, np.array([2, 0, 1]))
    assert batch.src.tolist() == [[9, 10, EOS, PAD], [5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert batch.src_lens.tolist() == [3, 4, 2]
    assert batch.trg_in.tolist() == [[BOS, PAD, PAD, PAD, PAD], [BOS, 11, 12, PAD, PAD],
                                     [BOS, 13, 14, 15, 16]]
    assert batch.trg_out.tolist() == [[EOS, PAD, PAD, PAD, PAD], [11, 12, EOS, PAD, PAD],
                                      [13, 14, 15, 16, EOS]]
    assert batch.n_trg_tokens == 1 + 3 + 5 == int((batch.trg_out != PAD).sum())
    assert batch.src.dtype == batch.trg_in.dtype == batch.src_lens.dtype == torch.int64


def test_sentence_batches_cover_everything_longest_first():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 40, 300).tolist() + [500]
    batches = sentence_batches(lens, 200)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lens)))
    assert [lens[i] for i in flat] == sorted(lens, reverse=True)
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lens[i] for i in batch) <= 200
    assert sentence_batches([], 100) == []
