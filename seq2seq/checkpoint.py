"""Checkpoints: atomic writes, safe loads that prove integrity, weight averaging.

A checkpoint is a plain dict readable with ``torch.load(path, weights_only=True)``: ``model`` (a
state_dict), ``recipe`` (the resolved recipe as plain data), ``tokenizer`` (SentencePiece model
protos as uint8 tensors), and, for training checkpoints, optimizer/scheduler/scaler state, the step,
epoch and position inside the epoch, every RNG state and the best-metric bookkeeping.

Every checkpoint carries ``integrity``: the sha256 of everything else in it (each tensor's dtype,
shape and bytes, each other value's text, in order), so a damaged file is detected wherever it
travels, with or without anything beside it. Beside it, ``<file>.sha256`` holds the file's own
sha256 in ``sha256sum -c`` format. A save removes the old side file, writes the checkpoint
atomically (:mod:`seq2seq.files`), then writes the new side file (or, when the write failed,
puts the old one back), so a crash at any point leaves the old or the new checkpoint and either
no side file or the right one. A side file that does not
match a checkpoint whose own checksum verifies is reported as stale, not as damage.

What a resume may change is decided by the run directory (:mod:`seq2seq.training.run_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from seq2seq.errors import Seq2SeqError, warn
from seq2seq.files import write_bytes
from seq2seq.locks import directory_held
from seq2seq.paths import (
    OutputError,
    check_output,
    first_repeat,
    is_descriptor,
    is_stdout,
    same_file,
)


class CheckpointError(Seq2SeqError):
    """A checkpoint that cannot be read, or is not a seq2seq checkpoint."""


def payload_digest(payload: Any) -> str:
    """sha256 of a checkpoint's contents: tensors by dtype, shape and bytes, the rest as text."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            digest.update(f"{key!r}:".encode())
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Serialise ``payload`` with its integrity digest, write it atomically, then its side file.

    Raises:
        CheckpointError: when the path cannot be written, the disk is full or the directory is
            not writable; the previous file at ``path`` is then left as it was.
    """
    check_checkpoint_output(path)  # else a full serialisation is done before the write fails
    # Through a symlink, the file written is its target: the side file goes beside that, and
    # one beside the link would be stale.
    beside_link = _sidecar(Path(path))
    path = Path(os.path.realpath(path))
    buffer = io.BytesIO()
    torch.save({**payload, "integrity": {"sha256": payload_digest(payload)}}, buffer)
    data = buffer.getvalue()
    sidecar = _sidecar(path)
    with directory_held(path.parent):  # two saves to one path: each leaves its pair whole
        try:
            old_line = sidecar.read_bytes()
        except OSError:
            old_line = None
        sidecar.unlink(missing_ok=True)  # no moment where an old side file meets the new file
        try:
            write_bytes(path, data)
        except OutputError as error:
            if old_line is not None:  # the old checkpoint stays, and its side file with it
                with contextlib.suppress(OutputError):
                    write_bytes(sidecar, old_line)
            raise CheckpointError(f"{path}: cannot write checkpoint ({error.strerror or error})"
                                  "; the previous checkpoint is unchanged") from None
        line = _sidecar_line(hashlib.sha256(data).hexdigest(), path.name)
        try:
            write_bytes(sidecar, line.encode())
        except OutputError as error:
            reason = error.strerror or error
            raise CheckpointError(f"{sidecar}: cannot write the checksum file ({reason}); "
                                  f"{path} itself is complete") from None
    if not same_file(beside_link, sidecar):
        beside_link.unlink(missing_ok=True)


def check_no_repeat(paths: Sequence[str | Path], what: str) -> None:
    """Refuse a checkpoint given twice (by any path) to ``what``, "an average" or "an
    ensemble": it would count twice, and was surely meant to be another."""
    repeat = first_repeat(paths)
    if repeat is not None:
        earlier, later = repeat
        again = "again" if str(earlier) == str(later) else f"the same file as {earlier}"
        raise CheckpointError(f"{later}: given twice to {what} ({again}); each checkpoint "
                              "counts once")


