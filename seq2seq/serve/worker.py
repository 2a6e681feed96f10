"""Dynamic batching: one decoding thread per model, fed by a bounded queue of jobs.

A job is the sentences of one request. The worker takes the oldest job, then keeps taking jobs
until it holds ``max_sentences`` sentences or ``wait_s`` has passed since it took the first,
decodes them together (one ``Translator.translate_full`` call per distinct decode setting,
which splits them into length-sorted batches of ``batch_tokens`` as ``seq2seq translate``
does) and hands each job its own results. Beam and greedy search give a sentence the same
output whatever it is batched with (tests/search: batched equals one by one), so batching
changes speed, not translations.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from seq2seq.config import DecodeConfig


class QueueFull(Exception):
    """The model's queue holds too many sentences (or the worker is stopping)."""


@dataclasses.dataclass(eq=False)
class Job:
    """The sentences of one request and where their results go."""

    sentences: list[str]
    """Non-blank, stripped sentences."""
    settings: DecodeConfig
    attention: bool
    deliver: Callable[[Any], None]
    """Called from the worker thread with the list of ``Translation`` (one per sentence), or
    with the exception decoding raised."""
    cancelled: bool = False
    """Set by a request that stopped waiting; a job not yet decoded is then skipped."""


class BatchWorker:
    """One model's queue and the thread that decodes it.

    Args:
        translator: a ``seq2seq.translate.Translator``.
        max_sentences: most sentences gathered into one decode (1: no batching across requests).
        wait_s: how long to wait for more jobs after taking the first.
        queue_limit: most sentences waiting; ``submit`` refuses a job beyond it.
        on_batch: called with the number of sentences of every decode (metrics).
    """

    def __init__(self, translator: Any, max_sentences: int, wait_s: float, queue_limit: int,
                 on_batch: Callable[[int], None] = lambda size: None, name: str = "worker"):
        self.translator = translator
        self.max_sentences, self.wait_s, self.queue_limit = max_sentences, wait_s, queue_limit
        self.on_batch = on_batch
        self._jobs: deque[Job] = deque()
        self._queued = 0  # sentences in self._jobs
        self._stopping = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def queued(self) -> int:
        """Sentences waiting (not counting the batch being decoded)."""
        return self._queued

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        A job bigger than the whole queue is taken when the queue is empty, so that it can ever
        be served (its size is bounded by the request limits).

        Raises:
            QueueFull: the queue would pass its limit, or the worker is stopping.
        """
        with self._changed:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._queued and self._queued + len(job.sentences) > self.queue_limit:
                raise QueueFull(f"{self._queued} sentences are waiting")
            self._jobs.append(job)
            self._queued += len(job.sentences)
            self._changed.notify()

    def stop(self) -> None:
        """Decode what is queued (skipping jobs whose requests gave up), then end the thread;
        returns when it has ended."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while (batch := self._gather()) is not None:
            self._decode(batch)

    def _gather(self) -> list[Job] | None:
        """The next jobs to decode together; ``None`` once stopping with nothing queued."""
        with self._changed:
            while not self._jobs and not self._stopping:
                self._changed.wait()
            if not self._jobs:
                return None
            batch = [self._jobs.popleft()]
            count = len(batch[0].sentences)
            deadline = time.monotonic() + self.wait_s
            while count < self.max_sentences:
                if self._jobs:
                    if count + len(self._jobs[0].sentences) > self.max_sentences:
                        break
                    batch.append(self._jobs.popleft())
                    count += len(batch[-1].sentences)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._changed.wait(remaining)
            self._queued -= count
            return batch

    def _decode(self, batch: list[Job]) -> None:
        """Decode the live jobs of ``batch``, one call per decode setting, and deliver."""
        groups: dict[DecodeConfig, list[Job]] = {}
        for job in batch:
            if not job.cancelled:
                groups.setdefault(job.settings, []).append(job)
        for settings, jobs in groups.items():
            sentences = [sentence for job in jobs for sentence in job.sentences]
            try:
                results = self.translator.translate_full(
                    sentences, settings, return_attention=any(job.attention for job in jobs))
            except Exception as error:  # a bug or an exhausted device: every job learns it
                for job in jobs:
                    job.deliver(error)
                continue
            self.on_batch(len(sentences))
            start = 0
            for job in jobs:
                job.deliver(results[start:start + len(job.sentences)])
                start += len(job.sentences)
