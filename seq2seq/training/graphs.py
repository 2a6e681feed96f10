"""Static-shape training steps, captured in CUDA graphs on the GPU (``train.cuda_graphs``).

A recurrent training step is thousands of small kernels, one decoder step after another; on a
GPU their launches, not the arithmetic, set the pace. A CUDA graph records the kernels of one
step once and replays them with a single launch. A graph fixes every shape and allows no host
synchronisation, so here:

- batches are padded to bucket shapes ``(B, S, T)`` (rows to a multiple of ``ROW_MULTIPLE``,
  steps to a multiple of ``STEP_MULTIPLE``), one forward-backward graph per shape, all graphs in
  one memory pool. Padding rows hold one EOS source token and no target; padding steps are PAD.
  Neither reaches the loss, so the gradients are those of the unpadded batch;
- the encoder runs unpacked (:attr:`Encoder.packed` False: packing needs lengths on the host);
- the loss normaliser and the learning rate are device tensors, filled before each replay;
- the update (clipping, non-finite check, Adam) is a second graph: fused Adam skips a
  non-finite update on the device (``found_inf``), and device counters of skipped updates are
  read by the host only when it logs or saves.

Gradients live in one flat buffer (each parameter's ``.grad`` a view of it): each
forward-backward graph adds into it, the update graph reads and zeroes it, so gradient
accumulation is several forward-backward replays, then one update. With several processes the
flat buffer is summed over ranks between the two (one all-reduce, outside the graphs: DDP's
hooks cannot be recorded), and the loss is normalised by the global target-token count as in
the plain path. Without ``capture`` (on the CPU, or to compare) the same functions run eagerly.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F

from seq2seq import distributed as dist
from seq2seq.data.batching import Batch
from seq2seq.models.seq2seq import Seq2Seq
from seq2seq.tokenizer import EOS, PAD

ROW_MULTIPLE = 32
STEP_MULTIPLE = 8
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuDNN and autograd set-up)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_shape(batch: Batch) -> tuple[int, int, int]:
    """The ``(B, S, T)`` bucket a batch is padded to."""
    rows, src_steps = batch.src.shape
    return (round_up(rows, ROW_MULTIPLE), round_up(src_steps, STEP_MULTIPLE),
            round_up(batch.trg_in.size(1), STEP_MULTIPLE))


def pad_batch(batch: Batch, shape: tuple[int, int, int]) -> Batch:
    """``batch`` padded to ``shape``; padding rows are a one-token source (EOS), no target.

    A padding row needs one real source token: with none, its attention would be a softmax
    over nothing (NaN), and NaN times a zero gradient is still NaN.
    """
    rows, src_steps, trg_steps = shape
    n, s = batch.src.shape
    t = batch.trg_in.size(1)
    src = batch.src.new_full((rows, src_steps), PAD)
    src[:n, :s] = batch.src
    src[n:, 0] = EOS
    src_lens = batch.src_lens.new_ones(rows)
    src_lens[:n] = batch.src_lens
    trg_in = batch.trg_in.new_full((rows, trg_steps), PAD)
    trg_in[:n, :t] = batch.trg_in
    trg_out = batch.trg_out.new_full((rows, trg_steps), PAD)
    trg_out[:n, :t] = batch.trg_out
    return Batch(src, src_lens, trg_in, trg_out, batch.n_trg_tokens)


def fused_adam(model: torch.nn.Module, kind: type[torch.optim.Optimizer], lr: float,
               betas: tuple[float, float], weight_decay: float,
               device: torch.device) -> torch.optim.Optimizer:
    """Adam / AdamW with the fused kernel and a device learning rate, as graphs need.

    ``capturable`` on a GPU: ``step()`` refuses to be recorded in a graph without it (the fused
    kernel itself keeps its step counts on the device either way).
    """
    return kind(model.parameters(), lr=torch.tensor(lr, device=device), betas=betas,
                weight_decay=weight_decay, fused=True, capturable=device.type == "cuda")


@dataclasses.dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Batch  # the static input buffers the graph reads
    loss: torch.Tensor  # the static output it writes


class StaticSteps:
    """Forward-backward and update with fixed shapes and no host synchronisation.

    Args:
        model: the model itself, not a DDP wrapper.
        optimizer: from :func:`fused_adam`.
        clip_norm: gradient-norm clipping (0: off).
        label_smoothing: of the cross-entropy.
        autocast_dtype: bf16 autocast, or None for fp32 (fp16 needs a host-side grad scaler).
        capture: record CUDA graphs (needs a CUDA device); False runs everything eagerly.
    """

    def __init__(self, model: Seq2Seq, optimizer: torch.optim.Optimizer, clip_norm: float,
                 label_smoothing: float, autocast_dtype: torch.dtype | None, capture: bool):
        self.model = model
        model.encoder.packed = False  # packing reads lengths on the host
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip_norm = clip_norm if clip_norm > 0 else float("inf")
        self.label_smoothing = label_smoothing
        self.autocast_dtype = autocast_dtype
        self.capture = capture
        device = self.params[0].device
        self.device = device
        self.norm = torch.zeros((), device=device)
        # One device learning rate for every group (a resumed optimizer may hold a float).
        self.lr = torch.zeros((), device=device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        # Updates skipped for a non-finite gradient: in a row now, the longest run, in all.
        self.bad_run = torch.zeros((), device=device)
        self.worst_run = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params), device=device)
        offset = 0
        for param in self.params:
            param.grad = self.flat_grad[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
        self.graphs: dict[tuple[int, int, int], _Captured] = {}
        self.update_graph: torch.cuda.CUDAGraph | None = None
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    # ---- the two programs (what a graph records) ------------------------------------------

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """Add the gradient of ``norm * (summed token loss)`` into the grads; returns the loss."""
        # No autocast weight cache: a cached cast made during capture would be reused stale.
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            logits = self.model(batch.src, batch.src_lens, batch.trg_in)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.trg_out.flatten(),
                               ignore_index=PAD, reduction="sum",
                               label_smoothing=self.label_smoothing)
        (loss * self.norm).backward()
        return loss.detach()

    def update(self) -> None:
        """Clip, step (skipped on the device when the gradient is not finite), zero the grads."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm, foreach=True)
        found_inf = (~torch.isfinite(grad_norm)).float()
        self.optimizer.found_inf = found_inf  # fused Adam leaves everything as it was
        self.optimizer.step()
        self.bad_run.add_(1.0).mul_(found_inf)  # one more in a row, or back to 0
        torch.maximum(self.worst_run, self.bad_run, out=self.worst_run)
        self.skipped.add_(found_inf)
        self.optimizer.zero_grad(set_to_none=False)

    # ---- running them ------------------------------------------------------------------------

    def run_forward_backward(self, batch: Batch, norm: float) -> torch.Tensor:
        """Pad ``batch`` (on the CPU) to its bucket and run (or replay) forward-backward."""
        shape = bucket_shape(batch)
        padded = pad_batch(batch, shape)
        self.norm.fill_(norm)
        if not self.capture:
            return self.forward_backward(padded.to(self.device))
        captured = self.graphs.get(shape)
        if captured is None:
            captured = self._capture_forward_backward(padded)
        for static, value in zip(_tensors(captured.inputs), _tensors(padded)):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        return captured.loss.clone()

    def run_update(self, lr: float) -> None:
        """Sum the gradients over ranks (several processes), then run (or replay) the update."""
        dist.all_reduce_sum(self.flat_grad)
        self.lr.fill_(lr)
        if not self.capture:
            self.update()
            return
        if self.update_graph is None:
            self.update_graph = self._capture_update()
        self.update_graph.replay()

    def read_bad_updates(self) -> tuple[int, int, int]:
        """(in a row now, longest run, in all) skipped updates; synchronises with the device."""
        values = torch.stack([self.bad_run, self.worst_run, self.skipped]).tolist()
        return tuple(int(v) for v in values)

    def set_bad_updates(self, in_a_row: int, skipped: int) -> None:
        """Restore the counters (resume); the longest run restarts from the current one."""
        self.bad_run.fill_(in_a_row)
        self.worst_run.fill_(in_a_row)
        self.skipped.fill_(skipped)

    def _capture_forward_backward(self, padded: Batch) -> _Captured:
        """Warm up on a side stream, record, and take the warm-ups' gradients back out."""
        inputs = padded.to(self.device)  # the static buffers, holding a real batch to warm up
        saved = [p.grad.clone() for p in self.params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.forward_backward(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self.forward_backward(inputs)
        for param, grad in zip(self.params, saved):
            param.grad.copy_(grad)
        captured = _Captured(graph, inputs, loss)
        self.graphs[bucket_shape(padded)] = captured
        return captured

    def _capture_update(self) -> torch.cuda.CUDAGraph:
        """Record :meth:`update` once the optimizer's state exists.

        Adam creates its state at its first step; created during capture, the zero fill would
        be recorded and replayed at every update. A skipped step (``found_inf`` set) creates
        the state without changing any weight or moment.
        """
        if len(self.optimizer.state) < len(self.params):  # e.g. a resumed state lacking some
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                # Once, on purpose, uncaptured: not the slow use capturable=True warns about.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self.optimizer.found_inf = torch.ones((), device=self.device)
                self.optimizer.step()
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.update()
        return graph


def _tensors(batch: Batch) -> tuple[torch.Tensor, ...]:
    return batch.src, batch.src_lens, batch.trg_in, batch.trg_out
