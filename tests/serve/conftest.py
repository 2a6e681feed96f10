"""``seq2seq serve`` as users run it: a real server in a subprocess on a free loopback port, on a
quickstart checkpoint trained once per test session."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from seq2seq.translate_io import DEFAULT_MAX_CHARS
from tests.conftest import REPO

# One thread everywhere: the tests run beside other work, and `seq2seq translate` (the
# reference) and the server then compute with the same kernels.
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
TRAIN_STEPS = 120


def seq2seq(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m seq2seq ARGS``; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "seq2seq", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """``best.pt`` of the quickstart recipe after a few updates on part of its data: enough
    for real SentencePiece pieces and a real model; what it says does not matter here."""
    root = tmp_path_factory.mktemp("quickstart")
    result = seq2seq("train", REPO / "recipes" / "quickstart.yaml", f"output_dir={root}/run",
                     f"train.max_steps={TRAIN_STEPS}", f"train.valid_every={TRAIN_STEPS}",
                     "data.train.size=4000", "data.valid.size=50",
                     "data.test.synthetic.size=50", "data.num_proc=1", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run" / "best.pt"


@pytest.fixture(scope="session")
def test_sentences(tmp_path_factory) -> list[str]:
    """The quickstart task's 500 test sentences (English)."""
    root = tmp_path_factory.mktemp("generated")
    result = seq2seq("generate-data", root, "--train", 0, "--valid", 0, "--test", 500, cwd=root)
    assert result.returncode == 0, result.stderr
    return (root / "test.en").read_text(encoding="utf-8").splitlines()


def translate_offline(checkpoint: Path, lines: list[str], tmp: Path, *flags: str) -> list[str]:
    """What ``seq2seq translate`` writes for ``lines`` (one output line per input line)."""
    source, output = tmp / "offline.in", tmp / "offline.out"
    source.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    result = seq2seq("translate", "--checkpoint", checkpoint, "--input", source, "--output",
                     output, *flags, cwd=tmp)
    assert result.returncode == 0, result.stderr
    return output.read_bytes().decode("utf-8").split("\n")[:-1]


NOISE = 1e-6
"""Rounding-level noise: the standard deviation of what :class:`Noisy` adds to each
log-probability (fp32 rounds a log-probability of -10 by up to 5e-7)."""
TRIES = 30


class Noisy(nn.Module):
    """``model`` with Gaussian noise of :data:`NOISE` added to every log-probability it gives
    the search: another rounding of the same computation."""

    def __init__(self, model: nn.Module, seed: int):
        super().__init__()
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)

    def encode(self, *args):
        return self.model.encode(*args)

    def init_state(self, *args):
        return self.model.init_state(*args)

    def resize_source(self, *args):
        return self.model.resize_source(*args)

    def output_rows(self, *args):
        return self.model.output_rows(*args)

    def step(self, *args, **kwargs):
        log_probs, state, attn = self.model.step(*args, **kwargs)
        noise = torch.randn(log_probs.shape, generator=self.generator) * NOISE
        return log_probs + noise.to(log_probs.dtype), state, attn


def translates_with_noise(translator, settings, line: str, answer: list[str]) -> bool:
    """Whether ``translator`` gives ``answer`` (n-best texts) for ``line`` with ``settings``
    and rounding-level noise added to its log-probabilities, for one of :data:`TRIES` seeds."""
    text = line[:DEFAULT_MAX_CHARS].strip()
    model = translator.model
    try:
        for seed in range(TRIES):
            translator.model = Noisy(model, seed)
            if translator.translate_full([text], settings)[0].hypotheses == answer:
                return True
    finally:
        translator.model = model
    return False


