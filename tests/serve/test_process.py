"""The decoding worker in a process of its own: results equal ``translate_full``'s, attention
only where asked, cancelled jobs forgotten on both sides, a model that cannot load is one line,
and stop ends the process."""

from __future__ import annotations

import pytest
import torch

from seq2seq.errors import Seq2SeqError
from seq2seq.serve.process import LoadSpec, WorkerProcess
from seq2seq.serve.worker import Job
from seq2seq.translate import Translator
from tests.serve.conftest import Inbox, submit


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    torch.set_num_threads(1)
    return Translator.from_checkpoint(checkpoint, device="cpu")


def spec(checkpoint, **changes) -> LoadSpec:
    return LoadSpec(**{"checkpoint": str(checkpoint), "device": "cpu", "quantize": False,
                       "precision": "fp32", "threads": 1, **changes})


def test_jobs_come_back_as_translate_full_gives_them(checkpoint, translator, test_sentences):
    settings = translator.decode_settings(beam=3)
    sizes: list[int] = []
    worker = WorkerProcess(spec(checkpoint), max_sentences=8, wait_s=0.005, queue_limit=1000,
                           on_batch=sizes.append)
    worker.start()
    assert worker.precision == "fp32"
    jobs = [(test_sentences[i:i + 3], i == 6) for i in range(0, 30, 3)]
    inboxes = [submit(worker, sentences, settings, attention) for sentences, attention in jobs]
    assert all(inbox.done.wait(120) for inbox in inboxes)
    for (sentences, attention), inbox in zip(jobs, inboxes):
        expected = translator.translate_full(sentences, settings, return_attention=attention)
        assert [t.hypotheses for t in inbox.result] == [t.hypotheses for t in expected]
        for got, want in zip(inbox.result, expected):
            assert (got.attention[0] is None) == (not attention)
            if attention:  # a copy of the sentence's own matrix, not the search's history
                torch.testing.assert_close(got.attention[0], want.attention[0], atol=1e-5,
                                           rtol=0)
                assert got.attention[0].untyped_storage().nbytes() == (
                    got.attention[0].numel() * got.attention[0].element_size())
    assert sum(sizes) >= 30 and worker.queued == 0 and worker.failure is None
    worker.stop()
    assert worker._process.exitcode == 0 and worker.failure is None


def test_a_cancelled_job_is_forgotten_and_the_queue_empties(checkpoint, translator,
                                                           test_sentences):
    settings = translator.decode_settings(beam=3)
    worker = WorkerProcess(spec(checkpoint), max_sentences=1, wait_s=0.0, queue_limit=1000)
    worker.start()
    first = submit(worker, test_sentences[:40], settings)  # keeps the worker busy
    given_up = Job(test_sentences[40:80], settings, False, deliver=Inbox())
    worker.submit(given_up)
    worker.cancel(given_up)
    last = submit(worker, test_sentences[80:81], settings)
    assert first.done.wait(120) and last.done.wait(120)
    assert not given_up.deliver.done.is_set() and worker._jobs == {}
    assert worker.queued == 0
    worker.stop()
    assert worker._process.exitcode == 0


def test_a_model_that_cannot_load_is_one_line(tmp_path, checkpoint):
    with pytest.raises(Seq2SeqError, match="did not start .*--quantize and --precision bf16"):
        WorkerProcess(spec(checkpoint, quantize=True, precision="bf16"), 4, 0.0, 10).start()
    with pytest.raises(Seq2SeqError, match="did not start"):
        WorkerProcess(spec(tmp_path / "missing.pt"), 4, 0.0, 10).start()
