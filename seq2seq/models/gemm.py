"""fp32 matrix products by oneDNN on CPUs where torch's BLAS leaves AVX-512 unused.

torch multiplies fp32 matrices on a CPU with MKL, which picks its kernels by the CPU's vendor:
on an AMD EPYC it runs its AVX2 code even where the CPU has AVX-512. oneDNN, which torch also
carries (it already does every bf16 product), picks by instruction set. Measured on a 2-core
AMD EPYC (Zen 5, cpu family 26), fp32, one thread: 2048 x 2048 x 2048 at 115 GFLOP/s by MKL
against 264 by oneDNN; two threads, the output layer's training products (4,096 rows, 512 ->
7,000) 168 / 135 / 134 ms (forward / input gradient / weight gradient) against 94 / 64 / 129 ms;
the same layer at beam search's 5 rows 0.54 ms against 0.09 ms with the weight packed once
(:mod:`seq2seq.models.packed`). With both held at AVX2 (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``, as on a CPU without AVX-512), training was level (2,592 and 2,526
against 2,582 and 2,656 target tokens/s for ``de-en.gru``) and beam search with the weights
packed 1.16x as fast (98.4 and 98.1 against 87.8 and 81.1 sentences/s).

:func:`fp32_backend` decides once per process, from ``SEQ2SEQ_FP32_GEMM``:

- ``auto`` (the default): oneDNN where torch runs AVX-512 kernels on a CPU that is not
  Intel's (MKL picks its best kernels on Intel CPUs), else torch's own products; on such a CPU
  with AVX2 only, decoding still multiplies by weights that oneDNN packs
  (:func:`fp32_packing`), since MKL trains faster there but decodes slower;
- ``onednn`` or ``blas``: as asked (``onednn`` falls back where torch lacks it).

:func:`linear` is ``F.linear`` with that choice, gradients included; every fp32 product of
training and decoding goes through it (or :func:`product`, without autograd). Both backends
compute in fp32 (no reduced-precision modes); their results differ by rounding only, and each
is deterministic, so a run resumes bitwise on the same backend.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from seq2seq.cpuinfo import cpu_field
from seq2seq.errors import Seq2SeqError

ENV = "SEQ2SEQ_FP32_GEMM"
CHOICES = ("auto", "onednn", "blas")


def onednn_available() -> bool:
    """Whether this torch has oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def choose_backend(choice: str, available: bool, capability: str, vendor: str
                   ) -> tuple[str, str]:
    """``(backend, why)``: "onednn" or "blas" for a ``SEQ2SEQ_FP32_GEMM`` value on a CPU with
    torch's ``capability`` ("AVX512", "AVX2", ...) made by ``vendor`` ("AuthenticAMD", ...)."""
    if choice not in CHOICES:
        raise Seq2SeqError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "blas":
        return "blas", f"{ENV}=blas"
    if not available:
        return "blas", "this torch has no oneDNN inner product"
    if choice == "onednn":
        return "onednn", f"{ENV}=onednn"
    if not capability.startswith(("AVX512", "AVX2")):
        return "blas", f"auto: torch runs {capability or 'no vector'} kernels on this CPU"
    if vendor == "GenuineIntel":
        return "blas", "auto: MKL picks the best kernels of Intel CPUs itself"
    cpu = vendor or "a CPU not known to be Intel"
    if capability.startswith("AVX512"):
        return "onednn", f"auto: {cpu} with AVX-512, where MKL runs AVX2 kernels"
    return "blas", (f"auto: {cpu} with AVX2, where MKL trains faster; decoding multiplies by "
                    "weights that oneDNN packs")


