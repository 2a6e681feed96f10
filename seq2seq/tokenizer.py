"""SentencePiece subword models: train once from the training corpus, then encode and decode.

The special ids are fixed at training time and are the same in every model this module makes:
``PAD = 0``, ``UNK = 1``, ``BOS = 2``, ``EOS = 3``. A :class:`Tokenizer` holds one
model shared by source and target (``joint``) or one model per side. Encoded ids never contain
BOS or EOS; batching adds them.

A trained tokenizer lives in ``<output_dir>/tokenizer``: ``spm.model`` (joint) or ``src.model``
and ``trg.model``, plus ``tokenizer.json`` holding the hash of everything it was trained from
(training-data fingerprint, tokenizer settings, languages). :func:`load_or_train` reuses it while
that hash is unchanged. Inside a checkpoint the model protos travel as uint8 tensors
(:meth:`Tokenizer.to_state`), so ``torch.load(weights_only=True)`` can read them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

from seq2seq.config import TokenizerConfig
from seq2seq.errors import Seq2SeqError
from seq2seq.signals import signals_held, stops_kept

if TYPE_CHECKING:  # torch is imported where needed: ``prepare`` and its workers never need it
    import torch

PAD = 0
UNK = 1
BOS = 2
EOS = 3
SPECIAL_IDS = frozenset({PAD, BOS, EOS})

JOINT_MODEL = "spm.model"
SRC_MODEL = "src.model"
TRG_MODEL = "trg.model"
INFO_FILE = "tokenizer.json"
SAMPLING_SEED = 1234
THREADED_BATCH = 64
"""Lists of at least this many sentences are encoded and decoded by SentencePiece's batch calls,
which start a pool of threads at every call; shorter lists go one sentence at a time. On a
2-core AMD EPYC a list of one sentence costs 171 us to encode and 62 us to decode through the
batch call, against 3.7 and 2.6 us alone (a server decodes requests of one sentence); the pool
pays from about 64 sentences on."""


class Tokenizer:
    """One joint SentencePiece model, or a source and a target model.

    Args:
        src_proto: serialized source model (the joint model when ``trg_proto`` is None).
        trg_proto: serialized target model, or None for a joint model.
    """

    def __init__(self, src_proto: bytes, trg_proto: bytes | None = None):
        self._src_proto = bytes(src_proto)
        self._trg_proto = None if trg_proto is None else bytes(trg_proto)
        self._src = spm.SentencePieceProcessor(model_proto=self._src_proto)
        self._trg = (self._src if self._trg_proto is None
                     else spm.SentencePieceProcessor(model_proto=self._trg_proto))
        for side, processor in (("source", self._src), ("target", self._trg)):
            ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
            if ids != (PAD, UNK, BOS, EOS):
                raise Seq2SeqError(f"the {side} SentencePiece model has special ids "
                                   f"pad/unk/bos/eos = {ids}; expected 0/1/2/3")

    @property
    def joint(self) -> bool:
        """True when source and target share one model (and one vocabulary)."""
        return self._trg_proto is None

    @property
    def src_vocab_size(self) -> int:
        return self._src.get_piece_size()

    @property
    def trg_vocab_size(self) -> int:
        return self._trg.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """A hash of the model(s) themselves: equal fingerprints encode identically."""
        digest = hashlib.sha256(self._src_proto)
        if self._trg_proto is not None:
            digest.update(b"\0trg\0" + self._trg_proto)
        return digest.hexdigest()

    def encode_src(self, sentences: list[str]) -> list[list[int]]:
        """Source sentences -> subword ids (no BOS/EOS)."""
        return _encode(self._src, list(sentences))

    def encode_trg(self, sentences: list[str]) -> list[list[int]]:
        """Target sentences -> subword ids (no BOS/EOS)."""
        return _encode(self._trg, list(sentences))

    def encode_src_sampled(self, sentences: list[str], alpha: float,
                           nbest: int) -> list[list[int]]:
        """Source sentences -> ids of one sampled segmentation each (subword regularisation,
        :mod:`seq2seq.data.sampling`); drawn on one thread, so a seeded draw repeats."""
        return self._src.encode(list(sentences), out_type=int, enable_sampling=True,
                                alpha=alpha, nbest_size=nbest, num_threads=1)

    def encode_trg_sampled(self, sentences: list[str], alpha: float,
                           nbest: int) -> list[list[int]]:
        """Target sentences -> ids of one sampled segmentation each."""
        return self._trg.encode(list(sentences), out_type=int, enable_sampling=True,
                                alpha=alpha, nbest_size=nbest, num_threads=1)

    def decode_src(self, ids: list[list[int]]) -> list[str]:
        """Source ids -> detokenized text; PAD, BOS and EOS are ignored."""
        return _decode(self._src, ids)

    def decode_trg(self, ids: list[list[int]]) -> list[str]:
        """Target ids -> detokenized text; PAD, BOS and EOS are ignored."""
        return _decode(self._trg, ids)

    def src_pieces(self, ids: list[int]) -> list[str]:
        """One source sentence's ids -> its subword pieces (for attention plots)."""
        return [self._src.id_to_piece(int(i)) for i in ids]

    def trg_pieces(self, ids: list[int]) -> list[str]:
        """One target sentence's ids -> its subword pieces (for attention plots)."""
        return [self._trg.id_to_piece(int(i)) for i in ids]

    def save(self, out_dir: Path) -> None:
        """Write ``spm.model`` (joint) or ``src.model`` + ``trg.model`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.joint:
            (out_dir / JOINT_MODEL).write_bytes(self._src_proto)
        else:
            (out_dir / SRC_MODEL).write_bytes(self._src_proto)
            (out_dir / TRG_MODEL).write_bytes(self._trg_proto)

    @classmethod
    def load(cls, model_dir: Path) -> Tokenizer:
        """Read the model(s) written by :meth:`save` from ``model_dir``."""
        model_dir = Path(model_dir)
        try:
            if (model_dir / JOINT_MODEL).is_file():
                return cls(_read_model(model_dir / JOINT_MODEL))
            if (model_dir / SRC_MODEL).is_file() and (model_dir / TRG_MODEL).is_file():
                return cls(_read_model(model_dir / SRC_MODEL),
                           _read_model(model_dir / TRG_MODEL))
        except (RuntimeError, OSError) as error:  # SentencePiece's: a damaged model file
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise Seq2SeqError(f"{model_dir}: a SentencePiece model cannot be read "
                               f"({reason})") from None
        raise Seq2SeqError(f"{model_dir}: no SentencePiece model ({JOINT_MODEL}, or "
                           f"{SRC_MODEL} and {TRG_MODEL})")

    def to_state(self) -> dict[str, torch.Tensor]:
        """The model protos as uint8 tensors, for a ``weights_only`` checkpoint."""
        if self.joint:
            return {"spm_model": _bytes_to_tensor(self._src_proto)}
        return {"src_model": _bytes_to_tensor(self._src_proto),
                "trg_model": _bytes_to_tensor(self._trg_proto)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_state`'s dictionary."""
        if "spm_model" in state:
            return cls(_tensor_to_bytes(state["spm_model"]))
        return cls(_tensor_to_bytes(state["src_model"]), _tensor_to_bytes(state["trg_model"]))

    # Processors hold C++ objects; workers of ``datasets.map`` receive the protos instead.
    def __getstate__(self) -> dict:
        return {"src_proto": self._src_proto, "trg_proto": self._trg_proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["src_proto"], state["trg_proto"])


