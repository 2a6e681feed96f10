"""A model's decoding worker in a process of its own, so that decoding and HTTP never share a GIL.

In one process, the decoding thread and the event loop take turns on the interpreter: every
torch op releases the GIL, the event loop takes it to parse or answer a request, and the
decoder waits to get it back. At 32 clients on a 2-core CPU that cost the decoder about 40% of
its speed. Here the worker process loads the checkpoint and runs a
:class:`~seq2seq.serve.worker.BatchWorker`; the server process sends it jobs and receives
their translations over a pipe, as JSON (nothing received is executed, as everywhere in this
package).

The server keeps the queue limit: it counts the sentences it sent, and the worker publishes
how many it has taken off its queue (into the search or a whole decode), in shared memory.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from seq2seq.config import DecodeConfig
from seq2seq.errors import Seq2SeqError
from seq2seq.heap import keep_freed_memory
from seq2seq.serve.worker import BatchWorker, DecodeFailed, Job, QueueFull, WorkerGone

METRICS_EVERY_S = 0.05
"""The worker process sends the batch sizes it decoded at least this often (and with every
result)."""


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """How the worker process loads its model (``Translator.from_checkpoint``'s arguments)."""

    checkpoint: str
    device: str
    quantize: bool
    precision: str
    threads: int
    """torch CPU threads (0: torch's default)."""


class WorkerProcess:
    """The interface of :class:`~seq2seq.serve.worker.BatchWorker` (``start``, ``submit``,
    ``cancel``, ``queued``, ``stop``) over a worker process.

    Jobs are delivered from a reader thread of this process. If the worker process dies, every
    job in it fails and later submissions are refused (503).
    """

    def __init__(self, spec: LoadSpec, max_sentences: int, wait_s: float, queue_limit: int,
                 on_batch: Callable[[int], None] = lambda size: None,
                 on_translated: Callable[[int], None] = lambda count: None,
                 name: str = "worker"):
        self.spec, self.queue_limit, self.name = spec, queue_limit, name
        self.on_batch, self.on_translated = on_batch, on_translated
        # Spawned, not forked: a fork would copy this process's threads' held locks and
        # torch's thread pool in whatever state they are.
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._taken = context.Value("q", 0, lock=False)  # sentences taken off its queue
        self._process = context.Process(
            target=run_worker, args=(child, spec, max_sentences, wait_s, self._taken),
            name=name, daemon=True)
        self._child_conn = child
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._sent = 0  # sentences sent to the worker
        # Writing to the pipe can block (a full pipe) and is never done holding _lock, which
        # the reader takes to deliver: the worker may be waiting for the reader to read.
        self._sending = threading.Lock()
        self._lock = threading.Lock()  # _jobs, _sent, _ended, _stopped
        self._ended: str | None = None  # why no job is taken any more
        self._stopped = False
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self.precision = ""  # the worker's Translator.precision, once started

    @property
    def queued(self) -> int:
        """Sentences waiting (not counting the batch being decoded)."""
        return self._sent - self._taken.value

    @property
    def failure(self) -> str | None:
        """Why the worker can no longer decode, if it died (not if it was stopped)."""
        return None if self._stopped else self._ended

    def start(self, timeout: float = 600) -> None:
        """Start the worker process and wait until its model is loaded.

        Raises:
            Seq2SeqError: the model did not load (the worker's one-line reason).
        """
        if self._process.is_alive() or self._ready.is_set():
            return
        self._process.start()
        # It ignores SIGTERM (see run_worker), which multiprocessing's own exit handler sends
        # before joining it: so a server that exits without stop() (a later checkpoint failed
        # to load) kills it first. atexit runs this before that handler, registered earlier.
        atexit.register(self._kill)
        self._child_conn.close()
        self._reader.start()
        if not self._ready.wait(timeout) or self._ended:
            self._process.kill()
            raise Seq2SeqError(f"{self.spec.checkpoint}: the decoding process did not start "
                               f"({self._ended or f'not ready in {timeout:g} s'})")

    def submit(self, job: Job) -> None:
        """Send ``job`` to the worker.

        Raises:
            QueueFull: the queue would pass its limit, or the worker is stopping or gone.
        """
        count = len(job.sentences)
        with self._sending:  # so that no job is sent after "stop"
            with self._lock:
                if self._ended:
                    raise QueueFull(self._ended)
                queued = self.queued
                if queued and queued + count > self.queue_limit:
                    raise QueueFull(f"{queued} sentences are waiting")
                job.key = next(self._ids)
                self._jobs[job.key] = job
                self._sent += count
            self._send(("job", job.key, job.sentences, dataclasses.asdict(job.settings),
                        job.attention))

    def cancel(self, job: Job) -> None:
        """The request gave up: the worker skips the job if it has not started it, and its
        result, if one comes, is dropped."""
        with self._sending:
            with self._lock:
                known = self._jobs.pop(job.key, None) is not None
            if known and not self._ended:
                self._send(("cancel", job.key))

    def stop(self, timeout: float = 600) -> None:
        """Let the worker decode what it was sent, then end it; returns when it has ended."""
        with self._sending:
            with self._lock:
                self._stopped = True
                ended, self._ended = self._ended, self._ended or "the server is shutting down"
            if not ended:
                self._send(("stop",))
        if self._reader.is_alive():
            self._reader.join(timeout)
        self._process.join(timeout)
        self._kill()

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send_bytes(encode(message))
        except OSError:  # the worker is gone: the reader fails its jobs
            pass

    def _read(self) -> None:
        """Deliver what the worker sends until it ends; then fail the jobs it still held."""
        why = ""
        while True:
            try:
                message = json.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "result":
                _, key, result, batches, translated = message
                for size in batches:
                    self.on_batch(size)
                if translated:
                    self.on_translated(translated)
                with self._lock:
                    job = self._jobs.pop(key, None)
                if job is not None:
                    job.deliver(DecodeFailed(result["error"]) if isinstance(result, dict)
                                else [translation_from(item) for item in result])
            elif kind == "batches":
                for size in message[1]:
                    self.on_batch(size)
            elif kind == "ready":
                self.precision = message[1]
                self._ready.set()
            elif kind == "failed":  # the model did not load
                why = message[1]
                break
        if not why:
            self._process.join(5)
            why = f"the decoding process has ended (exit code {self._process.exitcode})"
        with self._lock:
            self._ended = self._ended or why
            jobs, self._jobs = list(self._jobs.values()), {}
        self._ready.set()
        if jobs:
            print(f"{self.name}: {why}; {len(jobs)} requests failed", file=sys.stderr)
        for job in jobs:
            job.deliver(WorkerGone(why))


def run_worker(conn: Any, spec: LoadSpec, max_sentences: int, wait_s: float,
               taken: Any) -> None:
    """The worker process: load the model, then run jobs until told to stop (or until the
    server process is gone)."""
    # Ctrl-C reaches the whole process group: the server decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A bug that ends the decoding thread ends the process, so that the server sees it (its
    # requests fail, /health answers 503) instead of timing out request after request.
    threading.excepthook = die_with_traceback
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        data = encode(message)
        with send_lock:
            try:
                conn.send_bytes(data)
            except OSError:  # the server process is gone
                os._exit(0)

    keep_freed_memory()  # as every seq2seq command does at start (a spawned process does not)
    try:
        from seq2seq.translate import CLI_NAMES, Translator

        if spec.threads:
            torch.set_num_threads(spec.threads)
        else:  # (as every seq2seq command does at start)
            from seq2seq.cpuinfo import cap_torch_threads
            cap_torch_threads()
        translator = Translator.from_checkpoint(spec.checkpoint, device=spec.device,
                                                quantize=spec.quantize,
                                                precision=spec.precision,
                                                names=CLI_NAMES)
    except Exception as error:  # noqa: BLE001 - the server reports it and exits
        send(("failed", str(error).splitlines()[0] if str(error) else type(error).__name__))
        return
    Inbox(conn, send, taken).run(translator, max_sentences, wait_s)


def die_with_traceback(args: Any) -> None:
    threading.__excepthook__(args)
    os._exit(1)


class Inbox:
    """The worker process's side: jobs in from the pipe, results (with the batch sizes decoded
    since the last result, for metrics) out."""

    def __init__(self, conn: Any, send: Callable[[tuple], None], taken: Any):
        self.conn, self.send, self.taken = conn, send, taken
        self.jobs: dict[int, Job] = {}
        self.received = 0  # sentences
        self.batches: list[int] = []
        self.flushed = time.monotonic()
        self.translated = 0
        self.worker: BatchWorker | None = None

    def run(self, translator: Any, max_sentences: int, wait_s: float) -> None:
        # The server enforces the queue limit; here every job it sent is taken.
        self.worker = BatchWorker(translator, max_sentences, wait_s, queue_limit=2**62,
                                  on_batch=self.on_batch, on_translated=self.on_translated,
                                  on_taken=self.publish)
        self.worker.start()
        self.send(("ready", translator.precision))
        while True:
            try:
                message = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):  # the server process is gone: nobody to answer
                os._exit(0)
            if message[0] == "job":
                _, key, sentences, settings, attention = message
                job = Job(sentences, DecodeConfig(**settings), attention,
                          deliver=self.deliverer(key))
                self.jobs[key] = job
                self.worker.submit(job)
                # Counted after it is queued: a publish in between errs towards more waiting.
                self.received += len(sentences)
                self.publish()
            elif message[0] == "cancel":
                cancelled = self.jobs.pop(message[1], None)  # never answered: forget it
                if cancelled is not None:
                    self.worker.cancel(cancelled)
            elif message[0] == "stop":
                break
        self.worker.stop()

    def publish(self) -> None:
        """Tell the server how many sentences have left the queue."""
        self.taken.value = self.received - self.worker.queued

    def on_batch(self, size: int) -> None:  # the worker thread
        self.batches.append(size)
        self.publish()
        now = time.monotonic()
        if now - self.flushed >= METRICS_EVERY_S:  # a long decode still shows in /metrics
            self.flushed = now
            batches, self.batches = self.batches, []
            self.send(("batches", batches))

    def on_translated(self, count: int) -> None:
        self.translated += count

    def deliverer(self, key: int) -> Callable[[Any], None]:
        def deliver(result: Any) -> None:  # the worker thread
            job = self.jobs.pop(key, None)
            if isinstance(result, BaseException):
                result = {"error": f"{type(result).__name__}: {result}"}
            else:
                result = [translation_to(translation, job is not None and job.attention)
                          for translation in result]
            batches, self.batches = self.batches, []
            translated, self.translated = self.translated, 0
            self.publish()
            self.send(("result", key, result, batches, translated))
        return deliver


def encode(message: tuple) -> bytes:
    return json.dumps(message, ensure_ascii=False).encode("utf-8")


def translation_to(translation: Any, attention: bool) -> dict[str, Any]:
    """A ``Translation`` as JSON values, with attention matrices only if its request asked."""
    return {"hypotheses": translation.hypotheses, "scores": translation.scores,
            "src_pieces": translation.src_pieces, "hyp_pieces": translation.hyp_pieces,
            "attention": [a.tolist() if attention and a is not None else None
                          for a in translation.attention]}


def translation_from(fields: dict[str, Any]) -> Any:
    """The ``Translation`` that :func:`translation_to` wrote (attention as float32 tensors,
    the values the search computed)."""
    from seq2seq.translate import Translation

    attention = [None if a is None else torch.tensor(a, dtype=torch.float32)
                 for a in fields.pop("attention")]
    return Translation(**fields, attention=attention)