def choose_packing(choice: str, available: bool, capability: str, vendor: str) -> bool:
    """Whether decoding multiplies by fp32 weights that oneDNN packs once
    (:mod:`seq2seq.models.packed`), for the arguments of :func:`choose_backend`: where it
    picks oneDNN, and with ``auto`` on a CPU not Intel's with AVX2 only. There MKL's AVX2
    kernels train faster than oneDNN's (real Zen 3 EPYC, two threads, ``de-en.gru``: 1,613
    and 1,720 against 1,339 and 1,492 target tokens/s, two rounds of
    ``scripts/compare_peers.py``; 2048 x 2048 products 132 against 108 GFLOP/s), while
    beam search's products of a few rows run faster by oneDNN with the weights packed."""
    backend, _ = choose_backend(choice, available, capability, vendor)
    return backend == "onednn" or (
        choice == "auto" and available and capability.startswith("AVX2")
        and vendor != "GenuineIntel")


@functools.cache
def fp32_backend() -> tuple[str, str]:
    """``(backend, why)`` for this process's fp32 CPU products (see the module docstring).

    Raises:
        Seq2SeqError: ``SEQ2SEQ_FP32_GEMM`` is set to something else than auto, onednn or
            blas (the CLI asks before any command runs, so it is said in one line).
    """
    return choose_backend(*_machine())


@functools.cache
def fp32_packing() -> bool:
    """Whether decoding packs fp32 weights for oneDNN on this machine
    (:func:`choose_packing`)."""
    return choose_packing(*_machine())


def _machine() -> tuple[str, bool, str, str]:
    """:func:`choose_backend`'s arguments for this process."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    return (choice, onednn_available(), torch.backends.cpu.get_cpu_capability(),
            cpu_field("vendor_id"))


def _onednn_for(*tensors: torch.Tensor) -> bool:
    """Whether products of ``tensors`` go to oneDNN: fp32 CPU tensors, autocast off, backend
    "onednn", not inside ``torch.compile`` (a compiled graph picks its own kernels) nor under a
    Python dispatch mode (torch's FLOP counter, fake tensors: they read aten's products)."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode() and fp32_backend()[0] == "onednn")


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x W^T`` goes to oneDNN (:func:`_onednn_for`; empty products stay torch's)."""
    return x.numel() > 0 and weight.numel() > 0 and _onednn_for(x, weight)


def _gemm_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) as it is if it is row- or column-major without gaps, else a contiguous
    copy: oneDNN runs a slow reference kernel on a matrix whose rows are padded (a column
    slice of a wider one), measured 1.5 s for a product that takes 1 ms."""
    if t.is_contiguous() or t.t().is_contiguous():
        return t
    return t.contiguous()


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
            ) -> torch.Tensor:
    """``x W^T + b`` without autograd, by oneDNN where :func:`uses_onednn` says so, else by
    ``F.linear``. ``x`` is ``(..., in)``; ``weight`` ``(out, in)``, row- or column-major."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    rows = _gemm_layout(x.reshape(-1, x.size(-1)))
    out = torch.ops.mkldnn._linear_pointwise(rows, _gemm_layout(weight), bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.size(0))


