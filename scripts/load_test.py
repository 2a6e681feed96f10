"""Load test of ``seq2seq serve``: N concurrent clients, one sentence per request.

Against a running server (loopback only):

    python scripts/load_test.py --url http://127.0.0.1:5000/ --input test.de --source de --target en

Or let the script start the servers itself, with batching on and off, and measure
``seq2seq translate``'s offline throughput on the same sentences beside them:

    python scripts/load_test.py --checkpoint runs/multi30k-de-en-cpu/best.pt \\
        --input data/multi30k/test_2016_flickr.de.gz --clients 32 --sentences 500

Each client sends its next sentence as soon as the previous answer arrives. The report gives
sentences per second (answered sentences / wall time) and the p50/p95/p99 request latency.
The run is bounded: at most ``--sentences`` requests and ``--max-seconds`` of sending.

The exit status is 1, each problem said in one line after the report, when a request failed
or no sentence was translated. With ``--checkpoint``, served translations that differ from
offline ``translate``'s are listed (``differing``), not failed: they may, by the rounding of
other batch shapes (README, "Serving a model").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent


def read_sentences(path: Path, count: int) -> list[str]:
    """The first ``count`` non-blank lines of a text file (gzip allowed), read as
    ``seq2seq translate`` reads its input."""
    from seq2seq.errors import Seq2SeqError
    from seq2seq.translate_io import open_input, read_lines

    try:
        with open_input(path) as stream:
            sentences = [line.strip() for line in read_lines(stream, name=str(path))
                         if line.strip()]
    except Seq2SeqError as error:
        raise SystemExit(f"error: {error}") from None
    if not sentences:
        raise SystemExit(f"error: {path}: holds no sentence")
    return sentences[:count]


def check_loopback(url: str) -> None:
    """Refuse any server but this machine's: a load test is not for other people's."""
    if urlsplit(url).scheme not in ("http", "https"):
        fix = ("not an http:// or https:// URL" if "://" in url
               else f"no http:// in front; add it: http://{url}")
        raise SystemExit(f"error: --url {url}: {fix}")
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"error: {url}: only loopback servers (127.0.0.1, ::1, localhost)")


async def load(url: str, sentences: list[str], clients: int, source: str, target: str,
               api_key: str | None, max_seconds: float) -> tuple[dict, list[str | None]]:
    """Send every sentence once from ``clients`` concurrent clients; the figures and the
    translations (``None`` where a request failed or was not sent)."""
    latencies: list[float] = []
    answers: list[str | None] = [None] * len(sentences)
    failures: dict[str, int] = {}
    todo = iter(range(len(sentences)))
    deadline = 0.0  # set when the clock starts, below

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:  # shared: each sentence is sent once
            if time.monotonic() > deadline:
                return
            fields = {"q": sentences[i], "source": source, "target": target}
            if api_key:
                fields["api_key"] = api_key
            started = time.monotonic()
            try:
                response = await http.post("translate", json=fields)
                outcome = str(response.status_code)
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            if outcome == "200":
                latencies.append(time.monotonic() - started)
                answers[i] = response.json()["translatedText"]
            else:
                failures[outcome] = failures.get(outcome, 0) + 1

    # One connection per client, each with its own httpx client: a shared pool of N
    # connections costs the load generator about three times the CPU per request (measured:
    # 4 ms against 1.3 ms), taken from the cores the server runs on. The clients are made and
    # connected (one GET /health each) before the clock starts: creating 32 httpx clients
    # takes longer than a second of the run.
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        https = [await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=120, limits=one)) for _ in range(clients)]
        try:
            await asyncio.gather(*(http.get("health") for http in https))
        except httpx.HTTPError as error:
            raise SystemExit(f"error: {url}: cannot connect ({type(error).__name__}: "
                             f"{error})") from None
        started = time.monotonic()
        deadline = started + max_seconds
        await asyncio.gather(*(client(http) for http in https))
        wall = time.monotonic() - started
    return summary(latencies, wall, failures), answers


def run_loop(coroutine):
    """``asyncio.run`` on uvloop where it is installed (the ``serve`` extra brings it): the
    clients share the machine with the server they measure, and on uvloop they take about a
    seventh less CPU (1.8 against 2.1 s for 1,000 requests, start included, 2-core AMD EPYC)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def summary(latencies: list[float], wall: float, failures: dict[str, int]) -> dict:
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"sentences": len(latencies), "seconds": round(wall, 2),
            "sentences_per_s": round(len(latencies) / wall, 1) if wall else 0.0,
            "p50_ms": round(1000 * cuts[49], 1) if cuts else None,
            "p95_ms": round(1000 * cuts[94], 1) if cuts else None,
            "p99_ms": round(1000 * cuts[98], 1) if cuts else None, "failures": failures}


