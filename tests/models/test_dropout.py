"""The CPU dropout with a cheap mask behaves as dropout."""

import pytest
import torch

from seq2seq.models.dropout import LEVELS, Dropout, dropout, word_dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drops_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_003)  # not a multiple of 4
    y = dropout(x, p, training=True)
    dropped = float((y == 0).float().mean())
    effective = round(p * LEVELS) / LEVELS
    assert abs(dropped - effective) < 0.002  # ~5 standard deviations
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - effective)))
    assert abs(float(y.mean()) - 1.0) < 0.005


def test_masks_are_seeded_and_differ_between_calls():
    x = torch.randn(7, 33)
    torch.manual_seed(5)
    first, second = dropout(x, 0.3, True), dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.3, True), first)
    assert not torch.equal(first, second)


def test_positions_are_independent():
    """Neighbouring elements share a 64-bit draw; their masks must still be uncorrelated."""
    torch.manual_seed(1)
    keep = (dropout(torch.ones(400_000), 0.5, True) != 0).float().view(-1, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            both = float((keep[:, a] * keep[:, b]).mean())
            assert abs(both - 0.25) < 0.005


def test_gradient_is_the_mask_and_dtype_is_kept():
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 9, dtype=dtype, requires_grad=True)
        y = dropout(x, 0.4, True)
        assert y.dtype == dtype
        y.sum().backward()
        scale = y.detach().float() / x.detach().float()
        torch.testing.assert_close(x.grad.float(), scale, rtol=1e-2, atol=1e-3)


def test_eval_zero_and_one():
    x = torch.randn(4, 6)
    module = Dropout(0.3).eval()
    assert torch.equal(module(x), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_word_dropout_drops_whole_tokens_and_keeps_the_expectation(p):
    torch.manual_seed(3)
    emb = torch.randn(200, 500, 6).abs() + 0.1  # no element is zero by chance
    out = word_dropout(emb, p, training=True)
    zero = out == 0
    assert torch.equal(zero.all(-1), zero.any(-1))  # a token goes whole or not at all
    dropped = float(zero.all(-1).float().mean())
    assert abs(dropped - p) < 0.006  # ~5 standard deviations over 100,000 tokens
    kept = ~zero.all(-1)
    torch.testing.assert_close(out[kept], emb[kept] / (1 - p))


def test_word_dropout_off_draws_nothing():
    emb = torch.randn(3, 4, 5)
    state = torch.get_rng_state()
    assert word_dropout(emb, 0.3, training=False) is emb
    assert word_dropout(emb, 0.0, training=True) is emb
    assert torch.equal(torch.get_rng_state(), state)  # a run without it keeps its stream
    torch.manual_seed(4)
    first = word_dropout(emb, 0.5, True)
    torch.manual_seed(4)
    assert torch.equal(word_dropout(emb, 0.5, True), first)