class Offline:
    """What ``seq2seq translate`` writes for ``lines`` (the ``nbest`` best of each,
    :attr:`best`), and :meth:`check`, which holds served answers to it.

    A sentence goes through the same operations whatever a search batches it with, but not
    always with the same rounding (the README, under serving): products and softmaxes round
    differently at other batch shapes. Where two partial hypotheses score the same to within
    that rounding at some step, which one the beam keeps can then depend on the batch, and the
    whole output with it. The quickstart checkpoint the tests train for 120 updates repeats
    words, so its hypotheses often differ by word order alone and tie but for rounding. So an
    answer that differs from translate's passes only where translate itself gives it with
    rounding-level noise added to its log-probabilities (one of :data:`TRIES` seeds), and for
    2% of lines at most: a mixed-up answer, another setting or another model cannot pass.
    """

    def __init__(self, checkpoint: Path, lines: list[str], tmp: Path, nbest: int = 1):
        self.checkpoint, self.lines = checkpoint, lines
        flags = ["--nbest", str(nbest)] if nbest > 1 else []
        rows = translate_offline(checkpoint, lines, tmp, *flags)
        if nbest == 1:
            self.best = [[row] for row in rows]
        else:
            self.best = [[] for _ in lines]
            for row in rows:
                index, _, text = row.split("\t")  # index: of the input line
                self.best[int(index)].append(text)
        assert len(self.best) == len(lines) and all(self.best)

    @functools.cached_property
    def translator(self):
        from seq2seq.translate import Translator

        return Translator.from_checkpoint(self.checkpoint, device="cpu")

    def with_noise(self, line: int, answer: list[str]) -> bool:
        """Whether ``translate`` gives ``answer`` (n-best texts) for ``line`` with
        rounding-level noise, for one of :data:`TRIES` seeds."""
        settings = self.translator.decode_settings(nbest=len(answer))
        return translates_with_noise(self.translator, settings, self.lines[line], answer)

    def check(self, answers: list[str] | list[list[str]], strip: bool = False) -> None:
        """Assert that each answer (a text, or with ``nbest`` a list of them) is translate's,
        or translate's with rounding-level noise, for 2% of lines at most; ``strip``:
        compared without surrounding whitespace (as a browser shows text)."""
        assert len(answers) == len(self.best)
        answers = [[a] if isinstance(a, str) else list(a) for a in answers]
        if strip:
            answers = [[a.strip() for a in answer] for answer in answers]
        differ = [i for i, answer in enumerate(answers)
                  if answer != ([b.strip() for b in self.best[i]] if strip else self.best[i])]
        assert len(differ) <= max(1, len(answers) // 50), [
            (i, answers[i], self.best[i]) for i in differ]
        wrong = [(i, self.lines[i][:60], answers[i], self.best[i]) for i in differ
                 if not self.with_noise(i, answers[i])]
        assert not wrong, wrong


class Server:
    """A ``seq2seq serve`` subprocess; ``url`` ends in ``/``."""

    def __init__(self, checkpoint: Path, log: Path, *flags: str):
        self.log = log
        self.handle = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "seq2seq", "serve", str(checkpoint), "--port", "0",
             *map(str, flags)], stdout=self.handle, stderr=subprocess.STDOUT, env=ENV)
        self.url = self._wait_listening(timeout=120)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", self.output())
            if found:
                url = found.group(1) + "/"
                if self._healthy(url):
                    return url
            assert self.process.poll() is None, f"server exited:\n{self.output()}"
            time.sleep(0.1)
        raise AssertionError(f"server did not start in {timeout} s:\n{self.output()}")

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            return httpx.get(url + "health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.handle.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.handle.close()


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    """A server with the default limits (a higher character limit for the long lines)."""
    running = Server(checkpoint, tmp_path_factory.mktemp("server") / "serve.log",
                     "--char-limit", "20000")
    yield running
    code = running.stop()
    assert code == 0, running.output()


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("# keys of the limits server\nsecret-key\nother-key\n", encoding="utf-8")
    return path


LIMITS = {"char_limit": 200, "body_limit": 2000, "max_texts": 5, "queue_size": 4}


@pytest.fixture(scope="session")
def limited_server(checkpoint, api_keys, tmp_path_factory):
    """A server with small limits, API keys, and no batching (so its queue fills fast)."""
    running = Server(checkpoint, tmp_path_factory.mktemp("limited") / "serve.log",
                     "--char-limit", LIMITS["char_limit"], "--body-limit", LIMITS["body_limit"],
                     "--max-texts", LIMITS["max_texts"], "--queue-size", LIMITS["queue_size"],
                     "--batch-size", "1", "--batch-wait-ms", "0", "--api-keys", str(api_keys))
    yield running
    code = running.stop()
    assert code == 0, running.output()


class Inbox:
    """Where one worker job's result lands, and when."""

    def __init__(self) -> None:
        self.result = None
        self.done = threading.Event()

    def __call__(self, result) -> None:
        self.result = result
        self.done.set()


def submit(worker, sentences: list[str], settings, attention=False) -> Inbox:
    """Queue a job on a ``BatchWorker`` or ``WorkerProcess``; its inbox."""
    from seq2seq.serve.worker import Job

    inbox = Inbox()
    worker.submit(Job(sentences, settings, attention, deliver=inbox))
    return inbox
