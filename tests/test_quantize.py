"""The int8 products of seq2seq.quantize: which one a CPU gets, and that fbgemm's (7-bit
activations, for x86 CPUs without VNNI) sums exactly what torch._int_mm sums."""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from seq2seq import quantize
from seq2seq.quantize import QMAX_7BIT, Int8Linear, quantize_rows


@pytest.mark.parametrize("machine, vnni, engines, engine, want", [
    ("x86_64", False, ["x86", "fbgemm", "onednn"], "x86", "fbgemm"),  # a Zen 3: AVX2 only
    ("x86_64", True, ["x86", "fbgemm", "onednn"], "x86", "int_mm"),  # oneDNN's VNNI products
    ("AMD64", False, ["fbgemm"], "fbgemm", "fbgemm"),
    ("x86_64", False, ["qnnpack", "onednn"], "onednn", "int_mm"),  # torch without fbgemm
    ("x86_64", False, ["x86", "fbgemm", "onednn"], "onednn", "int_mm"),  # engine set to another
    ("aarch64", False, ["qnnpack"], "qnnpack", "int_mm"),
])
def test_each_cpu_gets_the_int8_product_that_is_fast_there(monkeypatch, machine, vnni, engines,
                                                           engine, want):
    monkeypatch.setattr(quantize.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    monkeypatch.setattr(torch.backends, "quantized",
                        SimpleNamespace(supported_engines=engines, engine=engine))
    assert quantize.int8_kernel() == want


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="'int4'"):
        Int8Linear.quantize(torch.randn(4, 3), None, "int4")


def reference(layer: Int8Linear, x: torch.Tensor, qmax: float) -> torch.Tensor:
    """The layer's output from integer sums in float64 (exact), scaled as the layer scales."""
    rows, scale = quantize_rows(x, qmax)
    sums = (rows.double() @ layer.qweight.double().t()).float()
    y = sums.mul_(scale).mul_(layer.weight_scale)
    return y if layer.bias is None else y.add_(layer.bias)


