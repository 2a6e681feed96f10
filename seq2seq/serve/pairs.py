"""The served models, one per language pair, and texts as the lines ``seq2seq translate`` reads.

A text is translated line by line exactly as ``seq2seq translate`` translates a file holding it:
split at ``"\\n"``, each line cut to ``DEFAULT_MAX_CHARS`` characters and stripped, blank lines
left empty without reaching the model, ``"\\n"``/``"\\r"`` inside a translation written as
spaces; the translated lines are joined with ``"\\n"`` again. So ``q = "a\\n\\nb"`` gives the
three lines ``translate`` writes for that input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from seq2seq.config import DecodeConfig
from seq2seq.errors import Seq2SeqError
from seq2seq.serve.parsing import ApiError
from seq2seq.translate_io import DEFAULT_MAX_CHARS, one_line

LANGUAGE_NAMES = {
    "ar": "Arabic", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "fi": "Finnish", "fr": "French",
    "hi": "Hindi", "hu": "Hungarian", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "lt": "Lithuanian", "lv": "Latvian", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian",
    "zh": "Chinese",
}


@dataclasses.dataclass
class ServedModel:
    """One checkpoint behind the API: its language pair, translator, settings and worker."""

    source: str
    target: str
    checkpoint: str
    translator: Any
    """A ``seq2seq.translate.Translator``, for its settings (``serve`` releases its model:
    the worker process loads its own)."""
    settings: DecodeConfig
    """The decoding settings of the ``serve`` flags over the checkpoint's recipe."""
    worker: Any
    """A :class:`~seq2seq.serve.process.WorkerProcess` (or an in-process
    :class:`~seq2seq.serve.worker.BatchWorker`)."""

    def settings_for(self, alternatives: int) -> DecodeConfig:
        """The settings of ``translate --nbest alternatives+1`` (or of no ``--nbest``); an n-best
        list longer than the beam is refused, as ``translate`` refuses it."""
        if alternatives == 0:
            return self.settings
        if alternatives + 1 > self.settings.beam_size:
            raise ApiError(400, f"Invalid request: {alternatives} alternatives need a beam of "
                           f"{alternatives + 1}; this server decodes with beam "
                           f"{self.settings.beam_size} (at most {self.settings.beam_size - 1} "
                           "alternatives)")
        return self.translator.decode_settings(nbest=alternatives + 1, base=self.settings)


class LanguagePairs:
    """The served models by ``(source, target)``."""

    def __init__(self, models: list[ServedModel]):
        self.models: dict[tuple[str, str], ServedModel] = {}
        for model in models:
            pair = (model.source, model.target)
            if pair in self.models:
                raise Seq2SeqError(f"{model.checkpoint} and {self.models[pair].checkpoint} both "
                                   f"translate {pair[0]} to {pair[1]}; serve one of them")
            self.models[pair] = model

    def get(self, source: str, target: str) -> ServedModel:
        """The model for a pair; an unknown pair is a 400 naming the pairs there are."""
        if (source, target) not in self.models:
            served = ", ".join(f"{s}->{t}" for s, t in self.models)
            raise ApiError(400, f"Invalid request: no model translates {source[:20]!r} to "
                           f"{target[:20]!r} (served: {served})")
        return self.models[(source, target)]

    def languages(self) -> list[dict[str, Any]]:
        """``GET /languages``: every language with its name and the targets it translates to."""
        codes = sorted({code for pair in self.models for code in pair})
        return [{"code": code, "name": LANGUAGE_NAMES.get(code, code),
                 "targets": sorted(t for s, t in self.models if s == code)} for code in codes]

    def start(self) -> None:
        for model in self.models.values():
            model.worker.start()

    def stop(self) -> None:
        """Let every worker finish its queue and current decode (a thread killed inside torch
        at interpreter exit would abort the process)."""
        for model in self.models.values():
            model.worker.stop()


def text_lines(text: str) -> list[str]:
    """The stripped lines ``seq2seq translate`` would translate for a file holding ``text``
    (a byte order mark starting a line dropped)."""
    return [line.removeprefix("\ufeff")[:DEFAULT_MAX_CHARS].strip() for line in text.split("\n")]


def assemble(lines: list[str], translations: list[Any], alternatives: int
             ) -> tuple[str, list[str]]:
    """One text's translation and its ``alternatives`` from its lines' translations.

    Args:
        lines: the text's lines (:func:`text_lines`).
        translations: one ``Translation`` per non-blank line, in order.
        alternatives: how many other translations were asked for.

    Returns:
        The translated text, and the alternatives: the k-th joins each line's (k+1)-th
        hypothesis (or its last, where a line has fewer).
    """
    found = iter(translations)
    hypotheses = [[one_line(h) for h in next(found).hypotheses] if line else [""]
                  for line in lines]
    texts = ["\n".join(hyps[min(k, len(hyps) - 1)] for hyps in hypotheses)
             for k in range(alternatives + 1)]
    return texts[0], texts[1:]


def attention_of(translation: Any) -> dict[str, Any] | None:
    """The first hypothesis's attention for the page: source and target pieces, weights."""
    if translation is None or translation.attention[0] is None:
        return None
    return {"src": translation.src_pieces, "hyp": translation.hyp_pieces[0],
            "weights": [[round(w, 4) for w in row] for row in translation.attention[0].tolist()]}
