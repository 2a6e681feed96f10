"""The decoding worker in-process: requests that join a beam search in progress get what
``Translator.translate_full`` gives them alone; other settings wait their turn; stop drains."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from seq2seq.serve.worker import BatchWorker, QueueFull
from seq2seq.translate import Translator
from tests.serve.conftest import Inbox, submit


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    torch.set_num_threads(1)
    return Translator.from_checkpoint(checkpoint, device="cpu")


def test_jobs_joining_a_search_in_progress_get_their_own_translations(translator,
                                                                       test_sentences):
    plain = translator.decode_settings(beam=4, alpha=0.6)
    nbest = translator.decode_settings(beam=4, nbest=3, alpha=0.6)
    greedy = translator.decode_settings(beam=1, alpha=0.0)
    steps: list[int] = []
    worker = BatchWorker(translator, max_sentences=8, wait_s=0.0, queue_limit=1000,
                         on_batch=steps.append)
    worker.start()
    jobs = []
    # Staggered: each job arrives while earlier ones are being decoded. Blank lines, a job
    # bigger than max_sentences, other settings and an attention request are mixed in.
    plan = [([test_sentences[0]], plain, False), ([test_sentences[1], "", test_sentences[2]],
                                                  plain, False),
            (test_sentences[3:15], plain, False), ([test_sentences[15]], nbest, False),
            ([test_sentences[16]], plain, True), (["  ", ""], plain, False),
            (test_sentences[17:20], greedy, False), ([test_sentences[20]], plain, False)]
    for sentences, settings, attention in plan:
        jobs.append((sentences, settings, attention,
                     submit(worker, sentences, settings, attention)))
        time.sleep(0.02)
    for _, _, _, inbox in jobs:
        assert inbox.done.wait(120)
    worker.stop()
    for sentences, settings, attention, inbox in jobs:
        expected = translator.translate_full(sentences, settings, return_attention=attention)
        assert not isinstance(inbox.result, BaseException), inbox.result
        assert [t.hypotheses for t in inbox.result] == [t.hypotheses for t in expected]
        for got, want in zip(inbox.result, expected):
            assert got.scores == pytest.approx(want.scores, abs=1e-4)
            assert got.hyp_pieces == want.hyp_pieces and got.src_pieces == want.src_pieces
            for a, b in zip(got.attention, want.attention):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Sentences shared steps, and the search never held more than max_sentences, except for the
    # job of 12 that came to an idle search.
    assert max(steps) > 1
    assert max(steps) <= 12


def test_stop_decodes_what_was_accepted_and_refuses_more(translator, test_sentences):
    settings = translator.decode_settings(beam=3)
    worker = BatchWorker(translator, max_sentences=4, wait_s=0.0, queue_limit=1000)
    worker.start()
    inboxes = [submit(worker, [sentence], settings) for sentence in test_sentences[:10]]
    worker.stop()
    assert all(inbox.done.is_set() for inbox in inboxes)
    expected = translator.translate_full(test_sentences[:10], settings)
    assert [inbox.result[0].hypotheses for inbox in inboxes] == [t.hypotheses for t in expected]
    with pytest.raises(QueueFull):
        submit(worker, ["one more"], settings)


def test_a_failing_step_reaches_every_live_job_and_the_worker_goes_on(translator,
                                                                      test_sentences,
                                                                      monkeypatch):
    settings = translator.decode_settings(beam=3)
    worker = BatchWorker(translator, max_sentences=8, wait_s=0.0, queue_limit=1000)
    real_step = type(translator.model).step
    calls = {"n": 0}

    def flaky_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the device is gone")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(type(translator.model), "step", flaky_step)
    first = [submit(worker, [sentence], settings) for sentence in test_sentences[:3]]
    worker.start()
    for inbox in first:
        assert inbox.done.wait(60)
    assert all(isinstance(inbox.result, RuntimeError) for inbox in first)
    after = submit(worker, [test_sentences[3]], settings)
    assert after.done.wait(60)
    worker.stop()
    assert after.result[0].hypotheses == translator.translate_full(
        [test_sentences[3]], settings)[0].hypotheses


@pytest.mark.parametrize("arriving, joins_at_once", [(1, False), (2, True)])
def test_a_running_search_is_joined_by_a_quarter_of_its_size_or_after_the_wait(
        translator, test_sentences, monkeypatch, arriving, joins_at_once):
    # No sentence can end before step 6, so the search holds its 8 sentences until then. A
    # job arriving after step 1 joins at step 2 if it brings a quarter of that (2 sentences);
    # one sentence waits (wait_s is a minute) until the search has shrunk to 4 or fewer.
    settings = dataclasses.replace(translator.decode_settings(beam=3), min_len=6)
    late = test_sentences[8:8 + arriving]
    steps, joined_after = [0], []
    encode = translator.encode_sources

    def watched_encode(sentences):
        if sentences == late:  # the search's size and steps when the late job joins it
            joined_after.append((steps[0], len(worker._search)))
        return encode(sentences)

    def on_batch(size: int) -> None:
        steps[0] += 1
        if steps[0] == 1:
            inboxes.append(submit(worker, late, settings))

    monkeypatch.setattr(translator, "encode_sources", watched_encode)
    inboxes: list[Inbox] = []
    worker = BatchWorker(translator, max_sentences=16, wait_s=60.0, queue_limit=1000,
                         on_batch=on_batch)
    first = submit(worker, test_sentences[:8], settings)
    worker.start()
    assert first.done.wait(120) and inboxes and inboxes[0].done.wait(120)
    worker.stop()
    [(step, live)] = joined_after
    if joins_at_once:
        assert (step, live) == (1, 8)
    else:
        assert step >= 6 and live <= 4
    expected = translator.translate_full(late, settings)
    assert [t.hypotheses for t in inboxes[0].result] == [t.hypotheses for t in expected]
