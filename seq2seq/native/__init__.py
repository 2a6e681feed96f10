"""Fused CPU row kernels (``rows.c``), built on first use with the machine's C compiler.

On a CPU, the softmax passes over ``(rows, vocabulary)`` logits are many whole-tensor torch
kernels in a row: a bf16-to-fp32 cast, a maximum, an exponential, a sum, a division, each a
walk over tens of megabytes, and torch's bf16 element-wise kernels are no faster than its fp32
ones. ``rows.c`` does each row in one pass that stays in the L1 cache:

- :func:`log_softmax`: decoding's ``log_softmax(logits.float())``, and beam search's
  renormalisation over each sentence's own shortlist (the other targets taken as -inf);
- :func:`cross_entropy_rows`: the training loss's per-row label-smoothed cross-entropy and its
  gradient, written over the logits (:mod:`seq2seq.training.loss`);
- :func:`additive_scores`: a decoder step's Bahdanau attention scores, without the
  ``(n, T, S, A)`` hidden layer that torch makes and walks three times
  (:mod:`seq2seq.models.attention`);
- :func:`quantize_rows` and :func:`scale_rows`: the passes before and after an int8 product
  (:mod:`seq2seq.quantize`), six and three of torch's in one each;
- :func:`gru_update`: a GRU step's gate equations in inference (:mod:`seq2seq.models.cells`),
  nine of torch's kernels in one pass; :func:`gru_train` and :func:`gru_train_backward` the
  same in training, and their gradients;
- :func:`tanh`: decoding's fp32 ``tanh`` (:func:`seq2seq.models.cells.tanh`), on both threads.

The library is compiled (:mod:`seq2seq.native.build`) once per source, compiler and CPU
(``-march=native``) into
``$SEQ2SEQ_CACHE`` (default ``~/.cache/seq2seq``), written under a temporary name and renamed,
so processes that build it at once never load a half-written file. Where no compiler works,
or with ``SEQ2SEQ_NATIVE=0``, the callers keep their torch code: the same functions up to
rounding (the tests hold both paths to the same tolerance).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from seq2seq.native.build import (  # noqa: F401  (the package's interface)
    ENV,
    FLAGS,
    SOURCE,
    build,
    cache_dir,
    compiler,
    library,
    wanted,
)

FP32, BF16 = 0, 1  # rows.c's dtype codes
DTYPES = {torch.float32: FP32, torch.bfloat16: BF16}

_work = threading.local()  # each thread's scratch buffer: :func:`scratch`


def scratch(elements: int) -> torch.Tensor:
    """An fp32 work buffer of at least ``elements`` for one kernel call, kept per thread and
    reused by the next call rather than allocated afresh.

    A scratch of one decoder step's attention is ``threads * (S + 2) * A`` floats, 2.5 MB for
    a source of 4,900 tokens. Allocated and freed at every step, between the small tensors a
    decoder keeps per step, it left glibc's heap in holes the next one did not fit: validating
    or decoding one long sentence grew memory with its source length times its steps (2.2 GB
    for 4,500 steps, against 0.3 GB with the buffer kept).
    """
    buffer = getattr(_work, "buffer", None)
    if buffer is None or buffer.numel() < elements:
        # grown by a quarter at least, so that slowly growing sizes reallocate rarely
        size = max(elements, 0 if buffer is None else buffer.numel() * 5 // 4)
        buffer = _work.buffer = torch.empty(max(size, 1), dtype=torch.float32)
    return buffer


def available(*tensors: torch.Tensor, grad: bool = False) -> bool:
    """Whether the kernels can work on ``tensors``: fp32 or bf16 CPU tensors, outside
    ``torch.compile`` (the kernels read and write plain memory) and, unless ``grad``, outside
    autograd; the library built."""
    return (all(x.device.type == "cpu" and x.dtype in DTYPES and (grad or not x.requires_grad)
                for x in tensors)
            and not torch.compiler.is_compiling() and library() is not None)


def usable(x: torch.Tensor) -> bool:
    """Whether the row kernels can take ``x``: non-empty rows, each contiguous
    (:func:`available`)."""
    return (x.dim() == 2 and x.numel() > 0 and (x.size(1) == 1 or x.stride(1) == 1)
            and available(x))


def log_softmax(x: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.log_softmax(x.float(), dim=-1)``, with the elements where ``blocked`` (a bool
    tensor of ``x``'s shape, or None) is True taken as -inf: in one pass per row where the
    kernels can take ``x`` (:func:`usable`), else by torch."""
    mask = None
    if blocked is not None:
        if blocked.shape != x.shape or blocked.dtype != torch.bool:
            raise ValueError(f"blocked: a bool tensor of shape {tuple(x.shape)} expected, "
                             f"got {blocked.dtype} {tuple(blocked.shape)}")
        mask = blocked.contiguous()
    if not usable(x) or (mask is not None and mask.device.type != "cpu"):
        x = x.float()
        return torch.log_softmax(x if mask is None else x.masked_fill(mask, float("-inf")),
                                 dim=-1)
    out = torch.empty(x.shape, dtype=torch.float32)
    library().log_softmax_rows(x.data_ptr(), DTYPES[x.dtype], x.stride(0), x.size(0),
                               x.size(1), None if mask is None else mask.data_ptr(),
                               out.data_ptr(), torch.get_num_threads())
    return out


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, smoothing: float,
                       bias_grad: torch.Tensor | None) -> torch.Tensor:
    """Per-row label-smoothed cross-entropy of ``(R, V)`` logits (:func:`usable`), and its
    gradient, ``softmax - eps / V - (1 - eps) onehot(target)``, written over them.

    Args:
        target: ``(R,)`` int64 class ids.
        bias_grad: ``(V,)`` fp32, to which the gradient's column sums are added; None: not
            summed.

    Returns:
        ``(R,)`` fp32 losses.
    """
    rows, vocab = logits.shape
    threads = torch.get_num_threads()
    target = target.to(torch.int64).contiguous()
    if rows and not 0 <= int(target.min()) <= int(target.max()) < vocab:  # as gather refuses
        raise IndexError(f"cross_entropy_rows: a target id outside [0, {vocab})")
    loss = torch.empty(rows, dtype=torch.float32)
    work = scratch(threads * vocab)
    partial = None if bias_grad is None else torch.zeros((threads, vocab), dtype=torch.float32)
    library().cross_entropy_rows(
        logits.data_ptr(), DTYPES[logits.dtype], logits.stride(0), rows, vocab,
        target.data_ptr(), smoothing, loss.data_ptr(), work.data_ptr(),
        None if partial is None else partial.data_ptr(), threads)
    if partial is not None:
        bias_grad += partial.sum(dim=0)
    return loss


