"""Checkpoints: atomic writes, safe loads, weight averaging.

A checkpoint is a plain dict readable with ``torch.load(path, weights_only=True)``: ``model`` (a
state_dict), ``recipe`` (the resolved recipe as plain data), ``tokenizer`` (SentencePiece model
protos as uint8 tensors), and, for training checkpoints, optimizer/scheduler/scaler state, the step,
epoch and position inside the epoch, every RNG state and the best-metric bookkeeping.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target,
so a crash (even SIGKILL) leaves either the old file or the new one, never a torn one. A
``<file>.sha256`` sidecar lets a load tell a complete file from a damaged one. It lists every
checksum the file may have at that moment: before the rename it gets the new checksum added to the
old ones, after the rename only the new one is kept. So a crash at any point leaves a sidecar that
accepts whichever file is there, and no good checkpoint is ever taken for a corrupt one.

What a resume may change is decided by the run directory (:mod:`seq2seq.training.run_dir`).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch

from seq2seq.errors import Seq2SeqError
from seq2seq.files import atomic_write_bytes


class CheckpointError(Seq2SeqError):
    """A checkpoint that cannot be read, or is not a seq2seq checkpoint."""


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process left in ``directory``.

    Only call this where no other process is writing checkpoints into ``directory``.
    """
    stale = [p for p in Path(directory).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Serialise ``payload`` and write it atomically, with a sha256 sidecar.

    Raises:
        CheckpointError: when the disk is full or the directory is not writable; the previous
            file at ``path`` is then left as it was.
    """
    if Path(path).is_dir():  # else a full serialisation is done before the rename fails
        raise CheckpointError(f"{path}: is a directory, not an output file")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    sidecar = _sidecar(path)
    try:
        if path.is_file() and sidecar.is_file():
            accepted = sidecar.read_text().split() + [digest]  # the old file or the new one
            atomic_write_bytes(sidecar, "\n".join(accepted).encode() + b"\n")
        atomic_write_bytes(path, data)
        atomic_write_bytes(sidecar, digest.encode() + b"\n")
    except OSError as error:
        raise CheckpointError(f"{path}: cannot write checkpoint ({error.strerror or error}); "
                              "the previous checkpoint is unchanged") from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# How torch.save files begin: a zip archive (the format since torch 1.6), or a pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _is_text(data: bytes) -> bool:
    """Whether the start of ``data`` reads as UTF-8 text (a recipe, a log, a text corpus)."""
    head = data[:4096]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start > len(head) - 4  # only a character cut in two at the end
    return b"\0" not in head


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse anything else with a clear error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read checkpoint ({error.strerror})") from None
    if not data:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    sidecar = _sidecar(path)
    if sidecar.is_file():
        accepted = sidecar.read_text().split()
        if accepted and hashlib.sha256(data).hexdigest() not in accepted:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt checkpoint)")
    if not data.startswith(_TORCH_MAGIC):
        # Else torch's legacy reader fails with a bare KeyError such as "(105)".
        what = ("it is a text file" if _is_text(data)
                else "it is not the zip archive torch.save writes")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({what})")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for damaged or unsafe files
        text = str(error)
        if "Unsupported global" in text:
            reason = "it holds arbitrary pickled objects, which are refused for safety"
        elif ("WeightsUnpickler" in text or "zip archive" in text or not text.strip()
              or isinstance(error, (KeyError, IndexError, EOFError))):
            reason = "not a PyTorch checkpoint file, or a damaged one"
        else:
            reason = text.strip().splitlines()[0]
        raise CheckpointError(f"{path}: not a loadable seq2seq checkpoint ({reason})") from None
    if not isinstance(payload, dict) or "model" not in payload or "recipe" not in payload:
        raise CheckpointError(f"{path}: not a seq2seq checkpoint (no model and recipe inside)")
    return payload


def load_latest(candidates: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The first candidate that loads; damaged ones are skipped with a warning."""
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"{error}; trying the previous checkpoint", stacklevel=2)
    return None


def average_checkpoints(paths: list[Path], output: Path) -> None:
    """Average the model weights of several checkpoints of one run into ``output``.

    The recipe and tokenizer are taken from the first checkpoint; training state is dropped.
    """
    if not paths:
        raise CheckpointError("average needs at least one checkpoint")
    first = load_checkpoint(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    for path in paths[1:]:
        state = load_checkpoint(path)["model"]
        if state.keys() != total.keys() or any(state[k].shape != total[k].shape for k in total):
            raise CheckpointError(f"{path}: different model architecture from {paths[0]}")
        for key, value in state.items():
            if value.is_floating_point():
                total[key] += value.double()
    model = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
             for k, v in total.items()}
    payload = {"model": model, "recipe": first["recipe"], "tokenizer": first.get("tokenizer"),
               "step": first.get("step", 0), "averaged_from": [str(p) for p in paths]}
    save_checkpoint(payload, Path(output))