def check_member(path: str | Path, first: str | Path, recipe: Any, first_recipe: Any,
                 tokenizer: Any, first_tokenizer: Any) -> None:
    """Refuse an ensemble member that would not translate as the first one: its token ids
    must mean the same pieces (one tokenizer) and it must declare the same language pair."""
    if not same_tensors(tokenizer, first_tokenizer):
        raise Seq2SeqError(f"{path}: its tokenizer differs from {first}'s; an ensemble needs "
                           "one shared tokenizer (the same token ids)")
    check_language_pair((recipe.data.src_lang, recipe.data.trg_lang),
                        (first_recipe.data.src_lang, first_recipe.data.trg_lang), path, first,
                        why="an ensemble needs one language pair")


def check_language_pair(pair: tuple[str, str], expected: tuple[str, str], name: str | Path,
                        expected_name: str | Path, why: str = "") -> None:
    """Refuse a checkpoint that translates ``pair`` (source, target languages) where
    ``expected`` is needed: an ensemble member's against the first member's, a checkpoint's
    against the recipe whose test sets it is to translate.

    Args:
        name: how the message names the checkpoint (a path, ``--checkpoint PATH``).
        expected_name: how it names what holds ``expected`` (a path, "the recipe's data").
        why: what the message adds after a ``;``, if anything.

    Raises:
        CheckpointError: ``"<name>: translates de-en, but the language pair of <expected_name>
            is en-de[; <why>]"``.
    """
    if tuple(pair) != tuple(expected):
        raise CheckpointError(f"{name}: translates {'-'.join(pair)}, but the language pair of "
                              f"{expected_name} is {'-'.join(expected)}"
                              + (f"; {why}" if why else ""))


def check_checkpoint_output(path: str | Path) -> None:
    """Refuse, before any work, a path a checkpoint cannot be written to: what
    :func:`seq2seq.paths.check_output` refuses, and anything but a regular file (stdout, a
    device, a pipe), which could hold no checksum file beside it.

    Raises:
        CheckpointError: one line naming the path.
    """
    try:
        check_output(path)
    except OutputError as error:
        raise CheckpointError(str(error)) from None
    if is_stdout(path) or is_descriptor(path) or (
            os.path.exists(path) and not os.path.isfile(path)):
        raise CheckpointError(f"{path}: a checkpoint is written to a regular file (its "
                              "checksum file beside it), not to stdout, a device or a pipe")
    for sidecar in (_sidecar(Path(path)), _sidecar(Path(os.path.realpath(path)))):
        if os.path.isdir(sidecar) and not os.path.islink(sidecar):
            raise CheckpointError(f"{sidecar}: is a directory, where the checksum file of "
                                  f"{path} goes")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sidecar_digests(path: Path) -> list[str] | None:
    """The checksums the side file accepts (None: no side file). Lines are ``sha256sum``'s
    ``<hex>  <name>``; older side files hold bare digests, one per line."""
    sidecar = _sidecar(path)
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as error:
        raise CheckpointError(f"{sidecar}: cannot read ({error.strerror})") from None
    # (a line of an escaped name starts with a backslash: see _sidecar_line)
    return [line.split()[0].removeprefix("\\").lower() for line in text.splitlines()
            if line.split()]


