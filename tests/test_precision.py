"""train.precision: what ``auto`` picks (detection mocked), and bf16 on the CPU with the RNNs
included agreeing with fp32 for every cell."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from seq2seq import precision as prec
from seq2seq.models import PAD
from seq2seq.training.step import autocast_dtype
from tests.models.test_models import CELLS, batch, make, tiny

CPU = torch.device("cpu")


def mock_torch_probes(monkeypatch, amx, avx512_bf16, capability="AVX512"):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (True, True, ("bf16", "auto: the CPU computes bf16 natively (torch: amx_bf16, avx512_bf16)")),
    (False, True, ("bf16", "auto: the CPU computes bf16 natively (torch: avx512_bf16)")),
    (False, False, ("fp32", "auto: the CPU has no native bf16 (no amx_bf16 or avx512_bf16)")),
])
def test_auto_on_a_cpu_asks_torch(monkeypatch, amx, avx512_bf16, expected):
    mock_torch_probes(monkeypatch, amx, avx512_bf16)
    assert prec.resolve_precision("auto", CPU) == expected
    # fp32 stays available on any CPU, and bf16 stays what was asked for.
    assert prec.resolve_precision("fp32", CPU) == ("fp32", "as asked")
    assert prec.resolve_precision("bf16", CPU)[0] == "bf16"


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_auto_is_fp32_where_torch_is_held_below_avx512(monkeypatch, capability):
    # ATEN_CPU_CAPABILITY=avx2 on a CPU with AVX512-BF16: torch's bf16 products no longer use
    # the bf16 instructions, so bf16 is not native there.
    mock_torch_probes(monkeypatch, False, True, capability)
    assert prec.cpu_native_bf16() is None
    assert prec.resolve_precision("auto", CPU) == ("fp32", (
        f"auto: torch's CPU kernels are held at {capability}, below the CPU's bf16 "
        "instructions (torch: avx512_bf16)"))
    mock_torch_probes(monkeypatch, False, False, capability)
    assert prec.resolve_precision("auto", CPU)[1] == (
        "auto: the CPU has no native bf16 (no amx_bf16 or avx512_bf16)")


def test_torch_held_at_avx2_by_the_environment_is_seen():
    import subprocess
    import sys

    code = "from seq2seq.precision import held_below_avx512; print(held_below_avx512())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}).stdout
    assert out.strip() == "AVX2"


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse avx512f avx512_bf16 amx_tile", "bf16"),
    ("fpu sse avx512f amx_bf16", "bf16"),
    ("fpu sse avx2 avx512f avx512bw", "fp32"),
])
def test_auto_without_torch_probes_reads_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(prec, "CPUINFO", cpuinfo)
    resolved, why = prec.resolve_precision("auto", CPU)
    assert resolved == expected
    assert why.startswith("auto: the CPU computes bf16 natively (cpuinfo: ") == (expected == "bf16")


def test_auto_on_a_gpu_is_bf16_where_supported(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert prec.resolve_precision("auto", cuda) == ("bf16", "auto: the GPU supports bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert prec.resolve_precision("auto", cuda)[0] == "fp32"
    assert prec.resolve_precision("fp16", cuda) == ("fp16", "as asked")


def test_the_step_says_once_what_auto_became(monkeypatch, capsys, fp32_gemm):
    fp32_gemm("blas")
    mock_torch_probes(monkeypatch, False, True)
    assert autocast_dtype("auto", CPU) is torch.bfloat16
    assert capsys.readouterr().err.splitlines() == [
        "note: train.precision=auto: training in bf16 (auto: the CPU computes bf16 natively "
        "(torch: avx512_bf16))"]
    mock_torch_probes(monkeypatch, False, False)
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("fp16", CPU) is None  # no grad scaler on a CPU
    assert capsys.readouterr().err.splitlines() == [
        "note: train.precision=auto: training in fp32 (auto: the CPU has no native bf16 (no "
        "amx_bf16 or avx512_bf16))",
        "note: train.precision=fp16: training in fp32 (fp16 applies on a GPU only)"]
    fp32_gemm("onednn")  # fp32 by oneDNN is said too
    assert autocast_dtype("fp32", CPU) is None
    assert capsys.readouterr().err.splitlines() == [
        "note: fp32 matrix products by oneDNN (SEQ2SEQ_FP32_GEMM=onednn)"]


def loss_and_gradients(model, dtype, data):
    """The eager step's loss (logits to fp32 before the cross-entropy) and its gradients."""
    src, src_lens, trg_in, trg_out = data
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(src, src_lens, trg_in)
    loss = F.cross_entropy(logits.float().flatten(0, 1), trg_out.flatten(), ignore_index=PAD,
                           reduction="sum", label_smoothing=0.1) / trg_out.numel()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


