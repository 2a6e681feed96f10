"""``seq2seq serve`` started wrongly: one ``error:`` line and exit code 2, before any model loads
where the mistake is in the flags; and the other commands never load FastAPI."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.serve.conftest import ENV, seq2seq


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_other_commands_do_not_import_fastapi():
    code = ("import sys, seq2seq.cli; seq2seq.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--queue-size", "-3"], "--queue-size must be >= 1, got -3"),
    (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0.0"),
    (["--timeout", "nan"], "--timeout must be a number of seconds > 0, got nan"),
    (["--timeout", "inf"], "--timeout must be a number of seconds > 0, got inf"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be a number >= 0, got -1.0"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms must be a number >= 0, got nan"),
    # (1e13 ms overflowed the worker's wait: it died, and every request was answered 503)
    (["--batch-wait-ms", "1e13"], "--batch-wait-ms must not exceed --timeout (60 s), got "
                                  "1e+13 ms"),
    (["--port", "65536"], "--port must be <= 65535, got 65536"),
    (["--port", "70000"], "--port must be <= 65535, got 70000"),
    (["--threads", "100000"], "--threads must be <= 1024, got 100000"),
    (["--api-keys", "/nonexistent/keys.txt"], "cannot read the API keys"),
])
def test_bad_flags_fail_before_loading(flags, message, tmp_path):
    result = seq2seq("serve", tmp_path / "missing.pt", *flags, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1 and message in error_lines(result)[0], result.stderr


def test_empty_key_file_missing_checkpoint_and_busy_port(checkpoint, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# no key yet\n\n", encoding="utf-8")
    result = seq2seq("serve", checkpoint, "--api-keys", keys, cwd=tmp_path)
    assert result.returncode == 2 and "holds no API key" in result.stderr
    result = seq2seq("serve", tmp_path / "missing.pt", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr
    assert "Traceback" not in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = seq2seq("serve", checkpoint, "--port", port, cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"], result.stderr


def test_two_checkpoints_of_one_pair_are_refused(checkpoint, tmp_path):
    result = seq2seq("serve", checkpoint, checkpoint, "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "both translate en to de" in result.stderr, result.stderr


def test_a_second_server_on_a_port_is_refused_while_the_first_loads_its_models():
    """bind() ran before the models load; two sockets with SO_REUSEADDR may both bind one
    port until one listens, and the server that lost the race then served nothing, silently."""
    from seq2seq.errors import Seq2SeqError
    from seq2seq.serve.server import bind

    first = bind("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(Seq2SeqError, match=f"cannot listen on 127.0.0.1:{port} "
                                               r"\(Address already in use\)"):
            bind("127.0.0.1", port).close()
    finally:
        first.close()


def test_a_key_file_saved_with_a_byte_order_mark_keeps_its_first_key(tmp_path):
    from seq2seq.serve.options import load_api_keys
    from seq2seq.serve.server import url_host

    keys = tmp_path / "keys.txt"
    keys.write_bytes(b"\xef\xbb\xbfsecret1\r\nsecret2\r\n")
    assert load_api_keys(keys) == {"secret1", "secret2"}
    assert (url_host("::1"), url_host("127.0.0.1")) == ("[::1]", "127.0.0.1")



def test_threads_beyond_the_cpus_are_said_with_the_models_processes(capsys):
    from seq2seq.serve.server import warn_threads

    warn_threads(4, 1, cpus=2)
    assert capsys.readouterr().err == (
        "warning: --threads: 4 threads for the 2 CPUs this process may use: threads beyond the "
        "CPUs wait for one another and slow decoding; set at most 2\n")
    warn_threads(2, 2, cpus=2)  # (each model decodes in a process of its own)
    assert capsys.readouterr().err.startswith(
        "warning: --threads: 2 threads in each of 2 decoding processes (one per model) for the "
        "2 CPUs this process may use")
    warn_threads(1, 2, cpus=2)
    warn_threads(2, 1, cpus=2)
    assert capsys.readouterr().err == ""


def test_a_max_len_ratio_that_puts_the_checkpoints_min_len_out_of_reach_is_said(
        checkpoint, monkeypatch, capsys):
    import argparse
    import dataclasses

    from seq2seq.serve.metrics import Metrics
    from seq2seq.serve.options import ServeOptions
    from seq2seq.serve.server import load_model
    from seq2seq.translate import Translator

    load = Translator.from_checkpoint

    def trained_with_min_len(*args, **kwargs):  # as if its recipe had decode.min_len 12
        translator = load(*args, **kwargs)
        translator.recipe = dataclasses.replace(translator.recipe, decode=dataclasses.replace(
            translator.recipe.decode, min_len=12))
        return translator

    monkeypatch.setattr(Translator, "from_checkpoint", trained_with_min_len)
    for ratio, warned in ((0.5, True), (None, False)):  # (the recipe's: 1.5 x 2 + 10 for one)
        args = argparse.Namespace(beam=None, alpha=None, max_len_ratio=ratio, batch_tokens=None,
                                  shortlist=None, device="cpu", quantize=False, precision="fp32")
        model = load_model(str(checkpoint), args, ServeOptions(), Metrics())
        assert model.settings.min_len == 12
        err = capsys.readouterr().err
        assert err.startswith(f"warning: {checkpoint}: decode.min_len: 12 is above the maximum "
                              "output length of sources of up to ") is warned, err
        assert ("(11 for one: --max-len-ratio 0.5 x (source tokens + 1 for EOS) + "
                "decode.max_len_add 10, rounded down)" in err) is warned, err


def test_several_models_share_the_cpus_by_default(capsys):
    """Each model decodes in a process of its own, and each took torch's default, a thread per
    core: two models decoding at once took turns on the CPUs, with no warning (one is given
    for a --threads that does the same)."""
    from seq2seq.serve.server import shared_threads, warn_threads

    assert [shared_threads(models, default=8) for models in (1, 2, 3, 8, 9)] == [8, 4, 2, 1, 1]
    assert shared_threads(2, default=1) == 1  # (OMP_NUM_THREADS=1, say)
    for models in (1, 2, 3, 8):  # what the default gives never draws the warning
        warn_threads(shared_threads(models, default=8), models, cpus=8)
    assert capsys.readouterr().err == ""