def _sidecar_line(digest: str, name: str) -> str:
    """``sha256sum``'s line for ``name``: one holding a backslash or a line break is escaped,
    and the line then starts with a backslash, so that ``sha256sum -c`` reads it."""
    if not any(c in name for c in "\\\n\r"):
        return f"{digest}  {name}\n"
    escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return f"\\{digest}  {escaped}\n"


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
    """Load a checkpoint with ``weights_only=True`` and verify it; refuse anything else with a
    clear error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        hint = " (an override? it goes before the checkpoints)" if "=" in path.name else ""
        raise CheckpointError(f"{path}: no such checkpoint{hint}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read checkpoint ({error.strerror})") from None
    if not data:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    accepted = _sidecar_digests(path)
    sidecar_agrees = not accepted or hashlib.sha256(data).hexdigest() in accepted
    try:
        payload = _unpickle(path, data, map_location)
    except CheckpointError:
        if not sidecar_agrees:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt "
                                  "checkpoint)") from None
        raise
    stored = payload.pop("integrity", None)
    if stored is None:  # written before checkpoints carried their own digest
        if not sidecar_agrees:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt checkpoint)")
        return payload
    if not isinstance(stored, dict) or stored.get("sha256") != payload_digest(payload):
        raise CheckpointError(f"{path}: corrupt checkpoint (its contents do not match the "
                              "checksum stored in it)")
    if not sidecar_agrees:
        warn(f"{_sidecar(path)}: stale checksum file (it does not match {path}, whose own "
             "checksum verifies); ignoring it")
    return payload


def _unpickle(path: Path, data: bytes, map_location: str | torch.device) -> dict[str, Any]:
    if not data.startswith(_TORCH_MAGIC):
        # Else torch's legacy reader fails with a bare KeyError such as "(105)".
        what = ("it is a text file" if _is_text(data)
                else "it is not the zip archive torch.save writes")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({what})")
    try:
        with warnings.catch_warnings():  # (a foreign pickle: said below, in one line)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(io.BytesIO(data), map_location=map_location,
                                 weights_only=True)
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


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load ``state`` into ``model``; weights that do not fit the recipe's model are one line."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its weights are not a state dict "
                              f"(a {type(state).__name__})")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0])
        raise CheckpointError(f"{path}: its weights do not fit the model its recipe describes "
                              f"({detail.rstrip('.')})") from None


def load_latest(candidates: list[Path], skipped: Callable[[str], None],
                require: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]] | None:
    """The first candidate that exists, loads and holds the keys ``require``; each one that
    exists but does not is said to ``skipped``, in one line."""
    for path in candidates:
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as error:
            skipped(str(error))
            continue
        missing = [key for key in require if key not in ckpt]
        if missing:
            skipped(f"{path}: holds no training state ({', '.join(missing)}): an averaged or "
                    "exported checkpoint, not one a run can resume from")
            continue
        return path, ckpt
    return None


def average_checkpoints(paths: list[Path], output: Path,
                        run_changes: Callable[[dict, dict], list[str]] | None = None) -> None:
    """Average the model weights of several checkpoints of one run into ``output``.

    The recipe and tokenizer are taken from the first checkpoint, the step from the newest;
    training state is dropped.

    Args:
        run_changes: the recipe keys in which two checkpoints' recipes differ as two runs'
            do (:func:`seq2seq.training.run_dir.run_changes`); None: not compared.
    """
    if not paths:
        raise CheckpointError("average needs at least one checkpoint")
    check_no_repeat(paths, "an average")
    first = _averageable(load_checkpoint(paths[0]), paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    steps = [first.get("step", 0)]
    for path in paths[1:]:
        ckpt = _averageable(load_checkpoint(path), path)
        steps.append(ckpt.get("step", 0))
        state = ckpt["model"]
        if state.keys() != total.keys() or any(state[k].shape != total[k].shape for k in total):
            raise CheckpointError(f"{path}: different model architecture from {paths[0]}")
        if not same_tensors(ckpt.get("tokenizer"), first.get("tokenizer")):
            # The same shapes over other token ids: an average would mean nothing.
            raise CheckpointError(f"{path}: its tokenizer differs from {paths[0]}'s; average "
                                  "checkpoints of one run")
        changed = run_changes(first["recipe"], ckpt["recipe"]) if run_changes else []
        if changed:  # (weights of two runs do not average into a model)
            raise CheckpointError(f"{path}: not of the run of {paths[0]} (the recipe differs "
                                  f"in {', '.join(changed)}); average checkpoints of one run")
        for key, value in state.items():
            if value.is_floating_point():
                total[key] += value.double()
    model = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
             for k, v in total.items()}
    payload = {"model": model, "recipe": first["recipe"], "tokenizer": first.get("tokenizer"),
               "lexicon": first.get("lexicon"),
               "step": max(steps), "averaged_from": [str(p) for p in paths]}  # the newest
    save_checkpoint(payload, Path(output))


def _averageable(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """``ckpt`` if it holds what an averaged checkpoint is made of: weights, a recipe and a
    tokenizer (a ``.pt`` of another program need not)."""
    weights, recipe, tokenizer = ckpt["model"], ckpt["recipe"], ckpt.get("tokenizer")
    if not (isinstance(weights, dict) and weights
            and all(isinstance(v, torch.Tensor) for v in weights.values())
            and isinstance(recipe, dict) and recipe and isinstance(tokenizer, dict)):
        raise CheckpointError(f"{path}: not a seq2seq checkpoint (it lacks the weights, recipe "
                              "or tokenizer one holds)")
    return ckpt


def same_tensors(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    """Whether two dictionaries of tensors (or two Nones) hold the same keys and values."""
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
