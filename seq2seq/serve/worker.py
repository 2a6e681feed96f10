"""Dynamic batching: one decoding thread per model, fed by a bounded queue of jobs.

A job is the sentences of one request. Beam search batches them continuously: the worker runs
one :class:`~seq2seq.search.beam.BeamSearch` step after another, and between steps adds the
sentences of the jobs that arrived meanwhile (up to ``max_sentences`` in the search) once a
quarter of the search's size is waiting or the oldest has waited ``wait_s``, so a new request
never waits for the batch in progress to finish, and the batch never shrinks to its slowest
sentence. Each sentence counts its own steps, so it gets what ``seq2seq translate``
writes for it whatever it shares the steps with (tests/search/test_continuous.py), but where
two hypotheses tie to within the rounding that other batch shapes change. A job with
other settings than the search in progress waits, in order, until that search is empty.

Searches that sentences cannot join (greedy search, the CUDA-graphed beam search) are batched
as whole decodes instead: the worker takes the oldest job, keeps taking jobs until it holds
``max_sentences`` sentences or ``wait_s`` has passed, and decodes them with one
``Translator.translate_full`` call per setting.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from seq2seq.config import DecodeConfig
from seq2seq.decoding import pad_sources
from seq2seq.translate import blank_translation

JOIN_FRACTION = 0.25
"""Queued sentences, as a fraction of those in a running search, that join it without waiting
``wait_s`` (as text-generation-inference's ``waiting_served_ratio``)."""


class QueueFull(Exception):
    """The model's queue holds too many sentences (or the worker is stopping or gone)."""


class WorkerGone(RuntimeError):
    """Delivered to the jobs of a worker that died (its process was killed)."""


class DecodeFailed(RuntimeError):
    """Delivered to a job whose search failed in a worker process; the message names the
    error's type and says what it said (``OutOfMemoryError: CUDA out of memory ...``)."""


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
    queued_at: float = 0.0
    """``time.monotonic()`` when the job was queued (set by ``BatchWorker.submit``)."""
    key: int = -1
    """Its number in a :class:`~seq2seq.serve.process.WorkerProcess`."""


@dataclasses.dataclass(eq=False)
class _Live:
    """A job whose sentences are in the search."""

    job: Job
    results: list[Any]
    """One ``Translation`` per sentence: blank ones from the start, the others as they end."""
    remaining: int
    """Sentences still in the search."""
    src_ids: dict[int, list[int]]
    """Source token ids of each decoded sentence, by index in the job."""


class BatchWorker:
    """One model's queue and the thread that decodes it.

    Args:
        translator: a ``seq2seq.translate.Translator``.
        max_sentences: most sentences in the search at once, or gathered into one whole decode
            (1: no batching across requests).
        wait_s: how long a queued job waits before it joins a running search (unless
            :data:`JOIN_FRACTION` of its size is queued), or a whole decode waits for more
            jobs after taking the first.
        queue_limit: most sentences waiting; ``submit`` refuses a job beyond it.
        on_batch: called with the number of sentences of every search step or whole decode
            (metrics).
        on_translated: called with the number of sentences decoded for each job delivered.
        on_taken: called when jobs have left the queue, before they are decoded.
    """

    def __init__(self, translator: Any, max_sentences: int, wait_s: float, queue_limit: int,
                 on_batch: Callable[[int], None] = lambda size: None,
                 on_translated: Callable[[int], None] = lambda count: None,
                 on_taken: Callable[[], None] = lambda: None, name: str = "worker"):
        self.translator, self.on_taken = translator, on_taken
        self.max_sentences, self.wait_s, self.queue_limit = max_sentences, wait_s, queue_limit
        self.on_batch, self.on_translated = on_batch, on_translated
        self._search = LiveSearch(translator, on_batch, on_translated)
        self._jobs: deque[Job] = deque()
        self._queued = 0  # sentences in self._jobs
        self._stopping = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def queued(self) -> int:
        """Sentences waiting (not counting the batch being decoded)."""
        return self._queued

    @property
    def failure(self) -> str | None:
        """Why the worker can no longer decode, if it died (never for a thread)."""
        return None

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
            job.queued_at = time.monotonic()
            self._jobs.append(job)
            self._queued += len(job.sentences)
            self._changed.notify()

    def cancel(self, job: Job) -> None:
        """The request gave up: the job is skipped if it has not started."""
        job.cancelled = True

    def stop(self) -> None:
        """Decode what is queued (skipping jobs whose requests gave up), then end the thread;
        returns when it has ended."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._search.live:
                    if self._stopping:
                        return
                    self._changed.wait()
                if not self._search.live and self._search.search_for(self._jobs[0]) is None:
                    batch, joining = self._gather(), []
                elif self._join_now():
                    batch, joining = [], self._admit()
                else:
                    batch, joining = [], []
            if batch or joining:
                self.on_taken()
            if batch:
                decode_whole(self.translator, batch, self.on_batch, self.on_translated)
            else:
                self._search.join(joining)
                self._search.step()

    def _join_now(self) -> bool:
        """Whether the queued jobs should join the search before the next step (under the
        lock): at once into an idle search; into a running one when the queue holds
        :data:`JOIN_FRACTION` of the search's sentences or its oldest job has waited
        ``wait_s``. Each join encodes its sentences as one batch, and small batches encode at
        several times the cost per sentence; joining every step would spend a fifth of the
        time encoding one or two sentences at a time."""
        if not self._search.live or not self._jobs:
            return True
        if self._queued >= JOIN_FRACTION * len(self._search):
            return True
        return time.monotonic() - self._jobs[0].queued_at >= self.wait_s

    def _admit(self) -> list[Job]:
        """Take the queued jobs that can join the search now (under the lock): in order, with
        the search's settings, while the search holds at most ``max_sentences`` sentences (an
        idle search takes one job of any size)."""
        taken: list[Job] = []
        count = len(self._search)
        while self._jobs:
            job = self._jobs[0]
            if job.cancelled:
                self._jobs.popleft()
                self._queued -= len(job.sentences)
                continue
            if self._search.live or taken:
                if not self._search.has_settings_of(job):
                    break
                if count + len(job.sentences) > self.max_sentences:
                    break
            elif self._search.search_for(job) is None:
                break
            taken.append(self._jobs.popleft())
            self._queued -= len(job.sentences)
            count += len(job.sentences)
        return taken

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
                self._changed.wait(min(remaining, threading.TIMEOUT_MAX))  # (else Overflow)
            self._queued -= count
            return batch


class LiveSearch:
    """The joinable beam search a worker runs and the jobs whose sentences are in it."""

    def __init__(self, translator: Any, on_batch: Callable[[int], None],
                 on_translated: Callable[[int], None]):
        self.translator, self.on_batch, self.on_translated = translator, on_batch, on_translated
        self.live: set[_Live] = set()  # jobs whose sentences are in the search
        self.search: Any = None  # the joinable BeamSearch of key's settings
        self.key: Any = None

    def __len__(self) -> int:
        """Sentences in the search."""
        return len(self.search) if self.live else 0

    def has_settings_of(self, job: Job) -> bool:
        return (job.settings, job.attention) == self.key

    def search_for(self, job: Job) -> Any:
        """The joinable search for ``job``'s settings (a new one unless the current search has
        them); None where they need a whole decode (greedy, CUDA graphs)."""
        key = (job.settings, job.attention)
        if key != self.key:
            self.key = key
            self.search = self.translator.joinable_search(job.settings, job.attention)
        return self.search

    def join(self, jobs: list[Job]) -> None:
        """Encode the sentences of ``jobs`` and add them to the search, in one batch."""
        keys, src_ids = [], []
        for job in jobs:
            try:
                todo, ids = self.translator.encode_sources(job.sentences)
            except Exception as error:  # a tokenizer failure: this job learns it
                job.deliver(error)
                continue
            live = _Live(job, [blank_translation() for _ in job.sentences], len(todo), {})
            if not todo:
                self.deliver(live)
                continue
            self.live.add(live)
            for i, sentence_ids in zip(todo, ids):
                live.src_ids[i] = sentence_ids
                keys.append((live, i))
                src_ids.append(sentence_ids)
        if keys:
            try:
                src, src_lens = pad_sources(src_ids, self.translator.device)
                self.search.add(src, src_lens, keys)
            except Exception as error:
                self.fail(error)

    def step(self) -> None:
        """One step of the search; deliver the jobs whose last sentence it finished."""
        if not self.live:
            return
        size = len(self.search)
        try:
            done = self.search.step()
        except Exception as error:  # a bug or an exhausted device: every live job learns it
            self.fail(error)
            return
        self.on_batch(size)
        for (live, i), nbest in done:
            live.results[i] = self.translator.translation(live.src_ids[i], nbest,
                                                          live.job.attention)
            live.remaining -= 1
            if not live.remaining:
                self.live.discard(live)
                self.deliver(live)

    def deliver(self, live: _Live) -> None:
        self.on_translated(len(live.src_ids))
        live.job.deliver(live.results)

    def fail(self, error: Exception) -> None:
        """Deliver ``error`` to every live job and start the next search afresh."""
        for live in self.live:
            live.job.deliver(error)
        self.live.clear()
        self.key = self.search = None


def decode_whole(translator: Any, batch: list[Job], on_batch: Callable[[int], None],
                 on_translated: Callable[[int], None]) -> None:
    """Decode the live jobs of ``batch`` as whole batches, one ``translate_full`` call per
    setting, and deliver (searches that sentences cannot join)."""
    groups: dict[DecodeConfig, list[Job]] = {}
    for job in batch:
        if not job.cancelled:
            groups.setdefault(job.settings, []).append(job)
    for settings, jobs in groups.items():
        sentences = [sentence for job in jobs for sentence in job.sentences]
        try:
            results = translator.translate_full(
                sentences, settings, return_attention=any(job.attention for job in jobs))
        except Exception as error:  # a bug or an exhausted device: every job learns it
            for job in jobs:
                job.deliver(error)
            continue
        on_batch(len(sentences))
        on_translated(len(sentences))
        start = 0
        for job in jobs:
            job.deliver(results[start:start + len(job.sentences)])
            start += len(job.sentences)
