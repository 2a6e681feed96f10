"""The training loss fused with the output layer: label-smoothed cross-entropy over ``W h + b``.

Computed as written, the loss makes a ``(N, V)`` logits tensor and then walks it many times:
the cast to fp32, ``log_softmax``, the smoothing term, and in backward a zero-filled gradient,
the sum of the two terms' gradients, ``log_softmax``'s backward and the cast back. At
``N = 4096`` target tokens and ``V = 7000`` these passes cost as much on a CPU as the output
layer's three matmuls. :func:`linear_cross_entropy` instead (as Liger-Kernel's fused linear
cross-entropy does on GPUs):

- drops the rows whose target is padding before the output layer (they add nothing);
- takes the rows in chunks small enough to stay in cache, and for each chunk computes the
  logits, the loss and at once the gradient of the loss with respect to the logits,
  ``softmax(x) - (1 - eps) onehot(y) - eps / V``, in fp32;
- multiplies that gradient back into the gradients of the hidden states, the weight and the
  bias, so backward only scales them by the incoming gradient.

On a CPU, each chunk's softmax passes are one C kernel that takes a row at a time through the
L1 cache (:func:`seq2seq.native.cross_entropy_rows`) where the machine can build it, and torch
element-wise kernels otherwise.

It is the same function as ``F.cross_entropy(F.linear(h, W, b).float(), y, ignore_index=PAD,
reduction="sum", label_smoothing=eps)``: logits in the dtype of ``h`` (bf16 under autocast),
softmax statistics and the loss in fp32, the weight's gradient accumulated in fp32 inside one
matmul and rounded once, as the unfused backward does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq import native
from seq2seq.models.gemm import (
    bucket_rows,
    bucket_size,
    linear,
    pads_rows,
    product,
    uses_onednn,
    weight_grad,
)
from seq2seq.tokenizer import PAD

# Logits per chunk: 2^22 fp32 values are 16 MiB, within a CPU's last-level cache; a GPU
# gains from larger chunks.
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}


_WORKSPACE: dict[torch.dtype, torch.Tensor] = {}


def workspace(numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` uninitialised elements of ``like``'s dtype and device, for the ``(N, V)``
    logits and gradients of one forward; on a CPU, the same memory from one call to the next.

    At ``de-en.gru``'s size they are 57 MB in bf16 (115 in fp32): above glibc's largest mmap
    threshold (32 MB), so each fresh allocation is new pages, and touching them costs page
    faults (12.7 ms against 1.6 for the same fill of reused memory, on the Xeon with AMX). The
    loss's forward is done with them before it returns (nothing it saves points into them),
    so the next call can reuse them. The memory, the largest asked for so far, stays held.
    """
    if like.device.type != "cpu":
        return like.new_empty(numel)
    buffer = _WORKSPACE.get(like.dtype)
    if buffer is None or buffer.numel() < numel:
        _WORKSPACE.pop(like.dtype, None)  # freed before the larger one is made
        buffer = _WORKSPACE[like.dtype] = like.new_empty(numel)
    return buffer[:numel]


