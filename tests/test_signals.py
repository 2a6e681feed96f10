"""Stop signals (seq2seq/signals.py): a library between the signal and the CLI cannot lose it."""

import os
import signal

import pytest

from seq2seq.signals import stops_kept


class Stop(BaseException):
    pass


@pytest.fixture
def sigterm_raises_stop():
    def handler(signum, frame):
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_that_a_library_swallows_is_raised_at_the_end_of_the_block(sigterm_raises_stop):
    """A Ctrl-C in datasets' fork hook was discarded ("Exception ignored in ...") and prepare
    went on to exit 0."""
    done = []
    with pytest.raises(Stop), stops_kept():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:  # noqa: BLE001 - what the library does
            pass
        done.append("the rest of the block")
    assert done == ["the rest of the block"]


def test_a_stop_that_a_library_replaces_is_raised_as_itself(sigterm_raises_stop):
    """datasets' pool clean-up raised a TimeoutError over the KeyboardInterrupt: exit 1 and a
    traceback instead of 130."""
    with pytest.raises(Stop), stops_kept():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:
            raise TimeoutError("the pool's clean-up") from None
    with pytest.raises(ValueError, match="a failure of its own"), stops_kept():
        raise ValueError("a failure of its own")  # no signal: the block's error stands
    assert signal.getsignal(signal.SIGTERM).__name__ == "handler"  # put back


def test_a_ctrl_c_while_sentencepiece_reads_is_an_interrupt_not_a_failed_training(
        tmp_path, monkeypatch):
    """SentencePiece wrapped the KeyboardInterrupt its sentence iterator raised: `prepare`
    said "error: SentencePiece training failed: ... KeyboardInterrupt", exit 2."""
    from seq2seq import tokenizer
    from seq2seq.config import recipe_from_dict

    def lines(paths):
        for index in range(100_000):
            if index == 1_000:
                os.kill(os.getpid(), signal.SIGINT)
            yield f"word{index % 300} other{index % 7}"

    monkeypatch.setattr(tokenizer, "_lines", lines)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tokenizer._train_model(recipe_from_dict({}).tokenizer, [tmp_path / "unused.txt"])
    finally:
        signal.signal(signal.SIGINT, previous)