def additive_scores(query: torch.Tensor, keys: torch.Tensor, energy: torch.Tensor,
                    keys_grad: Callable[[], torch.Tensor] | None = None
                    ) -> torch.Tensor | None:
    """``2 v^T sigmoid(query + keys) - sum(v)`` for every query against every key:
    ``(n, T, A)`` queries and ``(n, S, A)`` keys -> ``(n, T, S)`` scores in their dtype, with
    a backward (:class:`AdditiveScores`) where an input requires grad. None where the kernels
    cannot take them (another dtype or device, no library).

    Args:
        energy: ``(1, A)`` the energy layer's weight ``v``, in any float dtype (an fp32 master
            weight under autocast): cast to the queries' dtype, its gradient returned in its
            own.
        keys_grad: called in backward for a contiguous fp32 ``(n, S, A)`` tensor, to which
            the keys' gradient is then added and none returned (the steps of a decoder share
            their keys: :class:`seq2seq.models.step_sources.StepSources`); None: the
            gradient is returned as usual.
    """
    if (query.dim() != 3 or keys.dim() != 3 or keys.size(0) != query.size(0)
            or keys.size(2) != query.size(2)  # torch's code says what is wrong with them
            or query.dtype != keys.dtype or energy.numel() != query.size(-1) or query.numel() == 0
            or keys.numel() == 0 or not available(query, keys, grad=True)
            or energy.device.type != "cpu"):
        return None
    return AdditiveScores.apply(query, keys, energy, keys_grad)