def linear_cross_entropy(hidden: torch.Tensor, output: nn.Linear, target: torch.Tensor,
                         smoothing: float) -> torch.Tensor:
    """Summed label-smoothed cross-entropy of ``output(hidden)`` against ``target``.

    Args:
        hidden: ``(N, H)`` the inputs of the output layer (the dtype the logits are made in).
        output: the output layer ``(V, H)`` (its weight may be tied to an embedding).
        target: ``(N,)`` target ids; PAD rows are ignored.
        smoothing: label smoothing ``eps`` in [0, 1).

    Returns:
        The fp32 scalar loss; its backward reaches ``hidden``, ``output.weight`` and
        ``output.bias``.
    """
    chunk = max(1, CHUNK_ELEMENTS.get(hidden.device.type, 2**22) // output.out_features)
    return _LinearCrossEntropy.apply(hidden, output.weight, output.bias, target, smoothing,
                                     chunk, pads_rows(hidden, output.weight))


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and every gradient; backward scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, target: torch.Tensor, smoothing: float,
                chunk: int, pad: bool) -> torch.Tensor:
        dtype, vocab = hidden.dtype, weight.size(0)
        with torch.autocast(hidden.device.type, enabled=False):
            keep = (target != PAD).nonzero().squeeze(1)
            labels = target.index_select(0, keep)
            count = keep.numel()
            # pad: every product at bucketed rows (bucket_rows): whole chunks of a bucketed
            # size (the chunk rounded down to one), zero rows after the real ones, enough for
            # the last chunk's bucket too (bucket_rows(count) is, for every count to 20,000
            # and chunk sizes tried); their gradients are zeroed.
            if pad:
                chunk = bucket_size(chunk, 8, down=True)
            size = count if not pad else max(
                bucket_rows(count), count - count % chunk + bucket_rows(count % chunk))
            rows = hidden.new_empty((size, hidden.size(1)))
            rows[count:].zero_()
            torch.index_select(hidden, 0, keep, out=rows[:count])
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
            loss = hidden.new_zeros((), dtype=torch.float32)
            # Each chunk's logits are made in place of, then overwritten by, their gradient;
            # the weight's gradient is one matmul at the end (summed in fp32 inside it).
            grads = workspace(size * vocab, hidden).view(size, vocab)
            onednn = uses_onednn(rows, w)
            rows_kernel = native.usable(grads)
            wide = None if dtype == torch.float32 or rows_kernel else \
                hidden.new_empty((min(chunk, count), vocab), dtype=torch.float32)
            for start in range(0, count, chunk):
                real = min(chunk, count - start)
                run = bucket_rows(real) if pad else real  # rows multiplied
                h, y = rows[start:start + run], labels[start:start + real]
                out = grads[start:start + run]
                if onednn:  # it writes a new tensor: copied in place of the logits
                    out.copy_(product(h, w, b))
                elif b is None:
                    torch.mm(h, w.t(), out=out)
                else:
                    torch.addmm(b, h, w.t(), out=out)
                out = out[:real]
                if rows_kernel:  # the same passes, each row in one pass through the cache
                    loss += native.cross_entropy_rows(out, y, smoothing, grad_bias).sum()
                    continue
                x = out if wide is None else wide[:real].copy_(out)
                picked = x.gather(1, y.unsqueeze(1)).squeeze(1)
                total = x.sum(dim=1)
                peak = x.amax(dim=1, keepdim=True)
                probs = x.sub_(peak).exp_()  # the logits are spent: softmax in place
                norm = probs.sum(dim=1, keepdim=True)
                lse = (norm.log() + peak).squeeze(1)
                # -(1-eps) log p_y - eps/V sum_c log p_c, with log p_c = x_c - lse
                loss += (lse - (1 - smoothing) * picked - smoothing / vocab * total).sum()
                grad = probs.div_(norm).sub_(smoothing / vocab)
                grad.scatter_add_(1, y.unsqueeze(1), grad.new_full((y.numel(), 1),
                                                                   smoothing - 1))
                if grad_bias is not None:
                    grad_bias += grad.sum(dim=0)
                if wide is not None:
                    out.copy_(grad)
            grads[count:].zero_()  # padding rows: their logits are no gradient
            grad_rows = product(grads, w.t())[:count]  # grads @ w
            grad_weight = weight_grad(grads, rows).float()  # grads^T @ rows
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, keep, grad_rows)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.float()
        return (grad_hidden.float().mul_(scale).to(grad_hidden.dtype),
                (grad_weight * scale).to(ctx.weight_dtype),
                None if grad_bias is None else (grad_bias * scale).to(ctx.weight_dtype),
                None, None, None, None)


def rdrop_cross_entropy(hidden: torch.Tensor, output: nn.Linear, target: torch.Tensor,
                        smoothing: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R-Drop's objective (Liang et al. 2021) over two dropout passes of the same tokens.

    The paper's loss for a token is ``CE_1 + CE_2 + alpha / 2 (KL(p_1||p_2) + KL(p_2||p_1))``;
    this is half of it, so that with ``alpha = 0`` it is the plain loss averaged over the two
    passes and the learning rate keeps its meaning, while ``alpha`` weighs the KL term against
    the cross-entropy as in the paper. Computed unfused (the KL needs both passes' whole
    distributions): fp32 softmax statistics over logits made in the dtype of ``hidden``.

    Args:
        hidden: ``(2N, H)`` output-layer inputs; rows ``i`` and ``N + i`` are the same target
            token seen through two different dropout masks.
        output: the output layer ``(V, H)``.
        target: ``(N,)`` target ids of each pair of rows; PAD rows are ignored.
        smoothing: label smoothing of the cross-entropy.
        alpha: the weight of the symmetric KL.

    Returns:
        ``(objective, cross_entropy)``, fp32 sums over the tokens: the summed objective to
        minimise, and the two passes' mean label-smoothed cross-entropy (for the log).
    """
    n = target.size(0)
    if hidden.size(0) != 2 * n:
        raise ValueError(f"R-Drop needs 2 x {n} rows of features, got {hidden.size(0)}")
    keep = (target != PAD).nonzero().squeeze(1)
    rows = torch.cat([hidden[:n].index_select(0, keep), hidden[n:].index_select(0, keep)])
    labels = target.index_select(0, keep)
    with torch.autocast(hidden.device.type, enabled=False):
        weight = output.weight.to(rows.dtype)
        bias = None if output.bias is None else output.bias.to(rows.dtype)
        logp = linear(rows, weight, bias).float().log_softmax(dim=-1)
    cross_entropy = F.nll_loss(logp, labels.repeat(2), reduction="sum") * (1 - smoothing) \
        - logp.mean(dim=-1).sum() * smoothing
    logp_1, logp_2 = logp.chunk(2)
    symmetric_kl = ((logp_1.exp() - logp_2.exp()) * (logp_1 - logp_2)).sum()
    return (cross_entropy + alpha / 2 * symmetric_kl) / 2, cross_entropy.detach() / 2
