"""packed_rnn computes what the RNN module computes over packed input, and the encoder uses it
in CPU training only."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.models.cells import cell_update, packed_rnn, padded, steps_packed, tanh
from tests.models.test_models import batch, make, tiny

MODULES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


def module_and_input(cell, bidirectional, layers=2, bias=True, lens=(3, 7, 1, 7, 5, 2)):
    torch.manual_seed(0)
    rnn = MODULES[cell](6, 5, num_layers=layers, batch_first=True, bias=bias,
                        bidirectional=bidirectional).double()
    x = torch.randn(len(lens), max(lens), 6, dtype=torch.double)
    packed = pack_padded_sequence(x, torch.tensor(lens), batch_first=True,
                                  enforce_sorted=False)
    return rnn, packed


def outputs_and_gradients(rnn, run, packed):
    out, hx = run(rnn, packed)
    states = hx if isinstance(hx, tuple) else (hx,)
    # Weights that give every output and final state its own gradient.
    torch.manual_seed(1)
    total = sum((t * torch.randn_like(t)).sum() for t in (out.data,) + states)
    return out, states, torch.autograd.grad(total, list(rnn.parameters()))


@pytest.mark.parametrize("cell", MODULES)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
@pytest.mark.parametrize("layers,bias", [(2, True), (1, False), (3, True)])
def test_packed_rnn_equals_the_module_outputs_states_and_gradients(cell, bidirectional,
                                                                   layers, bias):
    rnn, packed = module_and_input(cell, bidirectional, layers, bias)
    assert steps_packed(rnn)
    want_out, want_states, want_grads = outputs_and_gradients(
        rnn, lambda m, p: m(p), packed)
    got_out, got_states, got_grads = outputs_and_gradients(rnn, packed_rnn, packed)
    assert torch.equal(got_out.batch_sizes, want_out.batch_sizes)
    assert torch.equal(got_out.unsorted_indices, want_out.unsorted_indices)
    torch.testing.assert_close(got_out.data, want_out.data)
    assert len(got_states) == len(want_states)
    for got, want in zip(got_states, want_states):  # (L * D, B, H), the input's batch order
        torch.testing.assert_close(got, want)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want)


def test_packed_rnn_in_bf16_runs_on_bf16_copies_and_stays_close():
    rnn, packed = module_and_input("gru", True)
    rnn, packed = rnn.float(), packed._replace(data=packed.data.float())
    want, _ = rnn(packed)
    got, hx = packed_rnn(rnn, packed, torch.bfloat16)
    assert got.data.dtype == hx.dtype == torch.bfloat16
    assert rnn.weight_ih_l0.dtype == torch.float32  # the master weights are untouched
    torch.testing.assert_close(got.data.float(), want.data, atol=0.03, rtol=0)
    got.data.float().sum().backward()
    assert rnn.weight_hh_l0.grad.dtype == torch.float32


def test_modules_it_cannot_step_are_left_to_torch():
    assert not steps_packed(nn.RNN(4, 4, nonlinearity="relu"))
    assert not steps_packed(nn.LSTM(4, 4, proj_size=2))
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.GRU(4, 4)), {nn.GRU},
                                                       dtype=torch.qint8)[0]
    assert not steps_packed(quantized)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_the_encoder_trains_through_packed_rnn_and_encodes_as_in_evaluation(cell,
                                                                            monkeypatch):
    """In CPU training the encoder steps the cells itself (torch's packed backward fills a
    whole-sequence gradient per step); in evaluation it calls the module: same function."""
    import seq2seq.models.encoder as encoder_module

    calls = []
    real = encoder_module.packed_rnn
    monkeypatch.setattr(encoder_module, "packed_rnn",
                        lambda *args: calls.append(1) or real(*args))
    model = make(tiny(cell, dropout=0.0))
    src, src_lens, _, _ = batch([5, 2, 7, 1])
    train_out, train_final = model.encoder.train()(src, src_lens)
    assert calls == [1]
    with torch.no_grad():
        eval_out, eval_final = model.encoder.eval()(src, src_lens)
    assert calls == [1]
    torch.testing.assert_close(train_out, eval_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(train_final, eval_final, atol=1e-6, rtol=1e-5)
    assert torch.all(train_out[src == 0] == 0)  # padding positions stay exactly zero


@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
def test_padded_equals_pad_packed_sequence_and_its_gradient(sort):
    lens = torch.tensor([4, 4, 2, 1]) if sort else torch.tensor([2, 4, 1, 4, 3])
    x = torch.randn(len(lens), 6, 3, dtype=torch.double, requires_grad=True)
    packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=sort)
    want, _ = pad_packed_sequence(packed, batch_first=True, total_length=6)
    got = padded(packed, 6)
    assert got.is_contiguous() and torch.equal(got, want)
    weights = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), x, retain_graph=True)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.equal(got_grad, want_grad)


def test_tanh_is_torchs_to_rounding_row_by_row_and_keeps_gradients():
    from seq2seq.models.cells import tanh

    torch.manual_seed(0)
    x = torch.randn(160, 257) * 4
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, 40.0])
    with torch.no_grad():
        fast = tanh(x)
    # the C kernel's tolerance (numpy's, where the kernels are off, is tighter)
    torch.testing.assert_close(fast, torch.tanh(x.double()).float(), rtol=0, atol=1.6e-7)
    # element-wise: a row alone, a slice, or a transposed view gives the same bits
    assert torch.equal(tanh(x[7:8]), fast[7:8])
    assert torch.equal(tanh(x[:, 3:9]), fast[:, 3:9])
    assert torch.equal(tanh(x.t().contiguous()).t(), fast)
    # with gradients, torch's own (numpy's would cut the graph)
    leaf = x[:3].clone().requires_grad_()
    tanh(leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, 1 - torch.tanh(leaf.detach()) ** 2)
    assert tanh(x.double()).dtype == torch.double


def gru_update_by_autograd(gates, hidden, h, tanh=torch.tanh):
    """The GRU update as autograd differentiates it, op by op."""
    size = h.size(-1)
    reset, update = torch.sigmoid(gates[:, :2 * size] + hidden[:, :2 * size]).chunk(2, -1)
    new = tanh(gates[:, 2 * size:] + reset * hidden[:, 2 * size:])
    return new + update * (h - new)


def gru_inputs(dtype, rows=7, size=5):
    torch.manual_seed(0)
    return [torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_()
            for shape in ((rows, 3 * size), (rows, 3 * size), (rows, size))]


def test_gru_update_in_training_has_a_written_out_backward_equal_to_autograds():
    inputs = gru_inputs(torch.float64)
    out, none = cell_update("gru", *inputs, None)
    assert none is None and out.grad_fn.name().endswith("_GRUUpdateBackward")
    assert torch.autograd.gradcheck(lambda *x: cell_update("gru", *x, None)[0], inputs)
    torch.manual_seed(1)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want_out = gru_update_by_autograd(*inputs)
    want = torch.autograd.grad((want_out * weights).sum(), inputs)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


class CellsTanh(torch.autograd.Function):
    """cells.tanh's values with autograd's rule for tanh's gradient, ``(1 - y^2) g``."""

    @staticmethod
    def forward(ctx, x):
        y = tanh(x.detach())  # numpy's in fp32, as outside autograd
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.aten.tanh_backward(grad, ctx.saved_tensors[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gru_update_in_fp32_and_bf16_matches_autograd_given_the_same_tanh(dtype,
                                                                          torch_kernels):
    inputs = gru_inputs(dtype)  # torch's ops (the C kernels below)
    out, _ = cell_update("gru", *inputs, None)
    torch.manual_seed(1)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want_out = gru_update_by_autograd(*inputs, tanh=CellsTanh.apply)
    want = torch.autograd.grad((want_out * weights).sum(), inputs)
    assert out.dtype == dtype
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_gru_update_in_c_is_float64s_to_rounding(dtype, strided):
    from seq2seq import native

    assert native.library() is not None, "the C kernels did not build"
    rows, size = 9, 37  # a size past the kernels' vector blocks, with a tail
    inputs = gru_inputs(torch.float64, rows, size)
    inputs[0].data[:2] *= 30  # saturated gates: sigmoid and tanh at their ends
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    used = leaves
    if strided:  # rows apart, as a slice of a wider tensor or an unbound state gives them
        used = [torch.cat([x, x], 1)[:, :x.size(1)] for x in leaves]
        assert used[0].stride(0) == 2 * used[0].size(1)
    out, _ = cell_update("gru", *used, None)
    assert out.dtype == dtype and out.grad_fn.name().endswith("_GRUUpdateBackward")
    torch.manual_seed(1)
    weights = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * weights).sum(), leaves)
    exact = [x.detach().to(dtype).double().requires_grad_() for x in inputs]
    want_out = gru_update_by_autograd(*exact)
    want = torch.autograd.grad((want_out * weights).sum(), exact)
    for g, w in zip([out, *got], [want_out, *want], strict=True):
        assert g.dtype == dtype
        if dtype == torch.float32:  # a few roundings (2 sigmoid(2x) - 1 within 3e-7 of tanh)
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
        else:  # the output's gradient and the kept gates are bf16 too, so each value is a few
            # bf16 roundings off (torch's ops: 0.3-0.4% here): held as a whole, below 2^-7
            assert (g.double() - w).norm() <= 2**-7 * w.norm()


def test_gru_update_takes_torchs_ops_where_the_kernels_cannot(monkeypatch):
    from seq2seq import native

    calls = []
    real = native.gru_train
    monkeypatch.setattr(native, "gru_train", lambda *x: calls.append(1) or real(*x))
    gates, hidden, h = gru_inputs(torch.float32)
    cell_update("gru", gates, hidden, h.detach().bfloat16(), None)[0].sum().backward()
    assert calls and gates.grad is not None  # mixed dtypes: torch's ops, promoted
    assert real(gates, hidden, h.bfloat16()) is None and real(gates, hidden, h) is not None


def test_bf16_tanh_is_computed_in_fp32_and_rounded_once():
    torch.manual_seed(0)
    x = (torch.randn(64, 33) * 3).bfloat16().requires_grad_()
    y = tanh(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.tanh(x.detach().float()).bfloat16())
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, grad)
    y = y.detach().float()
    torch.testing.assert_close(got.float(), grad.float() * (1 - y * y), rtol=8e-3, atol=1e-5)
