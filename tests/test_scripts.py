"""scripts/prepare_multi30k.py, run as a user would, against the shared Multi30k mirror; and
scripts/gpu_checks.sh's refusal of a list of checks it does not have."""

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seq2seq.config import Corpus, DataConfig
from seq2seq.data.corpus import read_pairs

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
