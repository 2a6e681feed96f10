"""Translating with trained checkpoints: ``Translator`` and ``seq2seq translate``.

Everything a translation needs comes from the checkpoint: the recipe (architecture and default
search settings) and the SentencePiece model(s) saved with the run.

    >>> from seq2seq.translate import Translator
    >>> translator = Translator.from_checkpoint("runs/quickstart/best.pt", device="cpu")
    >>> translator.translate(["the dog sleeps ."], beam=5)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Set
from pathlib import Path
from typing import Any

import torch

from seq2seq.checkpoint import (
    CheckpointError,
    check_member,
    check_no_repeat,
    load_checkpoint,
    load_weights,
)
from seq2seq.config import DECODE_RANGES, DecodeConfig, Recipe, min_len_warnings, recipe_from_dict
from seq2seq.decoding import bucketed_batches, decode_ids, make_shortlist, search_path
from seq2seq.errors import Seq2SeqError, warn
from seq2seq.paths import check_distinct, check_output, same_file, writes_to_stdout
from seq2seq.search import BeamSearch, Ensemble, Hypothesis
from seq2seq.search.shortlist import Lexicon
from seq2seq.tokenizer import Tokenizer
from seq2seq.translate_io import check_stdin, clean_text, translate_file


class SettingError(Seq2SeqError, ValueError):
    """A search setting or device outside its range: a ``ValueError`` from Python, one
    ``error:`` line (exit 2) from the command line."""


class SettingTypeError(Seq2SeqError, TypeError):
    """A search setting of the wrong type (say, ``beam="5"``)."""


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def _read_part(path: str | Path, what: str, read: Any, state: Any) -> Any:
    """``read(state)``, a part of checkpoint ``path``; one that cannot be read (a checkpoint
    made by hand or by another program: a checkpoint written by seq2seq carries a digest of
    its contents) is one line naming it."""
    try:
        return read(state)
    except (AttributeError, TypeError, KeyError, ValueError, IndexError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: its {what} cannot be read ({reason})") from None


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """``name`` (auto, cpu, cuda or cuda:N) as a torch device; ``what`` names the option in
    errors. A GPU that this machine does not have is refused here, not at the first tensor."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise SettingError(f"{what} {name}: not a device name (auto, cpu, cuda or cuda:N)")
    kind, index = match.groups()
    if kind == "cpu":
        if index not in (None, "0"):
            raise SettingError(f"{what} {name}: the CPU is one device (cpu or cpu:0)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SettingError(f"{what} {name}: no CUDA GPU is available")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise SettingError(f"{what} {name}: this machine has {count} CUDA GPU"
                           f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
    return torch.device(name)


API_NAMES = {"beam_size": "beam", "n_best": "nbest", "alpha": "alpha",
             "max_len_ratio": "max_len_ratio", "batch_tokens": "batch_tokens",
             "shortlist": "shortlist", "device": "device", "quantize": "quantize=True",
             "precision": "precision="}
"""How each search setting is called in :meth:`Translator.translate`'s messages."""
CLI_NAMES = {"beam_size": "--beam", "n_best": "--nbest", "alpha": "--alpha",
             "max_len_ratio": "--max-len-ratio", "batch_tokens": "--batch-tokens",
             "shortlist": "--shortlist", "device": "--device", "quantize": "--quantize",
             "precision": "--precision "}
"""... and on the command line (``translate`` and ``evaluate`` share the flags)."""


def check_setting(key: str, value: Any, names: Mapping[str, str] = API_NAMES) -> None:
    """Refuse a search setting (a ``DecodeConfig`` field) outside the range the recipe's
    ``decode.<key>`` has, with the same words."""
    bounds = DECODE_RANGES[key]
    wrong_type = bounds.type_problem(value)
    if wrong_type:
        raise SettingTypeError(f"{names[key]}: {wrong_type}")
    problem = bounds.problem(value)
    if problem:
        raise SettingError(f"{names[key]}: {problem}")


def sentence_list(sentences: Any) -> list[str]:
    """``sentences`` (a list, tuple or other ordered iterable of strings) as a list; anything
    else is a ``TypeError`` that says what was expected."""
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, not one string "
                        "(write translate([sentence]) for a single sentence)")
    if (isinstance(sentences, (bytes, bytearray, Mapping, Set))
            or not isinstance(sentences, Iterable)):
        raise TypeError(f"sentences must be a list of strings, got "
                        f"{type(sentences).__name__}")
    sentences = list(sentences)
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(f"sentences[{index}] must be a string, got "
                            f"{type(sentence).__name__}")
    return [clean_text(sentence) for sentence in sentences]  # as the server takes them


