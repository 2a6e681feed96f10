"""The training corpus on its way into the cache: read into Arrow, sampled, encoded, filtered.

The corpus is streamed once into an Arrow file (constant memory); the tokenizer trains on a
uniform sample of it; every pair is then encoded and marked with the reason the training filter
drops it, if any (empty, too long, too unbalanced). :mod:`seq2seq.data.cache` runs these steps
and saves the result.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from seq2seq.config import DataConfig
from seq2seq.data.corpus import DataError, resolve_path
from seq2seq.signals import children_tied
from seq2seq.tokenizer import Tokenizer

ENCODE_BATCH = 10_000  # pairs per ``map`` call: large enough that SentencePiece dominates
SAMPLE_SEED = 0  # the tokenizer's training sample depends on the data only, not on the run

# Why a training pair was dropped; 0 keeps it. Earlier reasons win when several apply.
KEEP, EMPTY, SRC_TOO_LONG, TRG_TOO_LONG, RATIO = range(5)
DROP_REASONS = {EMPTY: "empty", SRC_TOO_LONG: "src_too_long", TRG_TOO_LONG: "trg_too_long",
                RATIO: "ratio"}
FILTER_KEYS = {"src_too_long": "data.max_src_tokens", "trg_too_long": "data.max_trg_tokens",
               "ratio": "data.max_length_ratio"}  # the recipe key behind each reason

ENCODED_FEATURES = datasets.Features({
    "src_ids": datasets.List(datasets.Value("int32")),
    "trg_ids": datasets.List(datasets.Value("int32")),
    "src_len": datasets.Value("int32"),
    "trg_len": datasets.Value("int32"),
    "drop": datasets.Value("int8"),
})


def read_into_arrow(pairs: Iterator[tuple[str, str]], work: Path,
                    show_progress: bool) -> datasets.Dataset:
    """Stream the training pairs into an Arrow file; return it as a ``src``/``trg`` dataset.

    Record batches of ``ENCODE_BATCH`` pairs are written as they are read (constant memory);
    the file is then memory-mapped by ``Dataset.from_file``. This is ~5x cheaper than
    ``Dataset.from_generator``, which encodes every example through Python.
    """
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    path = work / "raw.arrow"
    schema = pa.schema([("src", pa.string()), ("trg", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            tqdm(desc="reading train", unit=" pairs", unit_scale=True,
                 disable=not show_progress) as bar:
        src, trg = [], []

        def flush() -> None:
            writer.write_batch(pa.record_batch([pa.array(src, pa.string()),
                                                pa.array(trg, pa.string())], schema=schema))
            bar.update(len(src))
            src.clear()
            trg.clear()

        for src_line, trg_line in pairs:
            src.append(src_line)
            trg.append(trg_line)
            if len(src) == ENCODE_BATCH:
                flush()
        flush()
    return datasets.Dataset.from_file(str(path))


def check_some_text(raw: datasets.Dataset, data: DataConfig) -> None:
    """Refuse a training corpus without one pair holding text on both sides (else the tokenizer
    fails with a SentencePiece message that names nothing)."""
    import pyarrow.compute as pc

    table = raw.data.table
    both = pc.and_(pc.greater(pc.utf8_length(table.column("src")), 0),
                   pc.greater(pc.utf8_length(table.column("trg")), 0))
    if not pc.any(both).as_py():
        corpus = data.train
        files = [f for f in (corpus.src, corpus.trg, corpus.path, corpus.hf_name) if f]
        where = ", ".join(str(resolve_path(f, data)) if f != corpus.hf_name else f
                          for f in files) or corpus.format
        raise DataError(f"data.train: {where}: no sentence pair has text on both sides "
                        f"({len(raw):,} pairs read)")


def sample_pairs(raw: datasets.Dataset, size: int) -> Iterator[tuple[str, str]]:
    """A uniform random sample of ``size`` pairs (all of them when size is 0 or larger)."""
    if 0 < size < len(raw):
        rows = np.random.default_rng(SAMPLE_SEED).choice(len(raw), size, replace=False)
        raw = raw.select(np.sort(rows))  # sorted: sequential reads of the memory map
    for batch in raw.iter(batch_size=ENCODE_BATCH):
        yield from zip(batch["src"], batch["trg"])


def encode_rows(batch: dict[str, list], tokenizer: Tokenizer, max_src_tokens: int,
                max_trg_tokens: int, max_length_ratio: float) -> dict[str, list]:
    """Encode a batch of pairs and mark the ones the training filter drops."""
    src_ids = tokenizer.encode_src(batch["src"])
    trg_ids = tokenizer.encode_trg(batch["trg"])
    src_len = np.array([len(ids) for ids in src_ids], dtype=np.int32)
    trg_len = np.array([len(ids) for ids in trg_ids], dtype=np.int32)
    drop = np.zeros(len(src_ids), dtype=np.int8)
    # Assigned from the weakest reason to the strongest, so the strongest one is recorded.
    if max_length_ratio > 0:
        longer, shorter = np.maximum(src_len, trg_len), np.maximum(np.minimum(src_len, trg_len), 1)
        drop[longer > max_length_ratio * shorter] = RATIO
    drop[trg_len > max_trg_tokens] = TRG_TOO_LONG
    drop[src_len > max_src_tokens] = SRC_TOO_LONG
    drop[(src_len == 0) | (trg_len == 0)] = EMPTY
    return {"src_ids": src_ids, "trg_ids": trg_ids, "src_len": src_len, "trg_len": trg_len,
            "drop": drop}


@contextmanager
def encoding_pool(num_proc: int | None = None) -> Iterator[None]:
    """The block where ``datasets`` encodes with a pool of ``num_proc`` worker processes: the
    workers are tied to this process (:func:`seq2seq.signals.children_tied`), and those left
    running by a stop are ended: a Ctrl-C while ``datasets`` started its pool's manager left
    the manager's server process unregistered, and Python's exit waited for it for ever.

    Raises:
        EncodingProcessDied: a process of the pool died before its work was done (the kernel
            kills the largest process when memory runs out), for the traceback of whatever
            the pool's clean-up then failed on.
    """
    import multiprocess

    before = set(multiprocess.active_children())
    try:
        with children_tied(), (_StuckPoolWatch() if num_proc else nullcontext()):
            yield
    except BaseException as error:
        left = set(multiprocess.active_children()) - before
        for child in left:
            child.terminate()  # (a tied child obeys this process's SIGTERM)
        for child in left:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
        if num_proc and (_a_process_died(error) or isinstance(error, _PoolStuck)):
            raise EncodingProcessDied(
                f"data.num_proc={num_proc}: a process of the encoding died before its work "
                "was done (killed: the system kills one when memory runs out); nothing was "
                "written: lower data.num_proc, or give prepare more memory") from None
        raise


class EncodingProcessDied(OSError):
    """A process of the encoding pool died (a machine's failure, as a full disk is: exit 1)."""


def _a_process_died(error: BaseException | None) -> bool:
    """Whether ``error`` is how ``datasets`` or the pool reports a process of it gone: a
    worker (``datasets``: "One of the subprocesses has abruptly died"), or the manager of its
    queue (its connection ends: EOFError, a broken pipe, raised in multiprocess's code; then
    a pool's TimeoutError). A broken pipe of stderr (the progress bar's) is not one."""
    if isinstance(error, (EOFError, ConnectionError)):
        frames = traceback.extract_tb(error.__traceback__)
        return bool(frames) and f"{os.sep}multiprocess{os.sep}" in frames[-1].filename
    if isinstance(error, RuntimeError):
        return "abruptly died" in str(error)
    return type(error).__name__ == "TimeoutError" and \
        type(error).__module__.startswith("multiprocess")


class _PoolStuck(Exception):
    """Raised in the main thread when the pool's clean-up waits for a dead process's lock."""


class _StuckPoolWatch:
    """Ends the pool's clean-up when it waits for good after a process of it died. A worker
    waiting for work holds the pool's queue lock; killed then (the OOM killer), it never lets
    go, and ``terminate()``, which takes that lock first (``_help_stuff_finish``), waited for
    ever. When the main thread has been there :attr:`GRACE_S` seconds, tearing the pool down
    for an error that says a process died (:func:`_a_process_died`; a clean-up after success
    is never cut short), a SIGUSR2 to it raises :class:`_PoolStuck` (the wait for the lock is
    interrupted, the handler's exception raised there). Any other SIGUSR2 goes to the handler
    there was before. Main thread only, on POSIX; elsewhere a no-op."""

    GRACE_S = 5.0
    STUCK_IN = "_help_stuff_finish"  # (multiprocess.pool.Pool's, as multiprocessing's)

    def __enter__(self) -> _StuckPoolWatch:
        self.done, self.sent = threading.Event(), False
        self.thread = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR2"):
            self.owner = os.getpid()
            self.previous = signal.signal(signal.SIGUSR2, self._raise)
            self.thread = threading.Thread(target=self._watch, args=(threading.get_ident(),),
                                           name="stuck-pool-watch", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread is not None:
            try:
                self.done.set()
                self.thread.join()
            finally:
                signal.signal(signal.SIGUSR2, self.previous)

    def _raise(self, signum: int, frame: Any) -> None:
        if self.sent and os.getpid() == self.owner and self._stuck(frame):
            self.sent = False
            raise _PoolStuck
        if callable(self.previous):  # anyone else's SIGUSR2, or in a forked worker
            self.previous(signum, frame)
        elif self.previous == signal.SIG_DFL:  # (what it did before: end the process)
            signal.signal(signal.SIGUSR2, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGUSR2)

    def _stuck(self, frame: Any) -> bool:
        """Whether ``frame`` (of the main thread) is in the pool's clean-up waiting for the
        queue's lock while the pool is torn down for a dead process (its ``__exit__``)."""
        waiting = died = False
        while frame is not None:
            waiting = waiting or frame.f_code.co_name == self.STUCK_IN
            died = died or (waiting and frame.f_code.co_name == "__exit__"
                            and _a_process_died(frame.f_locals.get("exc_val")))
            frame = frame.f_back
        return died

    def _watch(self, main: int) -> None:
        since = None
        while not self.done.wait(0.25):
            stuck = self._stuck(sys._current_frames().get(main))
            now = time.monotonic()
            since = (since or now) if stuck else None
            if since is not None and now - since > self.GRACE_S:
                self.sent = True
                signal.pthread_kill(main, signal.SIGUSR2)
                since = None
