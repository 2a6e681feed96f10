"""scripts/prepare_multi30k.py, run as a user would, against the shared Multi30k mirror;
scripts/gpu_checks.sh's refusal of a list of checks it does not have; and the other scripts'
refusals of a user's mistakes, each in one line before any long work."""

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from seq2seq.config import Corpus, DataConfig
from seq2seq.data.corpus import read_pairs
from tests.conftest import REPO, load_script, tiny_tree

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_multi30k.py"


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          check=False)


def test_prepare_multi30k_from_mirror(tmp_path, data_root):
    out = tmp_path / "multi30k"
    result = prepare("--mirror", str(data_root / "multi30k"), "--output", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr")
                           for lang in ("de", "en", "fr", "cs"))
    assert "train.de.gz: 29,000 lines" in result.stdout
    assert "val.en.gz: 1,014 lines" in result.stdout
    data = DataConfig(root=str(out), src_lang="de", trg_lang="en")
    assert sum(1 for _ in read_pairs(Corpus(src="test_2016_flickr.de.gz",
                                            trg="test_2016_flickr.en.gz"), data)) == 1000
    # A second run finds the files in place and keeps them.
    again = prepare("--mirror", str(data_root / "multi30k"), "--output", str(out))
    assert again.returncode == 0 and "already present" in again.stdout


def test_prepare_multi30k_rejects_a_short_file(tmp_path, data_root):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    lines = gzip.decompress((data_root / "multi30k" / "train.en.gz").read_bytes()).splitlines()
    (mirror / "train.en.gz").write_bytes(gzip.compress(b"\n".join(lines[:-1]) + b"\n"))
    result = prepare("--mirror", str(mirror), "--output", str(tmp_path / "out"),
                     "--langs", "en")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "train.en.gz: 28,999 lines, expected 29,000" in result.stderr
    assert not (tmp_path / "out" / "train.en.gz").exists()


def test_prepare_multi30k_missing_mirror_file(tmp_path, data_root):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(data_root / "multi30k" / "train.de.gz", mirror)
    result = prepare("--mirror", str(mirror), "--output", str(tmp_path / "out"), "--langs", "de")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "val.de.gz" in result.stderr
    assert (tmp_path / "out" / "train.de.gz").read_bytes() == (mirror / "train.de.gz").read_bytes()