class AdditiveScores(torch.autograd.Function):
    """:func:`additive_scores` with its gradients, the hidden layer computed again in backward
    rather than kept (a training step's ``(B, 1, S, A)`` tensor)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, keys: torch.Tensor, energy: torch.Tensor,
                keys_grad: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        n, queries, size = query.shape
        sources = keys.size(1)
        threads = torch.get_num_threads()
        query, keys = query.detach().contiguous(), keys.detach().contiguous()
        v = energy.detach().to(query.dtype).contiguous()
        out = query.new_empty((n, queries, sources))
        work = scratch(threads * (sources + 2) * size)
        library().additive_scores(query.data_ptr(), keys.data_ptr(), v.data_ptr(),
                                  DTYPES[query.dtype], n, queries, sources, size,
                                  out.data_ptr(), work.data_ptr(), threads)
        ctx.save_for_backward(query, keys, v)
        ctx.energy_dtype, ctx.energy_shape = energy.dtype, energy.shape
        ctx.keys_grad = keys_grad
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, keys, v = ctx.saved_tensors
        n, queries, size = query.shape
        sources = keys.size(1)
        threads = torch.get_num_threads()
        grad = grad.to(query.dtype).contiguous()
        grad_query = torch.empty_like(query)
        if ctx.keys_grad is None:
            grad_keys = torch.empty_like(keys)
        else:
            grad_keys = ctx.keys_grad()
            if grad_keys.shape != keys.shape or grad_keys.dtype != torch.float32 \
                    or not grad_keys.is_contiguous():
                raise ValueError(f"additive_scores: keys_grad gave {grad_keys.dtype} "
                                 f"{tuple(grad_keys.shape)}, not contiguous fp32 "
                                 f"{tuple(keys.shape)}")
        grad_energy = torch.zeros((threads, size), dtype=torch.float32)
        work = scratch(threads * (2 * sources + 3) * size)
        library().additive_scores_backward(
            query.data_ptr(), keys.data_ptr(), v.data_ptr(), grad.data_ptr(),
            DTYPES[query.dtype], n, queries, sources, size, grad_query.data_ptr(),
            grad_keys.data_ptr(), int(ctx.keys_grad is not None), grad_energy.data_ptr(),
            work.data_ptr(), threads)
        grad_energy = grad_energy.sum(dim=0).view(ctx.energy_shape).to(ctx.energy_dtype)
        return (grad_query, grad_keys if ctx.keys_grad is None else None, grad_energy, None)


def quantize_rows(x: torch.Tensor, qmax: float, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`seq2seq.quantize.quantize_rows` of fp32 ``x`` ``(N, K)`` (``dtype`` int8 or
    float32) in one pass per row, the same values; None where the kernels cannot take ``x``
    (:func:`usable`)."""
    if x.dtype != torch.float32 or dtype not in (torch.int8, torch.float32) or not usable(x):
        return None
    out = torch.empty(x.shape, dtype=dtype)
    scale = torch.empty((x.size(0), 1), dtype=torch.float32)
    library().quantize_rows(x.data_ptr(), x.stride(0), x.size(0), x.size(1), qmax,
                            int(dtype == torch.int8), out.data_ptr(), scale.data_ptr(),
                            torch.get_num_threads())
    return out, scale


def scale_rows(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor | None:
    """``acc.float() * row_scale * col_scale (+ bias)``, rounded after each operation as in
    torch, in one pass: the output of an int8 product from its ``(N, M)`` int32 sums (into a
    new tensor) or fp32 ones (in place). ``row_scale`` ``(N, 1)``, ``col_scale`` ``(1, M)``
    and ``bias`` ``(M,)`` are fp32. None where the kernels cannot take them."""
    tensors = [acc, row_scale, col_scale] + ([] if bias is None else [bias])
    if (acc.dim() != 2 or acc.dtype not in (torch.int32, torch.float32) or acc.numel() == 0
            or any(t.dtype != torch.float32 for t in tensors[1:])
            or row_scale.numel() != acc.size(0)
            or any(t.numel() != acc.size(1) for t in tensors[2:])
            or not all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
                       for t in tensors)
            or torch.compiler.is_compiling() or library() is None):
        return None
    out = acc if acc.dtype == torch.float32 else torch.empty(acc.shape, dtype=torch.float32)
    library().scale_rows(acc.data_ptr(), int(acc.dtype == torch.int32), acc.size(0),
                         acc.size(1), row_scale.data_ptr(), col_scale.data_ptr(),
                         None if bias is None else bias.data_ptr(), out.data_ptr(),
                         torch.get_num_threads())
    return out