def _encode(processor: spm.SentencePieceProcessor, sentences: list[str]) -> list[list[int]]:
    if len(sentences) >= THREADED_BATCH:
        return processor.encode(sentences, out_type=int)
    return [processor.encode(sentence, out_type=int) for sentence in sentences]


def _decode(processor: spm.SentencePieceProcessor, ids: list[list[int]]) -> list[str]:
    kept = [[int(i) for i in row if int(i) not in SPECIAL_IDS] for row in ids]
    if len(kept) >= THREADED_BATCH:
        texts = processor.decode(kept)
    else:
        texts = [processor.decode(row) for row in kept]
    # Text that SentencePiece encodes never has a space at either end or two in a row (it
    # removes them), but a model may emit the lone word-start piece anywhere: at the end of
    # an output cut at the length limit, or twice in a row. Its decoded spaces are dropped.
    return [_EXTRA_SPACES.sub("", text) for text in texts]


_EXTRA_SPACES = re.compile(r"^ +| +$|(?<= ) +")


def _read_model(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise Seq2SeqError(f"{path}: cannot read SentencePiece model ({error.strerror})") from None


def _bytes_to_tensor(data: bytes) -> torch.Tensor:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    return tensor.detach().cpu().to(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


# Tokenizer keys added after tokenizers were saved, with the value they all had: in the hash only
# when set otherwise, so those tokenizers stay current.
_ADDED_KEYS = {"byte_fallback": False, "normalization": "nmt_nfkc"}


def tokenizer_hash(cfg: TokenizerConfig, data_fingerprint: str, src_lang: str,
                   trg_lang: str) -> str:
    """The hash that decides whether a saved tokenizer can be reused."""
    settings = {key: value for key, value in dataclasses.asdict(cfg).items()
                if _ADDED_KEYS.get(key, ...) != value}
    key = {"data": data_fingerprint, "settings": settings,
           "languages": [src_lang, trg_lang], "ids": [PAD, UNK, BOS, EOS],
           "sentencepiece": spm.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def train_tokenizer(cfg: TokenizerConfig, pairs: Iterable[tuple[str, str]], out_dir: Path,
                    data_hash: str = "") -> Tokenizer:
    """Train SentencePiece on the training pairs and save the model(s) in ``out_dir``.

    The pairs are streamed once into plain text files beside ``out_dir`` (never into memory);
    SentencePiece then samples ``cfg.input_sentence_size`` sentences of them at random.
    ``out_dir`` is replaced atomically, so a failed training leaves no half-written model.

    Args:
        cfg: the tokenizer section of the recipe.
        pairs: (source, target) sentence pairs of the training corpus.
        out_dir: directory for the model file(s) and ``tokenizer.json``.
        data_hash: stored in ``tokenizer.json`` (see :func:`load_or_train`).

    Raises:
        Seq2SeqError: the vocabulary does not fit the data (too large or too small).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with signals_held() as release:
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-{os.getpid()}-", dir=out_dir.parent))
        try:
            release()
            return _train_into(cfg, pairs, data_hash, work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _train_into(cfg: TokenizerConfig, pairs: Iterable[tuple[str, str]], data_hash: str,
                work: Path, out_dir: Path) -> Tokenizer:
    """:func:`train_tokenizer`'s work in the temporary directory ``work``."""
    src_text, trg_text = _write_training_text(pairs, work)
    if cfg.joint:
        tokenizer = Tokenizer(_train_model(cfg, [src_text, trg_text]))
    else:
        tokenizer = Tokenizer(_train_model(cfg, [src_text], "source"),
                              _train_model(cfg, [trg_text], "target"))
    model_dir = work / "model"
    tokenizer.save(model_dir)
    info = {"hash": data_hash, "type": cfg.type, "joint": cfg.joint,
            "vocab_size": cfg.vocab_size, "model_fingerprint": tokenizer.fingerprint}
    (model_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    _replace_dir(model_dir, out_dir)
    return tokenizer


def load_if_current(cfg: TokenizerConfig, data_fingerprint: str, src_lang: str, trg_lang: str,
                    out_dir: Path) -> Tokenizer | None:
    """The tokenizer saved in ``out_dir`` if it was trained from these inputs, else None."""
    out_dir = Path(out_dir)
    try:
        saved = json.loads((out_dir / INFO_FILE).read_text()).get("hash")
    except (OSError, ValueError, AttributeError):
        return None
    if saved != tokenizer_hash(cfg, data_fingerprint, src_lang, trg_lang):
        return None
    try:
        return Tokenizer.load(out_dir)
    except Seq2SeqError:
        return None  # a model file went missing or was damaged: train again


def load_or_train(cfg: TokenizerConfig, pairs: Callable[[], Iterable[tuple[str, str]]],
                  data_fingerprint: str, src_lang: str, trg_lang: str,
                  out_dir: Path) -> tuple[Tokenizer, bool]:
    """Reuse the tokenizer in ``out_dir`` if it was trained from the same inputs, else train.

    Args:
        cfg: the tokenizer section of the recipe.
        pairs: called (only when training is needed) to stream the training pairs, or a
            uniform sample of at least ``cfg.input_sentence_size`` of them.
        data_fingerprint: a fingerprint of the training corpus.
        src_lang, trg_lang: the language codes (part of the hash).
        out_dir: the tokenizer directory, usually ``<output_dir>/tokenizer``.

    Returns:
        The tokenizer and whether it was reused (True) or trained (False).
    """
    tokenizer = load_if_current(cfg, data_fingerprint, src_lang, trg_lang, out_dir)
    if tokenizer is not None:
        return tokenizer, True
    wanted = tokenizer_hash(cfg, data_fingerprint, src_lang, trg_lang)
    return train_tokenizer(cfg, pairs(), out_dir, data_hash=wanted), False


def _write_training_text(pairs: Iterable[tuple[str, str]], work: Path) -> tuple[Path, Path]:
    """Stream the pairs into ``src.txt`` and ``trg.txt``, one sentence a line."""
    src_path, trg_path = work / "src.txt", work / "trg.txt"
    with open(src_path, "w", encoding="utf-8") as src_file, \
            open(trg_path, "w", encoding="utf-8") as trg_file:
        for src, trg in pairs:
            # A newline inside a sentence (jsonl, hf) would split it into two lines.
            src_file.write(src.replace("\n", " ") + "\n")
            trg_file.write(trg.replace("\n", " ") + "\n")
    return src_path, trg_path


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _train_model(cfg: TokenizerConfig, inputs: list[Path], side: str = "") -> bytes:
    """Train one SentencePiece model on the text files ``inputs`` (of the ``side`` of
    separate vocabularies); return its proto."""
    model = io.BytesIO()
    # SentencePiece samples input_sentence_size sentences; a fixed seed makes that repeatable.
    spm.set_random_generator_seed(SAMPLING_SEED)
    with stops_kept():  # (SentencePiece reports a Ctrl-C as a failed training)
        try:
            spm.SentencePieceTrainer.train(
                # An iterator rather than input=paths: the paths would be stored in the model,
                # making two trainings on the same data differ.
                sentence_iterator=_lines(inputs), model_writer=model, model_type=cfg.type,
                vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
                input_sentence_size=cfg.input_sentence_size, shuffle_input_sentence=True,
                pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, byte_fallback=cfg.byte_fallback,
                normalization_rule_name=cfg.normalization,
                # Lines longer than this are skipped by SentencePiece, not truncated.
                max_sentence_length=16384, num_threads=max(1, os.cpu_count() or 1),
                minloglevel=2)
        except RuntimeError as error:
            message, data = str(error), f"{side} training data".lstrip()
            if match := _TOO_HIGH.search(message):
                raise Seq2SeqError(
                    f"tokenizer.vocab_size = {match.group(1)} is too large for the {data}; "
                    f"SentencePiece allows at most {match.group(2)}") from None
            if match := _TOO_LOW.search(message):
                raise Seq2SeqError(
                    f"tokenizer.vocab_size = {match.group(1)} is smaller than the {match.group(2)} "
                    f"characters and special tokens of the {data}; raise it or lower "
                    f"tokenizer.character_coverage") from None
            if "sentences_.empty()" in message:
                raise Seq2SeqError(f"the {data} has no sentence shorter than 16,384 bytes, the "
                                   "longest SentencePiece trains on") from None
            raise Seq2SeqError(f"SentencePiece training failed: {message.splitlines()[0]}"
                               ) from None
    return model.getvalue()


def _lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        # newline="\n": a lone \r is content, as the corpus reader has it, not a line break.
        with open(path, encoding="utf-8", newline="\n") as handle:
            for line in handle:
                yield line.rstrip("\n")


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing ``target`` as atomically as possible."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
