"""Checkpoint files (seq2seq/checkpoint.py): their mode on disk and the errors a user sees."""

import os
import re
import stat

import pytest
import torch

from seq2seq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def umask():
    """Run the test under umask 027 (group may read, others nothing), then restore it."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_a_saved_checkpoint_has_the_mode_of_any_new_file(tmp_path, umask):
    # mkstemp alone gives 0600: the other nodes of a multi-node run (other users or a group)
    # could not read the checkpoint.
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "recipe": {}}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == 0o640
    sidecar = tmp_path / "best.pt.sha256"
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o640
    # Overwriting keeps the usual mode too (the new file replaces the old one by rename).
    save_checkpoint({"model": {"w": torch.zeros(2)}, "recipe": {}}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_saving_onto_a_directory_is_one_line_and_writes_nothing(tmp_path):
    target = tmp_path / "avg.pt"
    target.mkdir()
    with pytest.raises(CheckpointError, match="avg.pt: is a directory, not an output file"):
        save_checkpoint({"model": {}, "recipe": {}}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["avg.pt"]


@pytest.mark.parametrize("content, reason", [
    (b"hello world, a text file\n", "not a PyTorch checkpoint file (it is a text file)"),
    (b"name: quickstart\nmodel: {cell: gru}\n", "(it is a text file)"),
    (bytes(range(256)) * 4, "(it is not the zip archive torch.save writes)"),
], ids=["text", "yaml", "binary"])
def test_a_file_that_is_no_checkpoint_is_named_in_words(tmp_path, content, reason):
    path = tmp_path / "notckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a PyTorch checkpoint file") and reason in message
    assert not re.search(r"\(\d+\)", message)  # torch's bare KeyError, e.g. "(105)"


def test_a_truncated_checkpoint_without_sidecar_says_damaged(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(100)}, "recipe": {}}, path)
    (tmp_path / "best.pt.sha256").unlink()
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="best.pt: .*a damaged one"):
        load_checkpoint(path)