@dataclasses.dataclass
class Translation:
    """One input sentence's n-best list, detokenized.

    ``hyp_pieces`` label the rows of each ``(T, S)`` ``attention`` matrix and ``src_pieces``
    its columns, one label per row and column: both end in ``"</s>"`` for the EOS step (a
    hypothesis cut at the maximum length has no EOS row, so no ``"</s>"`` label). All three are
    filled only when attention was asked for.
    """

    hypotheses: list[str]
    scores: list[float]
    src_pieces: list[str]
    hyp_pieces: list[list[str]]
    attention: list[torch.Tensor | None]


def blank_translation() -> Translation:
    """The translation of a blank sentence (not decoded): one empty hypothesis, score 0.0."""
    return Translation(hypotheses=[""], scores=[0.0], src_pieces=[], hyp_pieces=[[]],
                       attention=[None])


def checkpoint_paths(paths: Any, quantize: Any, precision: Any,
                     names: Mapping[str, str] = API_NAMES) -> list[str | Path]:
    """:meth:`Translator.from_checkpoint`'s arguments checked: its checkpoints as a list."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, Path)) for p in paths):
        raise SettingTypeError("paths must be a checkpoint path (str or Path) or a list of them, "
                               f"got {type(paths).__name__}")
    if not paths:
        raise Seq2SeqError("at least one checkpoint is needed")
    if not isinstance(quantize, bool):
        raise SettingTypeError(f"quantize must be True or False, got {quantize!r}")
    if precision not in ("fp32", "bf16", "auto"):
        raise SettingError(f"precision {precision!r}: fp32, bf16 or auto")
    if quantize and precision == "bf16":
        raise Seq2SeqError(f"{names['quantize']} and {names['precision']}bf16 exclude each "
                           "other: int8 weights compute in int8 and fp32")
    check_no_repeat(paths, "an ensemble")
    return list(paths)


class Translator:
    """A model (or an ensemble of checkpoints of one vocabulary) with its tokenizer."""

    def __init__(self, model: Any, tokenizer: Tokenizer, recipe: Recipe, device: torch.device,
                 checkpoints: list[str]):
        self.model, self.tokenizer, self.recipe = model, tokenizer, recipe
        self.device, self.checkpoints = device, checkpoints
        self.precision = "fp32"  # of the weights decoded with: fp32, bf16 or int8
        self.lexicon: Lexicon | None = None  # the first checkpoint's, for decode.shortlist

    @classmethod
    def from_checkpoint(cls, paths: str | Path | list[str | Path],
                        device: str | torch.device = "auto", quantize: bool = False,
                        precision: str = "fp32", names: Mapping[str, str] = API_NAMES,
                        ) -> "Translator":
        """Load one checkpoint, or several (an ensemble) sharing one tokenizer.

        ``quantize`` decodes with an int8 copy (CPU only, see
        :mod:`seq2seq.quantize`). ``precision`` "bf16" decodes with the weights cast to bf16
        once; "auto" picks bf16 where the device computes it natively, else fp32 (see
        :func:`seq2seq.precision.decoding_model`); :attr:`precision` says which it became.
        ``names``: how the arguments are called in errors (:data:`CLI_NAMES` for the commands).
        """
        from seq2seq.models.seq2seq import build_model

        paths = checkpoint_paths(paths, quantize, precision, names)
        if isinstance(device, torch.device):
            device = str(device)
        torch_device = resolve_device(device, names["device"])
        models, recipe, tokenizer, lexicon, first_tok = [], None, None, None, None
        for path in paths:
            ckpt = load_checkpoint(Path(path))
            if not models and ckpt.get("lexicon") is not None:
                lexicon = _read_part(path, "lexicon", Lexicon.from_state, ckpt["lexicon"])
            this_recipe = recipe_from_dict(ckpt["recipe"], source=f"{path} (recipe)")
            if ckpt.get("tokenizer") is None:
                raise Seq2SeqError(f"{path}: the checkpoint holds no tokenizer")
            this_tok = _read_part(path, "tokenizer", Tokenizer.from_state, ckpt["tokenizer"])
            if models:
                check_member(path, paths[0], this_recipe, recipe, ckpt["tokenizer"], first_tok)
            else:
                first_tok = ckpt["tokenizer"]
            model = build_model(this_recipe.model, this_tok.src_vocab_size,
                                this_tok.trg_vocab_size)
            load_weights(model, ckpt["model"], Path(path))
            models.append(model.to(torch_device).eval())
            recipe = recipe or this_recipe
            tokenizer = tokenizer or this_tok
        model = models[0] if len(models) == 1 else Ensemble(models)
        chosen = "fp32"
        if quantize:
            from seq2seq.quantize import quantize_for_cpu

            model = quantize_for_cpu(model)
        else:
            from seq2seq.precision import decoding_model

            model, chosen, _ = decoding_model(model, precision, torch_device)
        translator = cls(model, tokenizer, recipe, torch_device, [str(p) for p in paths])
        translator.precision = "int8" if quantize else chosen
        translator.lexicon = lexicon
        return translator

    def decode_settings(self, beam: int | None = None, nbest: int | None = None,
                        alpha: float | None = None, max_len_ratio: float | None = None,
                        batch_tokens: int | None = None, shortlist: int | None = None,
                        base: DecodeConfig | None = None,
                        names: Mapping[str, str] = API_NAMES) -> DecodeConfig:
        """A decode section (``base``, default the checkpoint recipe's) with the given values
        overriding it; ``names`` spells each option in messages as the caller does (``beam``
        from Python, ``--beam`` from the command line).

        Raises:
            SettingTypeError: a value of the wrong type (a ``TypeError``).
            SettingError: a value outside its range, or an n-best list longer than the beam
                (a ``ValueError``); the beam is never raised behind the caller's back.
        """
        base = base or self.recipe.decode
        given = {key: value for key, value in (
            ("beam_size", beam), ("n_best", nbest), ("alpha", alpha),
            ("max_len_ratio", max_len_ratio), ("batch_tokens", batch_tokens),
            ("shortlist", shortlist))
            if value is not None}
        for key, value in given.items():
            check_setting(key, value, names)
        if "beam_size" in given and "n_best" not in given:
            given["n_best"] = min(base.n_best, given["beam_size"])
        beam_size = given.get("beam_size", base.beam_size)
        if given.get("n_best", 1) > beam_size:
            source = (f"{names['beam_size']} {beam_size}" if "beam_size" in given
                      else f"{beam_size}, the recipe's decode.beam_size")
            raise SettingError(f"{names['n_best']} {given['n_best']} is larger than the beam "
                               f"size ({source}); give {names['beam_size']} "
                               f"{given['n_best']} or more")
        if given.get("shortlist", base.shortlist) and self.lexicon is None:
            source = (names["shortlist"] if "shortlist" in given
                      else "the recipe's decode.shortlist")
            raise SettingError(f"{source}: {self.checkpoints[0]} holds no lexicon (it was "
                               "written before shortlists existed); decode without one")
        from seq2seq.config import RecipeError

        try:
            return dataclasses.replace(base, **given)
        except RecipeError as error:
            raise SettingError("; ".join(error.problems)) from None

    def translate_full(self, sentences: list[str], settings: DecodeConfig,
                       return_attention: bool = False) -> list[Translation]:
        """Translate with full detail: n-best texts and scores, and with ``return_attention``
        the attention matrices with the subword pieces they are over (else those are empty).

        A blank or whitespace-only sentence is not decoded (a model asked to translate nothing
        makes something up): it gets one empty hypothesis with score 0.0, as ``seq2seq
        translate`` writes an empty line for it.

        Raises:
            TypeError: ``sentences`` is not a list (or other sequence) of strings; a single
                string is refused, never read character by character.
        """
        sentences = sentence_list(sentences)
        if not isinstance(settings, DecodeConfig):
            raise TypeError(f"settings must be a DecodeConfig (see decode_settings), got "
                            f"{type(settings).__name__}")
        todo, src_ids = self.encode_sources(sentences)
        out = [blank_translation() for _ in sentences]
        nbests = decode_ids(self.model, src_ids, settings, self.device, return_attention,
                            self.lexicon)
        # One SentencePiece call for every hypothesis of every sentence, not one per sentence.
        texts = iter(self.tokenizer.decode_trg([h.tokens for nbest in nbests for h in nbest]))
        for i, ids, nbest in zip(todo, src_ids, nbests):
            out[i] = self.translation(ids, nbest, return_attention,
                                      [next(texts) for _ in nbest])
        return out

    def encode_sources(self, sentences: list[str]) -> tuple[list[int], list[list[int]]]:
        """The indices of the sentences that are not blank, and their source token ids.

        Blank sentences are not decoded: their translation is :func:`blank_translation`. So
        are sentences of only what SentencePiece deletes (zero-width spaces, control
        characters): they encode to no token, from which a model makes something up.
        """
        todo = [i for i, sentence in enumerate(sentences) if sentence.strip()]
        ids = self.tokenizer.encode_src([sentences[i] for i in todo])
        kept = [k for k, row in enumerate(ids) if row]
        return [todo[k] for k in kept], [ids[k] for k in kept]

    def translation(self, src_ids: list[int], nbest: list[Hypothesis], return_attention: bool,
                    texts: list[str] | None = None) -> Translation:
        """The :class:`Translation` of one searched sentence (``texts``: its hypotheses
        detokenized already, else detokenized here)."""
        if texts is None:
            texts = self.tokenizer.decode_trg([h.tokens for h in nbest])
        return Translation(
            hypotheses=texts, scores=[h.score for h in nbest],
            src_pieces=self.tokenizer.src_pieces(src_ids) + ["</s>"] if return_attention
            else [],
            hyp_pieces=[self._hyp_labels(h) if return_attention else [] for h in nbest],
            attention=[h.attention for h in nbest])

    def joinable_search(self, settings: DecodeConfig, return_attention: bool
                        ) -> BeamSearch | None:
        """A :class:`BeamSearch` that sentences can join while it runs, deciding exactly as
        :meth:`translate_full` does with these settings; None where ``translate_full`` would
        not run this beam search (greedy, CUDA graphs)."""
        if search_path(settings, self.device, return_attention) != "beam":
            return None
        return BeamSearch(self.model, beam_size=settings.beam_size, n_best=settings.n_best,
                          alpha=settings.alpha, max_len_ratio=settings.max_len_ratio,
                          max_len_add=settings.max_len_add, min_len=settings.min_len,
                          no_repeat_ngram=settings.no_repeat_ngram,
                          return_attention=return_attention,
                          shortlist=make_shortlist(settings, self.lexicon),
                          buckets=bucketed_batches(self.model, self.device))

    def _hyp_labels(self, hyp: Hypothesis) -> list[str]:
        """The target pieces of ``hyp``, one per row of its attention matrix."""
        pieces = self.tokenizer.trg_pieces(hyp.tokens)
        # The search attends once more on the step that chose EOS; that row gets "</s>" as
        # the source's EOS column does.
        if hyp.attention is not None and hyp.attention.shape[0] == len(hyp.tokens) + 1:
            pieces.append("</s>")
        return pieces

    def translate(self, sentences: list[str], beam: int | None = None,
                  nbest: int | None = None, **overrides: Any) -> list[str] | list[list[str]]:
        """Translate sentences; one string each, or a list of ``nbest`` strings each.

        A blank sentence gives ``""`` (with ``nbest``: ``[""]``) without being decoded.

        Raises:
            TypeError: ``sentences`` is not a list of strings, or a setting has the wrong type.
            ValueError: a setting is outside its range (see :meth:`decode_settings`).
        """
        settings = self.decode_settings(beam=beam, nbest=nbest, **overrides)
        results = self.translate_full(sentences, settings)
        if nbest is None:
            return [r.hypotheses[0] for r in results]
        return [r.hypotheses for r in results]


def translate_command(args: Any) -> int:
    """``seq2seq translate``: stream stdin (or --input) to stdout (or --output), line for line."""
    # Before the model loads: a bad output path must not cost a whole translation run.
    check_output(args.output)
    if args.attention:
        check_output(args.attention)
    if args.input in (None, "-"):
        check_stdin()
    check_distinct([args.output or "-", args.attention], [args.input or "-", *args.checkpoint])
    if args.scores and args.nbest:  # it would be ignored without a word
        raise Seq2SeqError("--scores and --nbest: the n-best rows carry their scores already "
                           "(index, score, text); drop --scores")
    if args.attention and writes_to_stdout(args.output) and writes_to_stdout(args.attention):
        raise Seq2SeqError(f"--attention {args.attention}: stdout already receives the "
                           "translations; write the attention to a file")
    if any(same_file(args.input, checkpoint) for checkpoint in args.checkpoint):
        raise Seq2SeqError(f"--input {args.input}: is the checkpoint, not text to translate")
    translator = Translator.from_checkpoint(args.checkpoint, device=args.device,
                                            quantize=args.quantize, precision=args.precision,
                                            names=CLI_NAMES)
    return translate_file(translator, command_settings(translator, args, args.nbest), args)


def command_settings(translator: Translator, args: Any, nbest: int | None,
                     base: DecodeConfig | None = None) -> DecodeConfig:
    """``translate``'s or ``evaluate``'s flags over ``base``; warns of a min_len out of reach."""
    settings = translator.decode_settings(
        beam=args.beam, nbest=nbest, alpha=args.alpha, max_len_ratio=args.max_len_ratio,
        batch_tokens=args.batch_tokens, shortlist=args.shortlist, base=base, names=CLI_NAMES)
    given = {"max_len_ratio": "--max-len-ratio"} if args.max_len_ratio is not None else {}
    for message in min_len_warnings(settings, given):
        warn(message)
    return settings