# Tolerances (measured on this model: loss within 1e-5, whole gradient within 0.4 %, each
# parameter within 1.5 %): bf16 keeps 8 bits of mantissa, about 0.4 % per rounding.
LOSS_RTOL, GRAD_RTOL, PARAM_RTOL = 1e-3, 0.02, 0.05


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("decoder", ["bahdanau", "luong"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_a_bf16_step_agrees_with_fp32(cell, decoder, packed):
    model = make(dataclasses.replace(tiny(cell, decoder=decoder), dropout=0.0))
    model.encoder.packed = packed
    data = batch([7, 5, 6, 3], trg_len=8)
    rnn_dtypes = []
    # The encoder's outputs (which come from its RNN: in training on a CPU it steps the cells
    # itself, models/cells.py), and the decoder RNN module's where it is called (luong).
    for module in (model.encoder, model.decoder.rnn):
        # out[0]: enc_out, or the RNN module's output; .data is the values of either.
        module.register_forward_hook(lambda m, args, out: rnn_dtypes.append(out[0].data.dtype))
    loss32, grads32 = loss_and_gradients(model, None, data)
    assert rnn_dtypes and set(rnn_dtypes) == {torch.float32}
    rnn_dtypes.clear()
    loss16, grads16 = loss_and_gradients(model, torch.bfloat16, data)
    assert rnn_dtypes and set(rnn_dtypes) == {torch.bfloat16}
    assert abs(loss16 - loss32) <= LOSS_RTOL * loss32
    # fp32 master weights get fp32 gradients through the bf16 copies.
    assert all(g.dtype == torch.float32 for g in grads16.values())
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[name].flatten() for name in grads32])
    assert (flat16 - flat32).norm() <= GRAD_RTOL * flat32.norm()
    # Per parameter, relative to its own norm, or to 1 % of the largest for parameters whose
    # gradient is nearly zero (a key bias under dot-product-like scores).
    floor = 0.01 * max(g.norm() for g in grads32.values())
    for name, g32 in grads32.items():
        assert (grads16[name] - g32).norm() <= PARAM_RTOL * max(g32.norm(), floor), name


def train_to(tmp_path, steps: int, precision: str) -> dict:
    """Train (or resume) the tiny run under ``tmp_path`` to ``steps``; its last checkpoint."""
    from seq2seq.checkpoint import load_checkpoint
    from seq2seq.config import recipe_from_dict
    from seq2seq.training.trainer import fit
    from tests.conftest import tiny_tree

    fit(recipe_from_dict(tiny_tree(str(tmp_path / "run"),
                                   train={"max_steps": steps, "precision": precision})))
    return load_checkpoint(tmp_path / "run" / "last.pt")


def test_a_resume_in_another_precision_says_so(tmp_path, capfd, monkeypatch):
    """auto resolves on each machine: a run resumed where it resolves otherwise says so."""
    import seq2seq.precision as precision_module

    monkeypatch.setattr(precision_module, "cpu_native_bf16", lambda: "torch: avx512_bf16")
    assert train_to(tmp_path, 2, "auto")["precision"] == "bf16"
    monkeypatch.setattr(precision_module, "cpu_native_bf16", lambda: None)
    capfd.readouterr()
    checkpoint = train_to(tmp_path, 3, "auto")
    err = capfd.readouterr().err
    assert ("note: this run computed in bf16 up to its checkpoint and continues in fp32 "
            "(train.precision=auto on this machine)") in err
    assert checkpoint["precision"] == "fp32"


def test_a_resume_on_other_fp32_products_says_so(tmp_path, capfd, fp32_gemm):
    """SEQ2SEQ_FP32_GEMM (or another CPU) can change where fp32 products run: said on resume."""
    fp32_gemm("blas")
    assert train_to(tmp_path, 2, "fp32")["products"] == "blas"
    fp32_gemm("onednn")
    capfd.readouterr()
    checkpoint = train_to(tmp_path, 3, "fp32")
    err = capfd.readouterr().err
    assert ("note: this run's fp32 products ran on blas up to its checkpoint and continue on "
            "onednn (SEQ2SEQ_FP32_GEMM on this machine: SEQ2SEQ_FP32_GEMM=onednn)") in err
    assert checkpoint["products"] == "onednn"
    capfd.readouterr()
    train_to(tmp_path, 4, "fp32")  # the same products again: nothing said
    assert "fp32 products ran on" not in capfd.readouterr().err