class Offline:
    """``seq2seq translate``'s throughput on the sentences: its code path (chunks of 1000
    lines, length-sorted batches) in this process, model loading not counted."""

    def __init__(self, checkpoint: str, decode_flags: dict, threads: int,
                 precision: str = "fp32", quantize: bool = False):
        import torch

        from seq2seq.heap import keep_freed_memory
        from seq2seq.translate import Translator

        keep_freed_memory()  # as the seq2seq command does at start
        if threads:
            torch.set_num_threads(threads)
        self.translator = Translator.from_checkpoint(checkpoint, device="cpu",
                                                     quantize=quantize, precision=precision)
        self.settings = self.translator.decode_settings(**decode_flags)

    def run(self, sentences: list[str]) -> tuple[dict, list[str]]:
        from seq2seq.translate_io import one_line, translate_stream

        started = time.monotonic()
        outputs = list(translate_stream(
            sentences, lambda batch: self.translator.translate_full(batch, self.settings),
            empty=None))
        wall = time.monotonic() - started
        figures = {"sentences": len(outputs), "seconds": round(wall, 2),
                   "sentences_per_s": round(len(outputs) / wall, 1)}
        return figures, [one_line(r.hypotheses[0]) if r else "" for r in outputs]


class ServerProcess:
    """``seq2seq serve CHECKPOINT --port 0 FLAGS`` in a subprocess, logging to a file."""

    def __init__(self, checkpoint: str, flags: list[str], log: Path):
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "seq2seq", "serve", checkpoint, "--port", "0", *flags],
                stdout=handle, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait(timeout=300)

    def _wait(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"error: the server exited:\n{self.log.read_text()}")
            found = re.search(r"listening on (http://\S+)", self.log.read_text())
            if found:
                try:
                    if httpx.get(found.group(1) + "/health").status_code == 200:
                        return found.group(1) + "/"
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        self.process.kill()
        raise SystemExit(f"error: the server did not start in {timeout} s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def decode_flags(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The decoding options as ``serve`` flags and as ``decode_settings`` arguments."""
    flags, values = ["--precision", args.precision] + ["--quantize"] * args.quantize, {}
    for name in ["beam", "alpha", "shortlist"]:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name}", str(value)]
            values[name] = value
    return flags, values


