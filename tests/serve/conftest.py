"""``seq2seq serve`` as users run it: a real server in a subprocess on a free loopback port, on a
quickstart checkpoint trained once per test session."""

from __future__ import annotations

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


TIE = 2e-4
"""Scores (as ``translate --nbest`` prints them, to 4 decimals) this close are a tie."""
NBEST = 5  # the quickstart recipe's beam


class Offline:
    """What ``seq2seq translate`` writes for ``lines``: :attr:`best`, and the n-best lists
    (:attr:`nbest`, ``(score, text)`` pairs) that say which hypotheses tie.

    A served answer is translate's, except where two hypotheses score the same to within float
    rounding: which of them a search ranks first can then depend on the other sentences it
    decodes with, since products and softmaxes round differently at other batch shapes (the
    README, under serving). The quickstart checkpoint the tests train for 120 updates repeats
    words, so its hypotheses often differ by word order alone and tie but for rounding.
    """

    def __init__(self, checkpoint: Path, lines: list[str], tmp: Path):
        self.lines = lines
        self.best = translate_offline(checkpoint, lines, tmp)
        assert len(self.best) == len(lines)
        self.nbest: list[list[tuple[float, str]]] = [[] for _ in lines]
        for row in translate_offline(checkpoint, lines, tmp, "--nbest", str(NBEST)):
            index, score, text = row.split("\t")  # index: of the input line
            self.nbest[int(index)].append((float(score), text))
        assert all(self.nbest)

    def tied(self, line: int, rank: int = 0) -> set[str]:
        """The hypotheses of ``line`` that score as its ``rank``-th best does."""
        score = self.nbest[line][rank][0]
        return {text for other, text in self.nbest[line] if abs(score - other) <= TIE}

    def check(self, answers: list[str], strip: bool = False) -> None:
        """Assert that each answer is translate's, or a tie of it (for 2% of lines at most);
        ``strip``: compared without surrounding whitespace (as a browser shows text)."""
        assert len(answers) == len(self.best)
        differ = [i for i, (answer, best) in enumerate(zip(answers, self.best))
                  if (answer.strip() != best.strip() if strip else answer != best)]
        wrong = [(i, self.lines[i][:60], answers[i], self.best[i]) for i in differ
                 if not {answers[i], self.best[i]} <= self.tied(i)]
        assert not wrong, wrong[:5]
        assert len(differ) <= max(1, len(answers) // 50), [
            (i, answers[i], self.best[i]) for i in differ]

    def check_nbest(self, line: int, hypotheses: list[str]) -> None:
        """Assert that ``hypotheses`` are translate's n-best list of ``line``, but for ties
        ranked the other way round."""
        assert len(set(hypotheses)) == len(hypotheses) <= len(self.nbest[line])
        for rank, text in enumerate(hypotheses):
            assert text in self.tied(line, rank), (line, rank, hypotheses, self.nbest[line])


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
