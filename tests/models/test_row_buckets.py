"""bf16 CPU training products run at bucketed row counts (gemm.bucket_rows), with the
results of the products at their own row counts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.models import gemm
from seq2seq.models.gemm import bucket_rows
from seq2seq.models.step_linear import StepLinear
from seq2seq.tokenizer import PAD
from seq2seq.training import loss as fused


def product_dims(fn) -> set[int]:
    """Every dimension of every matrix that ``fn``'s products (forward and backward) took."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    names = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")
    return {size for event in prof.events() if event.name in names
            for shape in event.input_shapes if len(shape) == 2 for size in shape}


def test_bucket_rows_rounds_up_by_at_most_an_eighth_to_eight_sizes_per_doubling():
    sizes = [bucket_rows(rows) for rows in range(1, 20_000)]
    assert sizes[:16] == list(range(1, 17))
    for rows, size in enumerate(sizes, start=1):
        assert rows <= size <= rows + rows // 8
        assert bucket_rows(size) == size
    assert sizes == sorted(sizes)
    for power in range(4, 14):
        assert len({s for s in sizes if 2**power <= s < 2**(power + 1)}) == 8


def autocast_linear(x, weight, bias, grad_out, fn):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(x, weight, bias)
    (out.float() * grad_out).sum().backward()
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("rows", [100, 1000])
def test_a_bf16_training_product_runs_padded_and_gives_torch_s_results(rows):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(rows, 32, generator=gen), torch.randn(96, 32, generator=gen),
                       torch.randn(96, generator=gen))
    grad_out = torch.randn(rows, 96, generator=gen)
    dims = product_dims(lambda: autocast_linear(x, weight, bias, grad_out, gemm.linear))
    assert rows not in dims and bucket_rows(rows) in dims  # forward, grad x and grad W
    got = autocast_linear(x, weight, bias, grad_out, gemm.linear)
    want = autocast_linear(x, weight, bias, grad_out, F.linear)
    assert got[0].dtype == torch.bfloat16 and got[0].shape == want[0].shape
    for have, expected in zip(got, want):
        torch.testing.assert_close(have, expected, rtol=0, atol=0) if rows == 100 else \
            torch.testing.assert_close(have, expected, rtol=1e-2, atol=1e-2)


def test_fp32_training_products_by_onednn_are_padded_too(fp32_gemm):
    """On CPUs where fp32 products go to oneDNN (AMD's), it builds kernels per shape too."""
    fp32_gemm("onednn")
    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(100, 32, generator=gen), torch.randn(96, 32, generator=gen)
    assert gemm.pads_rows(x, weight)

    def run():
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = gemm.linear(xg, wg)
        (out * x[:, :1]).sum().backward()
        return out.detach(), xg.grad, wg.grad

    dims = product_dims(run)
    assert 100 not in dims and 104 in dims
    got = run()
    fp32_gemm("blas")
    assert not gemm.pads_rows(x, weight)  # MKL builds no kernel per shape
    assert 100 in product_dims(run)
    for have, want in zip(got, run()):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def test_what_is_not_a_bf16_cpu_training_product_is_not_padded(fp32_gemm):
    fp32_gemm("blas")
    x, weight = torch.randn(100, 32), torch.randn(96, 32)
    assert not gemm.pads_rows(x, weight)  # fp32 by MKL
    assert not gemm.pads_rows(x.bfloat16(), torch.randn(8, 32))  # few outputs
    with torch.no_grad():
        assert not gemm.pads_rows(x.bfloat16(), weight)  # no gradients: decoding
    assert gemm.pads_rows(x.bfloat16(), weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.pads_rows(x, weight)
    assert 100 in product_dims(lambda: gemm.linear(x.requires_grad_(), weight).sum().backward())


def test_step_products_and_the_one_gradient_product_run_at_bucketed_rows():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 32, generator=gen, requires_grad=True)
    sizes = [37, 37, 33, 19]  # a recurrence whose sentences end: 126 rows in all
    xs = [torch.randn(n, 32, generator=gen) for n in sizes]

    def run(make):
        weight.grad = None
        linear = make()
        total = sum((linear(x.bfloat16()).float() * x[:, :1]).sum() for x in xs)
        total.backward()
        return weight.grad.clone()

    dims = product_dims(lambda: run(lambda: StepLinear(weight, None, torch.bfloat16)))
    assert {37, 33, 19, 126}.isdisjoint(dims)
    assert {bucket_rows(n) for n in (37, 33, 19, 126)} <= dims  # 40, 36, 20, 128
    got = run(lambda: StepLinear(weight, None, torch.bfloat16))
    want = run(lambda: lambda x: F.linear(x, weight.bfloat16()))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def loss_problem(rows=203, hidden=32, vocab=80):
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(rows, hidden, generator=gen).bfloat16()
    output = nn.Linear(hidden, vocab)
    target = torch.randint(1, vocab, (rows,), generator=gen)
    target[::7] = PAD  # 174 real rows
    return features, output, target


def loss_and_grads(features, output, target, pad):
    features = features.clone().requires_grad_()
    output.zero_grad(set_to_none=True)
    chunk = 50  # bucketed down to 48: 174 rows in chunks of 48, 48, 48 and 30
    loss = fused._LinearCrossEntropy.apply(features, output.weight, output.bias, target, 0.1,
                                           chunk, pad)
    loss.backward()
    return loss.detach(), features.grad, output.weight.grad, output.bias.grad


def test_the_loss_multiplies_bucketed_rows_and_gives_the_same_loss_and_gradients():
    features, output, target = loss_problem()
    real = int((target != PAD).sum())
    assert real == 174 and bucket_rows(real) == 176
    dims = product_dims(lambda: loss_and_grads(features, output, target, True))
    assert real not in dims and 176 in dims and 48 in dims and 50 not in dims
    assert real in product_dims(lambda: loss_and_grads(features, output, target, False))
    got = loss_and_grads(features, output, target, True)
    want = loss_and_grads(features, output, target, False)
    # the same logits; chunks of 48 rows instead of 50 sum the loss in another order
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert got[1][target == PAD].abs().max() == 0  # padding gets no gradient
    for have, expected in zip(got[1:], want[1:]):
        torch.testing.assert_close(have.float(), expected.float(), rtol=1e-2,
                                   atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("real", [1, 17, 48, 96, 161, 199, 240])
def test_the_padded_loss_for_any_count_of_real_rows(real):
    """Counts that end in a whole chunk, a chunk of one row, or a last chunk whose bucket
    is larger than itself."""
    features, output, target = loss_problem(rows=240, vocab=80)
    target[:real] = torch.arange(real) % 79 + 1
    target[real:] = PAD
    got = loss_and_grads(features, output, target, True)
    want = loss_and_grads(features, output, target, False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    for have, expected in zip(got[1:], want[1:]):
        torch.testing.assert_close(have.float(), expected.float(), rtol=1e-2,
                                   atol=1e-2 * expected.abs().max().item())
