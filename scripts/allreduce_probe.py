"""How long does the gradient all-reduce of a recipe's model take, next to its compute?

    python scripts/allreduce_probe.py RECIPE [KEY=VALUE ...] [--nproc 2] [--iters 20]

Builds the recipe's model (vocabulary sizes from ``tokenizer.vocab_size``), reports its number
of parameters and its fp32 gradient size, then starts ``--nproc`` local processes through
torchrun (``seq2seq.distributed.launch``) that time ``all_reduce`` of float32 buffers of
1 MiB, 4 MiB, 25 MiB (DDP's default bucket) and the whole gradient, on the current device: CUDA
with NCCL when a GPU is there (one GPU per process), else CPU with gloo. The table gives the
median time per all-reduce, the algorithm bandwidth (bytes / time) and the bus bandwidth
(algorithm bandwidth x 2(n-1)/n, the traffic per link of a ring all-reduce, as nccl-tests
report it), which can be compared across process counts and with a link's rated speed.

With ``--compute-steps K`` each process also times K forward+backward passes of the model on a
synthetic batch of ``train.batch_tokens`` target tokens (sentences of ``--length`` subwords),
the compute that one all-reduce of the gradient pays for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from seq2seq import distributed as dist
from seq2seq.arguments import at_least
from seq2seq.config import Recipe, RecipeError, load_recipe
from seq2seq.models.seq2seq import build_model

MIB = 1 << 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="YAML recipe whose model is measured")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--nproc", type=at_least(1), default=2, help="local processes (GPUs)")
    parser.add_argument("--iters", type=at_least(1), default=20, help="timed all-reduces per size")
    parser.add_argument("--warmup", type=at_least(0), default=3,
                        help="untimed all-reduces per size")
    parser.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    parser.add_argument("--compute-steps", type=at_least(0), default=0,
                        help="also time this many forward+backward passes (0: skip)")
    parser.add_argument("--length", type=at_least(1), default=14,
                        help="subwords per synthetic sentence (Multi30k: about 14)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_of(recipe: Recipe) -> torch.nn.Module:
    vocab = recipe.tokenizer.vocab_size
    torch.manual_seed(recipe.seed)
    return build_model(recipe.model, vocab, vocab)


def sizes_to_probe(grad_bytes: int) -> list[int]:
    """1, 4 and 25 MiB (those below the gradient size), then the whole gradient."""
    return [size for size in (MIB, 4 * MIB, 25 * MIB) if size < grad_bytes] + [grad_bytes]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all_reduce(n_bytes: int, device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of one all-reduce of ``n_bytes`` of float32 (every rank calls it)."""
    buffer = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce_sum(buffer)
    times = []
    for _ in range(iters):
        dist.barrier()  # start together, so the time is the collective's, not a wait
        synchronize(device)
        start = time.perf_counter()
        dist.all_reduce_sum(buffer)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_compute(model: torch.nn.Module, recipe: Recipe, length: int, steps: int,
                 device: torch.device) -> tuple[float, int]:
    """Median seconds of forward+backward on a synthetic batch, and its target tokens."""
    vocab = recipe.tokenizer.vocab_size
    rows = max(1, recipe.train.batch_tokens // (length + 1))
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, vocab, (rows, length + 1), generator=generator).to(device)
    src_lens = torch.full((rows,), length + 1, dtype=torch.long)
    trg_in = torch.randint(4, vocab, (rows, length + 1), generator=generator).to(device)
    trg_out = torch.randint(4, vocab, (rows, length + 1), generator=generator).to(device)
    model.train()
    times = []
    for step in range(steps + 1):  # the first pass warms up (allocator, cuDNN plans)
        synchronize(device)
        start = time.perf_counter()
        logits = model(src, src_lens.to(device), trg_in)
        F.cross_entropy(logits.flatten(0, 1), trg_out.flatten()).backward()
        synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times), rows * (length + 1)


def worker(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    device = dist.init_from_env(args.backend, timeout_s=300) or torch.device("cpu")
    model = model_of(recipe).to(device)
    grad_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = dist.world_size()
    rows = []
    for size in sizes_to_probe(grad_bytes):
        seconds = time_all_reduce(size, device, args.iters, args.warmup)
        rows.append((size, seconds, size / seconds / 1e9, size / seconds / 1e9 * 2 * (n - 1) / n))
    compute = None
    if args.compute_steps:
        compute = time_compute(model, recipe, args.length, args.compute_steps, device)
    if dist.is_main():
        backend = "nccl" if device.type == "cuda" else "gloo"
        print(f"\nall_reduce of float32 buffers: {n} processes, device {device.type}, "
              f"backend {backend}, median of {args.iters}")
        print(f"{'bytes':>14} {'ms/allreduce':>13} {'algbw GB/s':>11} {'busbw GB/s':>11}")
        for size, seconds, algbw, busbw in rows:
            note = "  <- whole gradient" if size == grad_bytes else ""
            print(f"{size:>14,} {seconds * 1e3:>13.2f} {algbw:>11.3f} {busbw:>11.3f}{note}")
        if compute is not None:
            seconds, tokens = compute
            print(f"forward+backward of {tokens:,} target tokens on one process: "
                  f"{seconds * 1e3:.1f} ms; whole-gradient all-reduce / compute = "
                  f"{rows[-1][1] / seconds:.2f}")
    dist.shutdown()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    model = model_of(recipe)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{recipe.name}: {params:,} parameters; gradient {4 * params:,} bytes "
          f"({4 * params / MIB:.1f} MiB) in fp32")
    if args.nproc == 1:
        worker(args)
        return 0
    # One private rendezvous on a free local port; the workers re-run this script. (Not
    # ``--nproc`` in their arguments: torchrun's parser would take it for its own option.)
    worker_argv = [args.recipe, *args.overrides, f"--iters={args.iters}",
                   f"--warmup={args.warmup}", f"--backend={args.backend}",
                   f"--compute-steps={args.compute_steps}", f"--length={args.length}", "--worker"]
    return dist.launch([f"--nproc-per-node={args.nproc}", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=127.0.0.1:0", os.path.abspath(__file__), *worker_argv])


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except RecipeError as error:
        raise SystemExit("\n".join(f"error: {problem}" for problem in error.problems)) from None
