"""Benchmark a recipe: training target tokens/s, time per epoch, peak memory, decoding speed, BLEU.

    python scripts/benchmark.py recipes/multi30k/de-en.gru.yaml [KEY=VALUE ...] \
        [--device cpu|cuda] [--checkpoint best.pt] [--json bench.json]

Training runs real optimizer steps on real batches of the prepared training cache, through the
project's own update step (``Trainer.step.accumulate`` and ``Trainer.step.apply``, the code
``seq2seq train`` runs), after ``--warmup`` untimed steps; validation is never run. The time
per epoch is *extrapolated*: the epoch's target tokens divided by the measured tokens/s.

Decoding translates the test set (repeated to at least ``--repeat`` sentences) in batches of
``--decode-batch`` sentences sorted by length, greedily and with beam 5, with the recipe's
``decode`` settings (``alpha``, ``max_len_ratio``, ``max_len_add``, ``min_len``,
``no_repeat_ngram``): with ``decode.min_len=LEN decode.max_len_ratio=1e-9
decode.max_len_add=LEN`` every output has exactly LEN tokens, so an untrained model costs what a
trained one does. The time covers encoding and search of token ids (not SentencePiece). BLEU is
sacreBLEU's, of the detokenized output against the raw references; without ``--checkpoint`` the
decoded model is the *untrained* one (just initialised, plus the benchmark's few steps), so its
BLEU is meaningless and its output runs to the maximum length more often than a trained model's
(the worst case for speed).

With ``--flops`` the table gains an arithmetic section: the matmul FLOPs of one training update
per target token and of decoding per sentence (counted by ``torch.utils.flop_counter`` in
separate, untimed passes; on a GPU, cuDNN's fused RNN calls are not counted), the speed of one
large fp32 matmul on the device, and what each measured rate means in FLOP/s. A rate cannot
exceed *matmul speed / FLOPs per item* unless the arithmetic itself is reduced.

Peak memory is the process's peak RSS on CPU (training, then training + decoding), and
``torch.cuda.max_memory_allocated`` per phase on GPU. Data are read under ``$SEQ2SEQ_DATA``
(default: ``../shared/data`` beside the checkout). The load average is recorded next to every
figure, because timings on a shared machine mean little without it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from seq2seq.arguments import at_least
from seq2seq.cpuinfo import CPUINFO, cpu_field

REPO = Path(__file__).resolve().parent.parent


def beam_sizes(text: str) -> list[int]:
    """``--beams``: comma-separated beam sizes, each at least 1."""
    try:
        return [at_least(1)(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="YAML recipe")
    # default: argparse counts a "*" positional without one as required in its error message
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="torch CPU threads (0: one per physical core)")
    parser.add_argument("--work-dir", help="output_dir for the tokenizer and cache "
                        "(default: a directory under the temp dir named after the recipe)")
    parser.add_argument("--warmup", type=at_least(0), default=5, help="untimed training steps")
    parser.add_argument("--steps", type=at_least(0), default=30,
                        help="timed training steps (0: skip)")
    parser.add_argument("--checkpoint", help="trained checkpoint to decode with (BLEU is "
                        "meaningful only then)")
    parser.add_argument("--test", help="test set of the recipe to decode (default: the first)")
    parser.add_argument("--repeat", type=at_least(1), help="decode at least this many sentences, "
                        "repeating the test set (default: 10000 on GPU, 1000 on CPU); fewer "
                        "than the test set holds decodes its first N")
    parser.add_argument("--decode-batch", type=at_least(1), help="sentences per decoding batch "
                        "(default: 100 on CPU, 500 on GPU)")
    parser.add_argument("--beams", type=beam_sizes, default="1,5",
                        help="beam sizes to time (1: greedy)")
    parser.add_argument("--quantize", action="store_true",
                        help="also decode with the int8 model (CPU, seq2seq.quantize)")
    parser.add_argument("--bf16", action="store_true",
                        help="also decode with the weights cast to bf16 once (fast on a CPU "
                        "with native bf16: amx_bf16, avx512_bf16)")
    parser.add_argument("--shortlist", type=at_least(0), default=0, metavar="N",
                        help="also time each beam search with decode.shortlist=N (the "
                        "lexicon of the work dir's data, or of --checkpoint)")
    parser.add_argument("--no-decode", action="store_true", help="time training only")
    parser.add_argument("--plain-decoder", action="store_true",
                        help="use the decoder's plain (RNN module) path instead of the fused "
                        "one, to measure before/after in one checkout")
    parser.add_argument("--flops", action="store_true",
                        help="also count the matmul FLOPs of a training update and of decoding "
                        "(torch's FlopCounterMode, in extra untimed passes) and time a large "
                        "matmul, to show how close to the device's arithmetic each figure is")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; os.cpu_count() if that fails."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, package = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or os.cpu_count() or 1


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The ``model name`` of the first CPU in ``cpuinfo`` with its ``cpu family``, ``model`` and
    ``stepping`` (a name such as "AMD EPYC" covers several generations: family 25 is Zen 3/4,
    26 is Zen 5), or platform.processor() where there is no such file."""
    name = cpu_field("model name", cpuinfo)
    if not name:
        return platform.processor() or platform.machine()
    ids = ", ".join(f"{key} {value}" for key in ("cpu family", "model", "stepping")
                    if (value := cpu_field(key, cpuinfo)))
    return f"{name} ({ids})" if ids else name


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_recipe(args: argparse.Namespace) -> Any:
    """The recipe with the overrides and the benchmark's output_dir, device and threads,
    checked against ``--work-dir``, ``--test`` and ``--checkpoint`` before any work."""
    from seq2seq.config import load_recipe

    work = args.work_dir or str(Path(tempfile.gettempdir()) / "seq2seq-bench" /
                                Path(args.recipe).stem)
    overrides = list(args.overrides) + [f"output_dir={work}", f"train.device={args.device}",
                                        f"train.threads={args.threads}"]
    recipe = load_recipe(args.recipe, overrides)
    # The benchmark never writes checkpoints; one here belongs to a training run, which the
    # Trainer would resume from (and the benchmark's updates must not be mistaken for it).
    found = sorted(p.name for p in Path(work).glob("*.pt"))
    if found:
        raise SystemExit(f"error: --work-dir {work} holds checkpoints of a training run "
                         f"({', '.join(found[:3])}); give the benchmark a directory of its own")
    if args.test is not None and args.test not in recipe.data.test:
        raise SystemExit(f"error: --test {args.test}: the recipe's test sets are "
                         f"{', '.join(recipe.data.test) or 'none'}")
    if args.checkpoint is not None and not args.no_decode:
        check_checkpoint(args.checkpoint, recipe)
    return recipe