def test_prepare_multi30k_a_fifo_in_the_mirror_and_ctrl_c(tmp_path, data_root):
    """A FIFO in the mirror blocked it for ever; Ctrl-C then printed a traceback."""
    import os
    import signal
    import socket
    import time

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(data_root / "multi30k" / "train.de.gz", mirror)
    os.mkfifo(mirror / "val.de.gz")
    result = subprocess.run([sys.executable, str(SCRIPT), "--mirror", str(mirror), "--output",
                             str(tmp_path / "out"), "--langs", "de"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {mirror / 'val.de.gz'}: not a regular file in the mirror\n"
    with socket.socket() as silent:  # a server that never answers: Ctrl-C during a download
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--output", str(tmp_path / "o"),
                                    "--langs", "de", "--base-url", url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err == "error: interrupted; the files written so far are complete\n"


def test_prepare_multi30k_a_path_for_a_url_or_a_directory_in_the_way(tmp_path, data_root):
    not_url = prepare("--output", str(tmp_path / "a"), "--langs", "de", "--base-url", "mirror")
    assert not_url.returncode == 2 and "Traceback" not in not_url.stderr
    assert not_url.stderr.strip().splitlines() == [
        "error: --base-url mirror: unknown url type: 'mirror/train.de.gz'; a local copy is "
        "--mirror DIR"]
    (tmp_path / "b" / "train.de.gz").mkdir(parents=True)
    in_the_way = prepare("--mirror", str(data_root / "multi30k"), "--output",
                         str(tmp_path / "b"), "--langs", "de")
    assert in_the_way.returncode == 2 and in_the_way.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'b' / 'train.de.gz'}: is a directory, not an output file"]


@pytest.mark.parametrize("checks", ["9", "1, 2", "quick:8", "1,,2", "quick:"])
def test_gpu_checks_refuse_a_list_that_names_no_check(tmp_path, checks):
    """On a machine lent for minutes, a name that is no check ran nothing and said "done"."""
    result = subprocess.run(["bash", str(SCRIPT.parent / "gpu_checks.sh"),
                             str(tmp_path / "out"), checks], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "is not a list of checks" in result.stderr
    assert not (tmp_path / "out").exists()


def script(name: str, *args: str, env: dict | None = None, timeout: int = 120
           ) -> subprocess.CompletedProcess:
    """``scripts/<name>.py ARGS`` run from the repository, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The last line of stderr, checked to be an error and the only one besides argparse's
    usage text; no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error:" in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("timeout", ["inf", "-1", "nan", "0"])
def test_prepare_multi30k_refuses_a_timeout_that_is_no_positive_number(tmp_path, timeout):
    """inf was a traceback, -1 and nan were blamed on the URL."""
    result = prepare("--output", str(tmp_path / "out"), "--langs", "de", f"--timeout={timeout}")
    assert result.returncode == 2
    assert "argument --timeout: must be a finite number of seconds above 0" in one_error_line(
        result)
    assert not (tmp_path / "out").exists()


def test_prepare_multi30k_checks_the_mirror_before_making_the_output(tmp_path, data_root):
    """A missing mirror was reported per file, after an empty --output was made."""
    out = tmp_path / "out" / "deeper"
    result = prepare("--mirror", str(tmp_path / "nomirror"), "--output", str(out))
    assert result.returncode == 2
    assert result.stderr == f"error: --mirror {tmp_path / 'nomirror'}: no such directory\n"
    assert not (tmp_path / "out").exists()
    # a bad file in the mirror: named by its path there, and nothing left behind
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train.de.gz").write_bytes(b"not gzip")
    result = prepare("--mirror", str(mirror), "--output", str(out), "--langs", "de")
    assert result.returncode == 2
    assert one_error_line(result).startswith(
        f"error: {mirror / 'train.de.gz'}: not a readable gzip file")
    assert not (tmp_path / "out").exists()


def test_code_layout_refuses_a_missing_root_in_one_line():
    result = script("code_layout", "--root", "/nonexistent/seq2seq")
    assert result.returncode == 2
    assert result.stderr == "error: --root /nonexistent/seq2seq: no such directory\n"


def test_kill_resume_names_the_newest_checkpoint_that_loads(tmp_path):
    """last_step called load_latest without its callback: a TypeError at the first kill."""
    import torch

    kill_resume = load_script("kill_resume")
    assert kill_resume.last_step(tmp_path / "none") == "-"
    (tmp_path / "last.pt").write_bytes(b"cut short by the kill")
    torch.save({"model": {}, "recipe": {}, "step": 5}, tmp_path / "step_00000005.pt")
    assert kill_resume.last_step(tmp_path) == "5"


# compare_peers: its own arguments and the peers' kit, refused before our parts run.

@pytest.mark.parametrize("flag,value", [("--threads", "0"), ("--len", "0"), ("--len", "1001"),
                                        ("--warmup", "-1"), ("--repeat", "0"),
                                        ("--steps", "0"), ("--peer-steps", "20"),
                                        ("--shortlist", "-1")])
def test_compare_peers_refuses_a_count_out_of_range(flag, value):
    result = script("compare_peers", flag, value)
    assert result.returncode == 2
    assert f"argument {flag}: must be at " in one_error_line(result)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_compare_peers_checks_the_peers_kit_before_any_work(tmp_path, kind):
    kit = tmp_path / "kit"
    if kind == "directory":
        kit.mkdir()
    result = script("compare_peers", "--work-dir", str(tmp_path / "work"),
                    env={"PEERS_BENCH": str(kit)})
    assert result.returncode == 2
    problem = "no such file" if kind == "missing" else "is not a file"
    assert result.stderr == f"error: PEERS_BENCH {kit}: {problem} (the peers' kit, bench.sh)\n"
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("line,problem", [
    ('{"onmt": {', "printed a line that is not JSON"),
    ('{"onmt": {"train_target_tokens_per_s": 1, "beam5_batch100_sent_per_s": 2}}',
     "printed JSON without joey.train_target_tokens_per_s, joey.beam5_batch100_sent_per_s"),
    ('{"onmt": 1, "joey": {"train_target_tokens_per_s": 1}}',
     "printed JSON without onmt.train_target_tokens_per_s, onmt.beam5_batch100_sent_per_s, "
     "joey.beam5_batch100_sent_per_s"),
])
def test_compare_peers_refuses_what_the_kit_prints_in_one_line(tmp_path, monkeypatch, line,
                                                                problem):
    """Tracebacks before: JSONDecodeError, and KeyError 'joey' after every part had run."""
    compare = load_script("compare_peers")
    kit = tmp_path / "bench.sh"
    kit.write_text(f"echo '{line}'\n")
    monkeypatch.setattr(compare, "PEERS_BENCH", kit)
    with pytest.raises(SystemExit) as stop:
        compare.peers(SimpleNamespace(peer_steps=60, len=24, threads=1), tmp_path)
    message = str(stop.value.code)
    assert message.startswith(f"error: {kit} {problem}"), message
    assert message.endswith(f"; see {tmp_path / 'peers.log'}") and "\n" not in message


# benchmark: what is wrong with --checkpoint, --test or the recipe's arguments, said before the
# tokenizer and the data are made.

def test_benchmark_usage_does_not_require_overrides():
    result = script("benchmark")
    assert result.returncode == 2
    assert one_error_line(result).endswith("the following arguments are required: recipe")


@pytest.mark.parametrize("what", ["other pair", "not a checkpoint", "no such test set"])
def test_benchmark_refuses_checkpoint_or_test_set_before_any_work(tmp_path, what):
    import torch

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_tree(str(tmp_path / "unused"))))  # en-de, test "t"
    work = tmp_path / "work"
    flags = {"other pair": ["--checkpoint", str(tmp_path / "de-en.pt")],
             "not a checkpoint": ["--checkpoint", str(recipe)],
             "no such test set": ["--test", "nope"]}[what]
    torch.save({"model": {}, "recipe": tiny_tree("x", data={"src_lang": "de",
                                                            "trg_lang": "en"})},
               tmp_path / "de-en.pt")
    result = script("benchmark", str(recipe), *flags, "--steps", "0", "--work-dir", str(work))
    assert result.returncode != 0
    expected = {"other pair": f"error: --checkpoint {tmp_path / 'de-en.pt'}: translates de-en, "
                              "but the language pair of the recipe's data is en-de",
                "not a checkpoint": f"error: {recipe}: not a PyTorch checkpoint file",
                "no such test set": "error: --test nope: the recipe's test sets are t"}[what]
    assert one_error_line(result).startswith(expected)
    assert not work.exists()  # refused before the tokenizer and the data cache


# load_test and benchmark_prepare: --json checked first; prepare's errors in one line.

def test_load_test_and_benchmark_prepare_check_json_first(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("ein Hund\n")
    missing = tmp_path / "nodir" / "out.json"
    result = script("load_test", "--url", "http://127.0.0.1:9/", "--input", str(text),
                    "--json", str(missing))
    assert result.returncode == 2
    assert f"--json {missing}: directory" in one_error_line(result)
    result = script("benchmark_prepare", "--pairs", "10", "--json", str(missing))
    assert result.returncode == 2
    assert f"--json {missing}: directory" in one_error_line(result)


def test_benchmark_prepare_says_a_prepare_error_in_one_line(tmp_path, data_root):
    """8,000 pieces from 300 sentences: a traceback ending in the Seq2SeqError before."""
    result = script("benchmark_prepare", "--pairs", "300", "--sample", "300", "--num-proc", "1",
                    "--data", str(data_root), "--json", str(tmp_path / "b.json"), timeout=300)
    assert result.returncode == 1
    assert one_error_line(result).startswith(
        "error: prepare: tokenizer.vocab_size = 8000 is too large for the training data")
    assert not (tmp_path / "b.json").exists()


# load_test against a stand-in server: its exit status and what its report says.

class FakeServer(BaseHTTPRequestHandler):
    """/health, /languages, /metrics (10 earlier steps of 1 sentence; each request here adds
    a step of 4) and /translate answering with ``status``."""

    status = 200
    steps = [10, 10.0]

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/metrics":
            count, total = self.steps
            body = (f'seq2seq_batch_sentences_count{{pair="de-en"}} {count}\n'
                    f'seq2seq_batch_sentences_sum{{pair="de-en"}} {total}\n')
        elif self.path == "/languages":
            body = json.dumps([{"code": "de", "targets": ["en"]}])
        else:
            body = "ok"
        self.answer(200, body)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.steps = FakeServer.steps = [self.steps[0] + 1, self.steps[1] + 4]
        self.answer(self.status, json.dumps({"translatedText": "a dog"}))

    def answer(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 400])
def test_load_test_against_a_server_fails_when_a_request_fails(tmp_path, monkeypatch, status):
    """Every request refused (400) still exited 0; the report held the server's lifetime mean
    batch and the script's defaults for a server it did not start."""
    monkeypatch.setattr(FakeServer, "status", status)
    monkeypatch.setattr(FakeServer, "steps", [10, 10.0])
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    text = tmp_path / "in.txt"
    text.write_text("ein Hund\nzwei Hunde\ndrei Hunde\n")
    try:
        result = script("load_test", "--url", f"http://127.0.0.1:{server.server_port}",
                        "--input", str(text), "--clients", "2", "--json",
                        str(tmp_path / "r.json"))
    finally:
        server.shutdown()
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["setup"]) == {"clients", "sentences", "input", "url", "source", "target"}
    if status == 200:
        assert result.returncode == 0, result.stderr
        assert report["server"]["sentences"] == 3 and report["problems"] == []
        assert report["server"]["mean_batch"] == 4.0  # this run's steps, not (10 + 12) / 13
    else:
        assert result.returncode == 1
        assert result.stderr.splitlines() == ["error: server: 3 requests failed (400: 3)",
                                              "error: server: no sentence translated"]


def test_load_test_asks_for_the_scheme_of_a_url(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("ein Hund\n")
    result = script("load_test", "--url", "127.0.0.1:5000", "--input", str(text))
    assert result.returncode != 0
    assert result.stderr == ("error: --url 127.0.0.1:5000: no http:// in front; add it: "
                             "http://127.0.0.1:5000\n")


def test_load_test_lists_a_served_translation_that_differs(tmp_path, monkeypatch, capsys):
    """A difference is listed for the reader, not failed (the rounding of other batch shapes
    may break a tie otherwise: README, "Serving a model"). A sentence not sent is none."""
    load_test = load_script("load_test")
    served = {"on": ["a", "b", None], "off": ["a", "x", "c"]}

    class Server:
        def __init__(self, checkpoint, flags, log):
            self.url = f"http://{log.stem}/"

        def stop(self):
            pass

    class Offline:
        def __init__(self, *args):
            pass

        def run(self, sentences):
            return {"sentences": 3, "seconds": 1.0, "sentences_per_s": 3.0}, ["a", "b", "c"]

    async def load(url, sentences, *args):
        answers = served[url.strip("/").split("//")[1]]
        figures = {"sentences": sum(a is not None for a in answers), "seconds": 1.0,
                   "sentences_per_s": 2.0, "failures": {}}
        return figures, answers

    monkeypatch.setattr(load_test, "ServerProcess", Server)
    monkeypatch.setattr(load_test, "Offline", Offline)
    monkeypatch.setattr(load_test, "load", load)
    monkeypatch.setattr(load_test, "languages", lambda url: ("de", "en"))
    monkeypatch.setattr(load_test, "batch_counters", lambda url: (1.0, 2.0))
    text = tmp_path / "in.txt"
    text.write_text("eins\nzwei\ndrei\n")
    assert load_test.main(["--checkpoint", "x.pt", "--input", str(text)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batching on"]["differ_from_offline"] == 0  # the one not sent: no difference
    assert report["batching off"]["differing"] == [{"index": 1, "served": "x", "offline": "b"}]
    assert report["problems"] == []


# abuse: its own arguments, and a second run in the same work directory.

def test_abuse_refuses_zero_steps_and_a_work_dir_of_other_files(tmp_path):
    result = script("abuse", "--max-steps", "0", "--work", str(tmp_path / "w"))
    assert result.returncode == 2
    assert one_error_line(result).endswith("--max-steps: must be at least 1, got 0")
    (tmp_path / "mine.txt").write_text("keep me\n")
    result = script("abuse", "--work", str(tmp_path))
    assert result.returncode == 2
    assert "not empty, and not a work directory of an earlier abuse.py run" in one_error_line(
        result)
    assert (tmp_path / "mine.txt").read_text() == "keep me\n"


@pytest.mark.slow
def test_abuse_runs_again_in_the_work_dir_of_an_earlier_run(tmp_path):
    """The inputs an earlier run left (a symlink, a hard link, a read-only file, a socket...)
    made the second a FileExistsError."""
    import runpy

    abuse = runpy.run_path(str(REPO / "scripts" / "abuse.py"), run_name="abuse")  # dataclasses
    work = tmp_path / "work"
    (work / "run").mkdir(parents=True)
    (work / "run" / "best.pt").write_bytes(b"an earlier run's checkpoint" * 100)
    (work / abuse["MARK"]).write_bytes(b"")
    abuse["prepare_inputs"](work, work / "run")  # what the earlier run left
    result = script("abuse", "--work", str(work), "--max-steps", "1", "--only", "version",
                    "translate output = symlink to input", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tried 2, as expected 2, failed 0" in result.stdout