@pytest.mark.parametrize("rows, k, n", [(1, 8, 5), (5, 37, 53), (37, 512, 300), (300, 96, 1100)])
def test_fbgemm_sums_exactly_even_where_8_bit_pairs_would_saturate(rows, k, n):
    gen = torch.Generator().manual_seed(rows + k)
    weight = torch.randn(n, k, generator=gen)
    weight[:, ::2] = weight.abs().amax(1, keepdim=True)  # pairs of +127 in every row
    layer = Int8Linear.quantize(weight, torch.randn(n, generator=gen), "fbgemm")
    x = torch.randn(rows, k, generator=gen)
    x[:, ::2] = x.abs().amax(1, keepdim=True)  # activations at +63: 8-bit pairs would overflow
    x[0] *= 1e6  # the scale is a row's own
    y = layer(x)
    assert torch.equal(y, reference(layer, x, QMAX_7BIT))
    assert int((layer.qweight == 127).sum()) >= n * (k // 2)


def test_fbgemm_and_int_mm_give_the_same_bits_for_the_same_7_bit_rows():
    torch.manual_seed(5)
    weight, bias = torch.randn(70, 48), torch.randn(70)
    fbgemm = Int8Linear.quantize(weight, bias, "fbgemm")
    int_mm = Int8Linear.quantize(weight, bias, "int_mm")
    x = torch.randn(3, 11, 48)
    rows, scale = quantize_rows(x.reshape(-1, 48), QMAX_7BIT)
    want = torch._int_mm(rows, int_mm.qweight.t()).float().mul_(scale).mul_(
        int_mm.weight_scale).add_(bias)
    assert torch.equal(fbgemm(x), want.reshape(3, 11, 70))
    # int_mm itself keeps 8-bit activations: closer to float, so not the same bits
    assert not torch.equal(int_mm(x), fbgemm(x))


def test_fbgemm_rows_do_not_depend_on_their_batch_mates():
    torch.manual_seed(6)
    layer = Int8Linear.quantize(torch.randn(1100, 512), torch.randn(1100), "fbgemm")
    x = torch.randn(500, 512)
    y = layer(x)
    for size in (1, 5, 64, 499):  # fbgemm's blocking changes with the row count
        assert torch.equal(layer(x[-size:]), y[-size:])


def test_fbgemm_packs_the_weight_again_when_it_changes():
    torch.manual_seed(7)
    layer = Int8Linear.quantize(torch.randn(20, 16), None, "fbgemm")
    x = torch.randn(4, 16)
    before = layer(x)
    layer.qweight[3].neg_()  # written in place
    assert torch.equal(layer(x), reference(layer, x, QMAX_7BIT))
    assert not torch.equal(layer(x)[:, 3], before[:, 3])
    layer.qweight = layer.qweight.flip(0).contiguous()  # replaced
    assert torch.equal(layer(x), reference(layer, x, QMAX_7BIT))
    selected = layer.select(torch.tensor([5, 0, 19]))
    assert selected.kernel == "fbgemm"
    assert torch.equal(selected(x), layer(x)[:, [5, 0, 19]])


def test_the_packed_weight_is_neither_state_nor_lost_in_a_copy():
    torch.manual_seed(8)
    layer = Int8Linear.quantize(torch.randn(20, 16), torch.randn(20), "fbgemm")
    x = torch.randn(4, 16)
    y = layer(x)
    assert set(layer.state_dict()) == {"qweight", "weight_scale", "bias"}
    twin = copy.deepcopy(layer)
    twin.qweight[0].neg_()  # the copy's own weight: the original keeps its pack
    assert torch.equal(layer(x), y)
    assert torch.equal(twin(x), reference(twin, x, QMAX_7BIT))


def test_fbgemm_layers_work_under_inference_mode_and_follow_data_assignment():
    torch.manual_seed(9)
    weight = torch.randn(30, 16)
    x = torch.randn(4, 16)
    with torch.inference_mode():  # inference tensors have no version counter
        made_inside = Int8Linear.quantize(weight, None, "fbgemm")
        assert torch.equal(made_inside(x), reference(made_inside, x, QMAX_7BIT))
    layer = Int8Linear.quantize(weight, None, "fbgemm")
    with torch.inference_mode():
        selected = layer.select(torch.tensor([2, 7]))
        assert torch.equal(selected(x), layer(x)[:, [2, 7]])
    layer(x)
    layer.qweight.data = layer.qweight.flip(0).contiguous()  # same tensor object, new storage
    assert torch.equal(layer(x), reference(layer, x, QMAX_7BIT))


def test_packing_says_nothing_on_stderr():
    # In a process of its own: pytest sets warning filters of its own around each test, and
    # torch says the deprecation once per process.
    code = ("import torch\nfrom seq2seq.quantize import Int8Linear\n"
            "Int8Linear.quantize(torch.randn(8, 4), None, 'fbgemm')(torch.randn(2, 4))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


@pytest.mark.parametrize("bias", [True, False])
def test_c_kernels_and_torch_passes_give_the_same_output(int8_kernel, monkeypatch, bias):
    """The row quantisation and the scaling after the product, in C where the library builds
    (seq2seq.native) and in torch where it does not: bit for bit the same layer output."""
    from seq2seq import native

    assert native.library() is not None, "the C kernels did not build"
    gen = torch.Generator().manual_seed(5)
    layer = Int8Linear.quantize(torch.randn(300, 96, generator=gen),
                                torch.randn(300, generator=gen) if bias else None)
    x = torch.randn(4, 7, 96, generator=gen) * 3
    with_c = layer(x)
    monkeypatch.setattr(native, "library", lambda: None)
    assert native.quantize_rows(x.reshape(-1, 96), 127.0, torch.int8) is None
    assert torch.equal(layer(x), with_c)