def compare(args: argparse.Namespace, sentences: list[str]) -> dict:
    """Batching on, batching off (``--batch-size 1``), and offline, on the same sentences,
    ``args.repeat`` times in turn (on, off, offline, on, ...), so that a slow spell of a shared
    machine falls on every mode alike. Each mode reports its median run (by sentences/s) and
    every run's throughput; the ratios are the medians of the runs' own ratios."""
    flags, values = decode_flags(args)
    modes = {"batching on": str(args.batch_size), "batching off": "1"}
    runs: dict[str, list[dict]] = {name: [] for name in [*modes, "offline translate"]}
    differ: dict[str, list[dict]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for name, batch_size in modes.items():
            servers[name] = ServerProcess(args.checkpoint, flags + [
                "--batch-size", batch_size, "--threads", str(args.threads),
                "--batch-wait-ms", str(args.batch_wait_ms)], Path(tmp) / f"{name.split()[-1]}.log")
            stack.callback(servers[name].stop)
        source, target = languages(servers["batching on"].url)
        offline = Offline(args.checkpoint, values, args.threads, args.precision, args.quantize)
        for _ in range(args.repeat):
            answers = {}
            for name, server in servers.items():
                figures, answers[name] = run_loop(load(
                    server.url, sentences, args.clients, source, target, None,
                    args.max_seconds))
                runs[name].append(figures)
                print(f"{name}: {figures}", file=sys.stderr)
            figures, expected = offline.run(sentences)
            runs["offline translate"].append(figures)
            for name, served in answers.items():
                # The served translations must be translate's, batched or not (up to the
                # rounding of other batch shapes: README, "Serving"): each one that is not is
                # kept for the reader to judge. None: failed (counted as such) or not sent.
                differ[name] += [{"index": index, "served": a, "offline": e}  # in sentences
                                 for index, (a, e) in enumerate(zip(served, expected))
                                 if a is not None and a != e]
        # servers started for this run: their whole life is this run's requests
        batches = {name: mean_batch(batch_counters(server.url)) for name, server in
                   servers.items()}
    report = {name: median_run(found) for name, found in runs.items()}
    report["problems"] = []
    for name in modes:
        report[name] |= {"mean_batch": batches[name], "differ_from_offline": len(differ[name]),
                         "differing": differ[name]}
        report["problems"] += problems(name, runs[name])
    rates = {name: [run["sentences_per_s"] for run in found] for name, found in runs.items()}
    report["ratios"] = {}
    for name, other in [("on/off", "batching off"), ("on/offline", "offline translate")]:
        # run i of one mode against run i of the other, measured minutes apart
        ratios = [a / b if b else None for a, b in zip(rates["batching on"], rates[other])]
        report["ratios"][name] = median_ratio(ratios)
        # every run's own, so that a reader sees how far the machine's drift moved them
        report["ratios"][f"{name} runs"] = [0.0 if ratio is None else round(ratio, 2)
                                            for ratio in ratios]
    return report


def problems(name: str, runs: list[dict]) -> list[str]:
    """One line for each thing wrong with a mode's ``runs``: failed requests, nothing
    translated."""
    failures: dict[str, int] = {}
    for run in runs:
        for outcome, count in run["failures"].items():
            failures[outcome] = failures.get(outcome, 0) + count
    found = []
    if failures:
        found.append(f"{name}: {sum(failures.values())} requests failed ("
                     + ", ".join(f"{outcome}: {count}" for outcome, count in failures.items())
                     + ")")
    if not sum(run["sentences"] for run in runs):
        found.append(f"{name}: no sentence translated")
    return found


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one of an even count), with every
    run's throughput beside it."""
    ranked = sorted(runs, key=lambda run: run["sentences_per_s"])
    return ranked[(len(ranked) - 1) // 2] | {
        "runs_sentences_per_s": [run["sentences_per_s"] for run in runs]}


def median_ratio(ratios: list[float | None]) -> float:
    """The median of the runs' own ratios, leaving out those without a denominator (None)."""
    measured = [ratio for ratio in ratios if ratio is not None]
    return round(statistics.median(measured), 2) if measured else 0.0


def batch_counters(url: str) -> tuple[float, float] | None:
    """The server's search steps (or whole decodes) so far and the sentences they held, from
    its ``/metrics`` (None where it has none)."""
    try:
        text = httpx.get(url + "metrics").text
    except httpx.HTTPError:
        return None
    count = sum(float(n) for n in re.findall(r"^seq2seq_batch_sentences_count\S* (\S+)$",
                                             text, re.M))
    total = sum(float(n) for n in re.findall(r"^seq2seq_batch_sentences_sum\S* (\S+)$",
                                             text, re.M))
    return count, total