def weight_grad(grads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``grads^T rows``: the gradient ``(out, in)`` of ``W`` in ``x W^T``, from the rows of the
    output's gradient ``(N, out)`` and of ``x`` ``(N, in)``.

    Through oneDNN it is computed as ``(rows^T grads)^T`` (column-major) when ``grads`` is the
    wider: oneDNN copies a column-major first operand to row-major but reads the second (the
    weight) in any layout, so the narrower matrix is the one copied. The same sums in the same
    order: measured bitwise equal, and for the output layer's 4,095 x 7,000 gradient (two
    threads, Zen 5) 71 ms against 136 (123 against 190 held at AVX2), whose copy alone cost 59.
    """
    if uses_onednn(rows, grads) and grads.size(1) > rows.size(1):
        return product(rows.t(), grads.t()).t()
    return product(grads.t(), rows.t())


class _Linear(torch.autograd.Function):
    """``F.linear`` by oneDNN, forward and backward (:func:`linear`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_rows = _gemm_layout(grad.reshape(-1, grad.size(-1)))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad W
            grad_x = product(grad_rows, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(grad_rows, _gemm_layout(x.reshape(-1, x.size(-1))))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def bucket_rows(rows: int) -> int:
    """The row count a training product that oneDNN makes on a CPU runs at (:func:`pads_rows`):
    ``rows`` up to 16, then the next of eight sizes per doubling (17 -> 18, 100 -> 104, 4,000
    -> 4,096), at most 1/8 more.

    oneDNN, which makes every bf16 product on a CPU, builds a kernel for each shape it meets
    (a few milliseconds each, longer the more rows) and keeps up to 1,024 of them. A training
    batch's products have rows that depend on its lengths (tokens in the batch, sentences
    still running at a step), so almost every batch made new kernels and the cache never
    settled: in 100 ``de-en.gru`` bf16 updates (Xeon with AMX, two threads) oneDNN made 2,774
    kernels for 2,174 shapes and spent 7.6 s on it (``ONEDNN_VERBOSE=2``).
    """
    return bucket_size(rows, 8)


def bucket_size(count: int, per_doubling: int, down: bool = False) -> int:
    """``count`` rounded up (``down``: down) to one of ``per_doubling`` (a power of two) sizes
    per doubling: counts up to ``2 * per_doubling`` as they are, else to a multiple of
    ``1 / per_doubling`` of the power of two below ``count``. oneDNN's kernels are made per
    shape, so the products whose rows vary keep to such sizes: the training products
    (:func:`bucket_rows`) and the searches' sentence counts (:func:`seq2seq.search.common.
    bucket`)."""
    if count <= 2 * per_doubling:
        return count
    unit = 1 << (count.bit_length() - per_doubling.bit_length())
    return count // unit * unit if down else -(-count // unit) * unit


def pads_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x W^T`` runs at :func:`bucket_rows` rows: a product that oneDNN makes on a
    CPU (bf16 under autocast or of bf16 ``x``, or fp32 where :func:`uses_onednn`) with
    gradients enabled, of a weight with at least 64 outputs (below that, the copies padding
    makes cost as much as the product), outside ``torch.compile`` and Python dispatch modes.
    fp32 products by MKL build no kernels per shape and are left alone."""
    if (x.device.type != "cpu" or not torch.is_grad_enabled() or weight.size(0) < 64
            or torch.compiler.is_compiling() or is_in_torch_dispatch_mode()):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or uses_onednn(x, weight)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` ``(m, n)`` with zero rows after its own, to ``rows`` rows (``x`` if it has them)."""
    return x if x.size(0) >= rows else F.pad(x, (0, 0, 0, rows - x.size(0)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by oneDNN forward and backward where :func:`uses_onednn`
    says so (fp32 on a CPU where it is the faster), else ``F.linear`` itself (autocast, GPUs,
    other dtypes); training products that oneDNN makes on a CPU at :func:`bucket_rows` rows
    (zero rows added, their results dropped), so that their backward's are bucketed too."""
    if pads_rows(x, weight):
        rows = x.numel() // x.size(-1)
        if bucket_rows(rows) != rows:
            if torch.is_autocast_enabled("cpu"):  # cast before the padding copy, not after
                x = x.to(torch.get_autocast_dtype("cpu"))
            flat = pad_rows(x.reshape(rows, x.size(-1)), bucket_rows(rows))
            return _linear(flat, weight, bias)[:rows].view(*x.shape[:-1], weight.size(0))
    return _linear(x, weight, bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear` at the rows ``x`` has."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, through :func:`linear` when ``layer`` is a plain ``nn.Linear`` (an int8
    or packed layer computes as it does)."""
    if type(layer) is nn.Linear:
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def step_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight``, made contiguous once when oneDNN will multiply by it at every step (a
    column block of a wider weight would otherwise be copied at each product)."""
    return weight.contiguous() if _onednn_for(weight) else weight