def gru_update(gates: torch.Tensor, hidden: torch.Tensor, h: torch.Tensor
               ) -> torch.Tensor | None:
    """A GRU step's new state from ``(B, 3H)`` gate shares and ``(B, H)`` ``h``, fp32, outside
    autograd (:func:`seq2seq.models.cells.cell_update`), in one pass per row; None where the
    kernels cannot take them."""
    if not (gates.dim() == hidden.dim() == h.dim() == 2 and gates.shape == hidden.shape
            and gates.size(0) == h.size(0) and gates.size(1) == 3 * h.size(1) and h.numel()
            and all(t.dtype == torch.float32 and t.stride(1) == 1 for t in (gates, hidden, h))
            and available(gates, hidden, h)):
        return None
    out = torch.empty(h.shape, dtype=torch.float32)
    library().gru_update(gates.data_ptr(), gates.stride(0), hidden.data_ptr(), hidden.stride(0),
                         h.data_ptr(), h.stride(0), h.size(0), h.size(1), out.data_ptr(),
                         torch.get_num_threads())
    return out


def gru_train(gates: torch.Tensor, hidden: torch.Tensor, h: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A GRU step's new state from ``(B, 3H)`` gate shares and ``(B, H)`` ``h`` in training
    (:class:`seq2seq.models.cells._GRUUpdate`), with what its backward needs: ``(out, rz,
    n)``, the state, the reset and update gates ``(B, 2H)`` and the candidate ``(B, H)``, in
    the inputs' dtype. None where the kernels cannot take them (all three in one dtype, rows
    contiguous)."""
    if not (gates.dim() == hidden.dim() == h.dim() == 2 and gates.shape == hidden.shape
            and gates.size(0) == h.size(0) and gates.size(1) == 3 * h.size(1) and h.numel()
            and gates.dtype == hidden.dtype == h.dtype
            and all(t.stride(1) == 1 for t in (gates, hidden, h))
            and available(gates, hidden, h, grad=True)):
        return None
    rows, size = h.shape
    threads = torch.get_num_threads()
    out, candidate = h.new_empty((rows, size)), h.new_empty((rows, size))
    rz = h.new_empty((rows, 2 * size))
    work = scratch(threads * 11 * size if h.dtype == torch.bfloat16 else 0)
    library().gru_train_forward(gates.data_ptr(), gates.stride(0), hidden.data_ptr(),
                                hidden.stride(0), h.data_ptr(), h.stride(0), DTYPES[h.dtype],
                                rows, size, out.data_ptr(), rz.data_ptr(), candidate.data_ptr(),
                                work.data_ptr(), threads)
    return out, rz, candidate


def gru_train_backward(grad: torch.Tensor, rz: torch.Tensor, candidate: torch.Tensor,
                       hidden: torch.Tensor, h: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the gates, ``hidden`` and ``h`` of :func:`gru_train`, given ``grad``
    ``(B, H)`` of its output (cast to the inputs' dtype) and what it kept."""
    rows, size = h.shape
    threads = torch.get_num_threads()
    grad = grad.to(h.dtype).contiguous()
    grad_gates, grad_hidden = h.new_empty((rows, 3 * size)), h.new_empty((rows, 3 * size))
    grad_h = h.new_empty((rows, size))
    work = scratch(threads * 13 * size if h.dtype == torch.bfloat16 else 0)
    library().gru_train_backward(grad.data_ptr(), rz.data_ptr(), candidate.data_ptr(),
                                 hidden.data_ptr(), hidden.stride(0), h.data_ptr(), h.stride(0),
                                 DTYPES[h.dtype], rows, size, grad_gates.data_ptr(),
                                 grad_hidden.data_ptr(), grad_h.data_ptr(), work.data_ptr(),
                                 threads)
    return grad_gates, grad_hidden, grad_h


def tanh(x: torch.Tensor) -> torch.Tensor | None:
    """``tanh`` of a contiguous fp32 CPU tensor outside autograd, within 1.6e-7 absolute of
    the exact one, into a new tensor; None where the kernels cannot take ``x``."""
    if x.dtype != torch.float32 or not x.is_contiguous() or not available(x):
        return None
    out = torch.empty(x.shape, dtype=torch.float32)
    if x.numel():
        library().tanh_values(x.data_ptr(), x.numel(), out.data_ptr(), torch.get_num_threads())
    return out