def mean_batch(after: tuple[float, float] | None,
               before: tuple[float, float] | None = (0.0, 0.0)) -> float | None:
    """Mean sentences per search step between two readings of :func:`batch_counters` (None
    where either is missing)."""
    if after is None or before is None:
        return None
    count, total = after[0] - before[0], after[1] - before[1]
    return round(total / count, 1) if count else 0.0


def languages(url: str) -> tuple[str, str]:
    """The one language pair a server translates."""
    try:
        answer = httpx.get(url + "languages")
    except httpx.HTTPError as error:
        raise SystemExit(f"error: {url}: no answer ({error}); is the server running?") \
            from None
    pairs = [(lang["code"], target) for lang in answer.json() for target in lang["targets"]]
    if len(pairs) != 1:
        raise SystemExit(f"error: {url} serves {len(pairs)} pairs; name --source and --target")
    return pairs[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on this machine")
    where.add_argument("--checkpoint", help="start servers on this checkpoint (batching on "
                       "and off) and measure offline translate too")
    parser.add_argument("--input", type=Path, required=True, help="sentences, one per line")
    parser.add_argument("--sentences", type=int, default=500, help="how many to send")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (<= 256)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after")
    parser.add_argument("--source", help="source language (default: the server's only pair)")
    parser.add_argument("--target", help="target language")
    parser.add_argument("--api-key", help="api_key to send")
    parser.add_argument("--batch-size", type=int, default=64, help="serve --batch-size when on")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="serve --batch-wait-ms")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads of the servers and of offline translate "
                        "(0: torch's default)")
    parser.add_argument("--beam", type=int, help="beam size (default: the checkpoint's)")
    parser.add_argument("--alpha", type=float, help="length penalty (default: checkpoint's)")
    parser.add_argument("--shortlist", type=int, help="serve/translate --shortlist N (needs a "
                        "checkpoint with a lexicon)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="serve/translate --precision (weights cast once)")
    parser.add_argument("--quantize", action="store_true",
                        help="serve/translate --quantize (int8 weights)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="with --checkpoint: measure on, off and offline this many times "
                        "in turn and report medians (a shared machine's speed drifts)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256:
        parser.error("--clients must be between 1 and 256")
    if not 1 <= args.repeat <= 100:
        parser.error("--repeat must be between 1 and 100")
    if args.sentences < 1:
        parser.error("--sentences must be at least 1")
    from seq2seq.errors import Seq2SeqError
    from seq2seq.files import check_output

    try:
        if args.json is not None:
            check_output(args.json)
    except Seq2SeqError as error:
        parser.error(f"--json {error}")
    if args.url:
        check_loopback(args.url)
    url = args.url and (args.url if args.url.endswith("/") else args.url + "/")
    sentences = read_sentences(args.input, args.sentences)
    setup = {"clients": args.clients, "sentences": len(sentences), "input": str(args.input)}
    if url:
        source, target = ((args.source, args.target) if args.source and args.target
                          else languages(url))
        before = batch_counters(url)
        figures, _ = run_loop(load(url, sentences, args.clients, source, target,
                                   args.api_key, args.max_seconds))
        # this run's steps only: the server may have served others before
        report = {"server": figures | {"mean_batch": mean_batch(batch_counters(url), before)},
                  "problems": problems("server", [figures])}
        # the server's own settings are its own: only what this script chose is recorded
        setup |= {"url": url, "source": source, "target": target}
    else:
        report = compare(args, sentences)
        setup |= {"threads": args.threads, "batch_wait_ms": args.batch_wait_ms,
                  "batch_size": args.batch_size, "precision": args.precision,
                  "quantize": args.quantize, "shortlist": args.shortlist,
                  "repeat": args.repeat}
    report["setup"] = setup
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for problem in report["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