def check_checkpoint(path: str, recipe: Any) -> None:
    """Refuse a ``--checkpoint`` that is none, or that translates another language pair than
    the recipe's test set is in (its BLEU would be meaningless)."""
    from seq2seq.checkpoint import check_language_pair, load_checkpoint
    from seq2seq.config import recipe_from_dict

    # A CheckpointError says what is wrong, in one line (see the end of this file).
    data = recipe_from_dict(load_checkpoint(Path(path))["recipe"],
                            source=f"{path} (recipe)").data
    check_language_pair((data.src_lang, data.trg_lang),
                        (recipe.data.src_lang, recipe.data.trg_lang),
                        f"--checkpoint {path}", "the recipe's data")


def epoch_updates(trainer: Any) -> list[tuple[list, int]]:
    """The updates of epoch 1 as training makes them: this rank's micro-batches, and the
    target tokens of the whole global batch (one EOS per sentence included)."""
    from seq2seq.data.batching import epoch_batches, rank_steps

    cfg = trainer.recipe.train
    src_lens, trg_lens = trainer.data.train_lengths()
    group = trainer.world * cfg.accumulate
    batches = epoch_batches(trg_lens, src_lens, cfg.batch_tokens, cfg.batch_sentences,
                            trainer.recipe.seed, 0, group)
    steps = rank_steps(batches, trainer.rank, trainer.world, cfg.accumulate)
    return [(micro, int(sum(int(trg_lens[i].sum()) + len(i)
                            for i in batches[u * group:(u + 1) * group])))
            for u, micro in enumerate(steps)]


def bench_training(trainer: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Real updates on the batches of epoch 1; returns the timing of the last ``steps``.

    Past the end of the epoch the same updates come round again, so a warm-up of a whole epoch
    (on a GPU with CUDA graphs: every bucket shape captured) precedes the timed steps.
    """
    updates = epoch_updates(trainer)
    trg_lens = trainer.data.train_lengths()[1]
    epoch_tokens = int(trg_lens.sum()) + len(trg_lens)  # + one EOS per sentence
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.model.train()
    timed_tokens, timed_s, cpu_s, load_before = 0, 0.0, 0.0, load_average()
    static = getattr(trainer.step, "static", None)  # CUDA graphs, if on
    graphs_before_timing = 0
    for s in range(warmup + steps):
        if s == warmup and static is not None:
            graphs_before_timing = len(static.graphs)
        micro, tokens = updates[s % len(updates)]
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = trainer.step.accumulate(micro, tokens)
        trainer.step.apply(trainer.schedule.at(s + 1))
        float(loss)  # the loop's only sync, as when training logs
        sync(device)
        if s >= warmup:
            timed_s += time.perf_counter() - start
            cpu_s += time.process_time() - cpu_start
            timed_tokens += tokens
    rate = timed_tokens / timed_s
    return {
        "steps_timed": steps, "warmup_steps": warmup,
        "tokens_per_update": round(timed_tokens / steps),
        "target_tokens_per_s": round(rate, 1),
        # CPU time of this process (all threads): steadier than wall time on a busy machine.
        "target_tokens_per_cpu_s": round(timed_tokens / cpu_s, 1),
        "step_s": round(timed_s / steps, 4),
        "updates_per_epoch": len(updates),
        "cuda_graphs": len(static.graphs) if static is not None else None,
        # Captures inside the timed steps make the figure slower than training runs: a warm-up
        # shorter than an epoch can leave bucket shapes uncaptured.
        "cuda_graphs_captured_while_timed": (len(static.graphs) - graphs_before_timing
                                             if static is not None else None),
        "epoch_s_extrapolated": round(epoch_tokens / rate, 1),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20
                                 if device.type == "cuda" else peak_rss_mib(), 1),
        "peak_memory_kind": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                             else "process peak RSS"),
        "load_average": [load_before, load_average()],
    }


def load_decoder(args: argparse.Namespace, trainer: Any) -> tuple[Any, Any, str, Any]:
    """(model in eval mode, tokenizer, description, lexicon or None) to decode with."""
    if args.checkpoint is None:
        steps = args.warmup + args.steps if args.steps else 0
        return (trainer.model.eval(), trainer.data.tokenizer,
                f"untrained model (initialised, then {steps} benchmark updates): "
                "BLEU meaningless",
                trainer.data.lexicon()
                if trainer.recipe.decode.shortlist or args.shortlist else None)
    from seq2seq.translate import Translator

    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    for module in translator.model.modules():
        if hasattr(module, "fused"):
            module.fused = not args.plain_decoder
    if (trainer.recipe.decode.shortlist or args.shortlist) and translator.lexicon is None:
        raise SystemExit(f"error: decode.shortlist: {args.checkpoint} holds no lexicon")
    return (translator.model, translator.tokenizer, f"checkpoint {args.checkpoint}",
            translator.lexicon)


def bench_decoding(model: Any, src_ids: list[list[int]], refs: list[str], tokenizer: Any,
                   decode: Any, beam: int, batch_size: int, device: torch.device,
                   lexicon: Any = None) -> dict[str, Any]:
    """Decode ``src_ids`` in length-sorted batches of ``batch_size``; sentences/s and BLEU.

    Beam search restricts the output layer to ``decode.shortlist`` of ``lexicon`` when that
    is set (as ``translate`` does); greedy search never does."""
    from seq2seq.decoding import bucketed_batches, pad_sources
    from seq2seq.scoring import corpus_bleu
    from seq2seq.search import beam_search, greedy_search
    from seq2seq.search.shortlist import Shortlist
    from seq2seq.search.static_beam import StaticBeamSearch

    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]), reverse=True)
    shortlist = (Shortlist(lexicon, decode.shortlist, decode.shortlist_frequent)
                 if decode.shortlist else None)
    graphs = bool(decode.cuda_graphs and device.type == "cuda" and beam > 1 and not shortlist
                  and not decode.no_repeat_ngram)  # as search_path decides
    buckets = bucketed_batches(model, device)  # as translate decides
    # decode.cuda_graphs: the fixed-shape search (same output), graphs kept across batches.
    static = StaticBeamSearch(model, beam, alpha=decode.alpha,
                              max_len_ratio=decode.max_len_ratio,
                              max_len_add=decode.max_len_add, min_len=decode.min_len,
                              capture=True) if graphs else None
    hyps: list[list[int]] = [[] for _ in src_ids]
    out_tokens, cut = 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load_before = load_average()
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        src, src_lens = pad_sources([src_ids[i] for i in batch], device)
        if beam == 1:
            best = greedy_search(model, src, src_lens, max_len_ratio=decode.max_len_ratio,
                                 max_len_add=decode.max_len_add, min_len=decode.min_len,
                                 no_repeat_ngram=decode.no_repeat_ngram, buckets=buckets)
        elif static is not None:
            best = [nbest[0] for nbest in static(src, src_lens)]
        else:
            best = [nbest[0] for nbest in beam_search(
                model, src, src_lens, beam_size=beam, alpha=decode.alpha,
                max_len_ratio=decode.max_len_ratio, max_len_add=decode.max_len_add,
                min_len=decode.min_len, no_repeat_ngram=decode.no_repeat_ngram,
                shortlist=shortlist, buckets=buckets)]
        limits = [math.floor(decode.max_len_ratio * n + decode.max_len_add)
                  for n in src_lens.tolist()]
        for i, hyp, limit in zip(batch, best, limits):
            hyps[i] = hyp.tokens
            out_tokens += len(hyp.tokens)
            cut += len(hyp.tokens) >= limit  # stopped at the maximum length, without EOS
    sync(device)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    texts = tokenizer.decode_trg(hyps)
    n_unique = len(refs)
    return {
        "beam": beam, "sentences": len(src_ids), "batch_sentences": batch_size,
        "cuda_graphs": graphs,
        "shortlist": ([decode.shortlist, decode.shortlist_frequent]
                      if shortlist and beam > 1 else None),
        "sentences_per_s": round(len(src_ids) / seconds, 1), "seconds": round(seconds, 2),
        "sentences_per_cpu_s": round(len(src_ids) / cpu_s, 1),
        "bleu": corpus_bleu(texts[:n_unique], [refs]),
        "mean_output_tokens": round(out_tokens / len(src_ids), 2),
        "cut_at_max_len": cut,
        "max_len": f"floor({decode.max_len_ratio} * src_len + {decode.max_len_add})",
        "min_len": decode.min_len, "no_repeat_ngram": decode.no_repeat_ngram,
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20
                                 if device.type == "cuda" else peak_rss_mib(), 1),
        "load_average": [load_before, load_average()],
    }


def matmul_gflops(device: torch.device, rows: int = 4096, inner: int = 1024,
                  cols: int = 1024, repeats: int = 20) -> float:
    """fp32 GFLOP/s of a large ``(rows, inner) x (inner, cols)`` matmul on ``device``."""
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, cols, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start) / 1e9


def count_flops(run: Any) -> int:
    """Matmul FLOPs of ``run()`` (torch's FlopCounterMode: mm, addmm, bmm, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def training_flops_per_token(trainer: Any) -> float:
    """FLOPs of the first update of epoch 1 (forward, backward and step) per target token.

    The update is applied, as a warm-up step would be."""
    micro, tokens = epoch_updates(trainer)[0]
    trainer.model.train()
    flops = count_flops(lambda: (trainer.step.accumulate(micro, tokens),
                                 trainer.step.apply(trainer.schedule.at(1))))
    return flops / tokens


def si_prefixed(value: float) -> str:
    """``61.8 M``, ``1.33 G``: three significant digits and an SI prefix."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def format_table(result: dict[str, Any]) -> str:
    lines = [f"recipe {result['recipe']} {' '.join(result['overrides'])}",
             f"device {result['device']} ({result['device_name']}), torch "
             f"{result['torch']}, threads {result['threads']}, decoder path "
             f"{result['decoder_path']}, C kernels "
             f"{'on' if result.get('native_kernels') else 'off'}"
             + (f", int8 by {result['int8_kernel']}" if result.get("int8_kernel") else "")]
    train = result.get("train")
    if train:
        lines += [
            "",
            "| training | value | load avg (before, after) |",
            "|---|---|---|",
            f"| target tokens/s | {train['target_tokens_per_s']:,.0f} | "
            f"{train['load_average']} |",
            f"| target tokens per CPU-second (all threads) | "
            f"{train['target_tokens_per_cpu_s']:,.0f} | |",
            f"| step (s), {train['tokens_per_update']:,} target tokens/update | "
            f"{train['step_s']:.3f} | |",
            f"| epoch (s), extrapolated from {train['steps_timed']} steps | "
            f"{train['epoch_s_extrapolated']:,.0f} | |",
            f"| peak memory (MiB, {train['peak_memory_kind']}) | "
            f"{train['peak_memory_mib']:,.0f} | |",
            f"| CUDA graphs (bucket shapes captured) | {train['cuda_graphs'] or 'off'} | |",
        ]
        if train["cuda_graphs_captured_while_timed"]:
            lines.append(f"| of those, captured in the timed steps (a longer --warmup leaves "
                         f"none) | {train['cuda_graphs_captured_while_timed']} | |")
    flops = result.get("flops")
    if flops:
        peak = flops["matmul_gflops"]
        lines += ["", f"arithmetic: one fp32 matmul {flops['matmul_shape']} runs at "
                  f"{peak:,.0f} GFLOP/s here",
                  "| what | matmul FLOPs per item | measured rate | = GFLOP/s | share of "
                  "matmul speed | rate at matmul speed |", "|---|---|---|---|---|---|"]
        for row in flops["rows"]:
            achieved = row["flops_per_item"] * row["rate"] / 1e9
            lines.append(
                f"| {row['what']} | {si_prefixed(row['flops_per_item'])} | "
                f"{row['rate']:,.1f} {row['unit']} | {achieved:,.1f} | {achieved / peak:.0%} | "
                f"{peak * 1e9 / row['flops_per_item']:,.0f} {row['unit']} |")
    if result.get("decode"):
        lines += ["", f"decoding: {result['decode_model']}",
                  "| search | weights | sentences | batch | sent/s | sent/CPU-s | BLEU | mean len "
                  "| cut at max len | peak MiB | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["decode"]:
            search = "greedy" if row["beam"] == 1 else f"beam {row['beam']}"
            if row.get("shortlist"):
                search += " shortlist {}+{}".format(*row["shortlist"])
            lines.append(
                f"| {search} | {row['weights']} | {row['sentences']:,} | "
                f"{row['batch_sentences']} | {row['sentences_per_s']:,.1f} | "
                f"{row['sentences_per_cpu_s']:,.1f} | {row['bleu']:.2f} | "
                f"{row['mean_output_tokens']} | {row['cut_at_max_len']} | "
                f"{row['peak_memory_mib']:,.0f} | {row['load_average']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("SEQ2SEQ_DATA", str(REPO.parent / "shared" / "data"))
    from seq2seq.heap import keep_freed_memory

    # As every seq2seq command does (cli.main), so that the figures are the commands' own.
    heap_kept = keep_freed_memory()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU is available")
    args.threads = args.threads or physical_cores()
    torch.set_num_threads(args.threads)
    repeat = args.repeat or (10_000 if device.type == "cuda" else 1000)
    decode_batch = args.decode_batch or (500 if device.type == "cuda" else 100)

    from seq2seq import native
    from seq2seq.files import check_output
    from seq2seq.models.gemm import fp32_backend
    from seq2seq.quantize import int8_kernel

    # What can be checked before the timed training is checked before it.
    if args.json is not None:
        check_output(args.json)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file")
    from seq2seq.training.trainer import Trainer

    trainer = Trainer(bench_recipe(args))
    trainer.model.decoder.fused = not args.plain_decoder
    result: dict[str, Any] = {
        "recipe": args.recipe, "overrides": args.overrides, "device": args.device,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(), "train_precision": trainer.recipe.train.precision,
        "fp32_products": "{} ({})".format(*fp32_backend()) if device.type == "cpu" else None,
        "decoder_path": "plain" if args.plain_decoder else "fused",
        "parameters": trainer.model.num_parameters, "work_dir": trainer.recipe.output_dir,
        "keep_freed_memory": heap_kept,
        # built (or loaded) here, outside the timed parts, as any earlier run would have left it
        "native_kernels": device.type == "cpu" and native.library() is not None,
        "int8_kernel": int8_kernel() if args.quantize else None,
    }
    flop_rows = []
    if args.flops and args.steps:
        per_token = training_flops_per_token(trainer)  # before the timed steps: untimed
    if args.steps:
        result["train"] = bench_training(trainer, args.warmup, args.steps)
        if args.flops:
            flop_rows.append({"what": "training, per target token", "flops_per_item": per_token,
                              "rate": result["train"]["target_tokens_per_s"], "unit": "tok/s"})
        print(f"training: {result['train']['target_tokens_per_s']:,.0f} target tokens/s",
              file=sys.stderr)

    if args.no_decode:
        print(format_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    model, tokenizer, description, lexicon = load_decoder(args, trainer)
    tests = trainer.data.tests
    name = args.test or next(iter(tests))
    test = tests[name]
    # A checkpoint brings its own tokenizer: encode with it, not with the work dir's.
    test_ids = test.src_ids if args.checkpoint is None else tokenizer.encode_src(test.src_text)
    if repeat < len(test_ids):
        copies, src_ids = 0, test_ids[:repeat]  # fewer than the test set: its first N
    else:
        copies = math.ceil(repeat / len(test_ids))
        src_ids = test_ids * copies  # whole copies, so BLEU of the first is that of all
    refs = test.trg_text[:len(src_ids)]
    decode = trainer.recipe.decode
    result.update(decode_model=description, test_set=name, test_copies=copies, decode=[])
    from seq2seq.precision import decoding_model

    # fp32 as translate decodes: packed for oneDNN where fp32 products go there
    variants = [("fp32", decoding_model(model, "fp32", device)[0])]
    if args.quantize:
        from seq2seq.quantize import quantize_for_cpu

        variants.append(("int8", quantize_for_cpu(model)))
    if args.bf16:
        variants.append(("bf16", decoding_model(model, "bf16", device)[0]))
    searches = [(beam, decode) for beam in args.beams]
    if args.shortlist:  # each beam search again, restricted to the shortlist
        import dataclasses

        searches += [(beam, dataclasses.replace(decode, shortlist=args.shortlist))
                     for beam, _ in searches if beam > 1]
    for weights, variant in variants:
        for beam, decode in searches:
            row = bench_decoding(variant, src_ids, refs, tokenizer, decode, beam,
                                 decode_batch, device, lexicon)
            row["weights"] = weights
            result["decode"].append(row)
            if args.flops and weights == "fp32":
                unique = src_ids[:len(test_ids)]  # one copy of the test set is enough
                flops = count_flops(functools.partial(
                    bench_decoding, variant, unique, refs, tokenizer, decode, beam,
                    decode_batch, device, lexicon))
                search = "greedy" if beam == 1 else f"beam {beam}"
                flop_rows.append({"what": f"decoding {search}, per sentence",
                                  "flops_per_item": flops / len(unique),
                                  "rate": row["sentences_per_s"], "unit": "sent/s"})
            listed = f" shortlist {decode.shortlist}" if row["shortlist"] else ""
            print(f"decoding {weights} beam {beam}{listed}: {row['sentences_per_s']:,.1f} "
                  "sentences/s", file=sys.stderr)

    if flop_rows:
        result["flops"] = {"matmul_gflops": round(matmul_gflops(device), 1),
                           "matmul_shape": "(4096, 1024) x (1024, 1024)", "rows": flop_rows}
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from seq2seq.config import RecipeError
    from seq2seq.errors import Seq2SeqError

    try:
        raise SystemExit(main())
    except RecipeError as error:  # one line per problem, as seq2seq's commands print them
        raise SystemExit("\n".join(f"error: {problem}" for problem in error.problems)) from None
    except Seq2SeqError as error:
        raise SystemExit(f"error: {error}") from None
