"""Reading a ``/translate`` request and checking every field, as LibreTranslate documents it.

A request is JSON, or a form (``application/x-www-form-urlencoded`` as libretranslatepy sends
it, or ``multipart/form-data``), with ``q`` (a string, or with JSON a list of strings),
``source``, ``target``, ``format`` (``text``), ``alternatives`` (how many other translations
to return) and ``api_key``. ``attention`` (a seq2seq extension the page at ``/`` uses) asks for
the attention matrix of a one-sentence text. Anything else a client may send is refused with an
``ApiError`` naming the problem; nothing here raises anything else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any
from urllib.parse import parse_qs

from seq2seq.serve.options import MAX_ALTERNATIVES, ServeOptions
from seq2seq.translate_io import clean_text

MAX_FORM_FIELDS = 100
"""Fields a form may have (a ``/translate`` request needs seven)."""


class ApiError(Exception):
    """A request the service refuses: its HTTP status, message and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclasses.dataclass(frozen=True)
class TranslateRequest:
    """A checked ``/translate`` request."""

    texts: list[str]
    """The strings of ``q`` (one, unless ``q`` was a list)."""
    is_list: bool
    """Whether ``q`` was a list (the answer follows its shape)."""
    source: str
    target: str
    alternatives: int
    attention: bool


async def read_body(receive_chunks: Any, content_length: str | None, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes.

    Args:
        receive_chunks: an async iterator of ``bytes`` (Starlette's ``request.stream()``).
        content_length: the Content-Length header, checked before anything is read.
        limit: the most bytes allowed.
    """
    too_large = ApiError(413, f"Request body exceeds the limit of {limit} bytes")
    declared = (content_length or "").lstrip("0")
    if declared.isascii() and declared.isdigit() and (len(declared) > len(str(limit))
                                                      or int(declared) > limit):
        raise too_large
    body = bytearray()
    async for chunk in receive_chunks:
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_fields(body: bytes, content_type: str) -> dict[str, Any]:
    """The request's fields from a JSON or urlencoded body (multipart is parsed by the app).

    Raises:
        ApiError: 400 for a body that is not a JSON object or a form.
    """
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/json":
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ApiError(400, "Invalid request: the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "Invalid request: the JSON body must be an object")
        return fields
    if media_type in ("application/x-www-form-urlencoded", ""):
        try:
            form = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True,
                            encoding="utf-8", errors="replace", max_num_fields=MAX_FORM_FIELDS)
        except ValueError:  # more fields than that
            raise ApiError(400, f"Invalid request: the form has more than {MAX_FORM_FIELDS} "
                           "fields") from None
        return form_fields(form)
    raise ApiError(400, f"Invalid request: content type {media_type!r} is not supported; send "
                   "JSON or a form")


def form_fields(form: dict[str, list[str]]) -> dict[str, Any]:
    """One value per field of a parsed form; a field given twice is refused."""
    repeated = sorted(name for name, values in form.items() if len(values) > 1)
    if repeated:
        raise ApiError(400, f"Invalid request: form field {repeated[0]!r} is given more than "
                       "once (send a list of texts as JSON)")
    return {name: values[0] for name, values in form.items()}


def check_api_key(fields: dict[str, Any], keys: frozenset[str] | None) -> None:
    """Refuse with 403 a missing or unknown ``api_key`` when the service has keys."""
    if keys is None:
        return
    key = fields.get("api_key")
    if not isinstance(key, str) or not key:
        raise ApiError(403, "Invalid API key: this server needs an api_key")
    if key not in keys:
        raise ApiError(403, "Invalid API key")


def parse_translate(fields: dict[str, Any], options: ServeOptions) -> TranslateRequest:
    """Check the fields of a ``/translate`` request against the options' limits.

    Raises:
        ApiError: 403 for a missing or wrong key, 400 for anything else wrong.
    """
    check_api_key(fields, options.api_keys)
    q = fields.get("q")
    if q is None:
        raise ApiError(400, "Invalid request: missing q parameter")
    is_list = isinstance(q, list)
    texts = q if is_list else [q]
    if not all(isinstance(text, str) for text in texts):
        raise ApiError(400, "Invalid request: q must be a string or a list of strings")
    if len(texts) > options.max_texts:
        raise ApiError(400, f"Invalid request: q holds {len(texts)} texts, more than the "
                       f"limit of {options.max_texts}")
    chars = sum(len(text) for text in texts)
    if chars > options.char_limit:
        raise ApiError(400, f"Invalid request: request ({chars}) exceeds text limit "
                       f"({options.char_limit})")
    source, target = (language_field(fields, name) for name in ("source", "target"))
    # An optional field sent as null or "" means its default, as it does to LibreTranslate.
    text_format = fields.get("format") or "text"
    if text_format == "html":
        raise ApiError(400, "Invalid request: format html is not supported; send plain text "
                       "with format text")
    if text_format != "text":
        raise ApiError(400, f"Invalid request: format must be text, got {text_format!r}"[:300])
    return TranslateRequest(texts=[clean_text(text) for text in texts], is_list=is_list,
                            source=source, target=target,
                            alternatives=alternatives_field(fields.get("alternatives") or 0),
                            attention=flag_field(fields.get("attention") or False, "attention"))


def language_field(fields: dict[str, Any], name: str) -> str:
    """A ``source`` or ``target`` code; ``auto`` detection is refused."""
    value = fields.get(name)
    if value is None:
        raise ApiError(400, f"Invalid request: missing {name} parameter")
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"Invalid request: {name} must be a language code")
    if value == "auto":
        raise ApiError(400, "Invalid request: source auto (language detection) is not "
                       "supported; name the source language")
    return value.strip()


def alternatives_field(value: Any) -> int:
    """``alternatives`` as an int in ``[0, MAX_ALTERNATIVES]`` (a form sends it as text)."""
    if isinstance(value, str) and _whole_number(value.strip(), 9):
        value = int(value.strip())
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, "Invalid request: alternatives must be a whole number")
    if not 0 <= value <= MAX_ALTERNATIVES:
        raise ApiError(400, f"Invalid request: alternatives must be between 0 and "
                       f"{MAX_ALTERNATIVES}, got {value}")
    return value


def _whole_number(text: str, max_digits: int) -> bool:
    """Whether ``text`` is 1 to ``max_digits`` ASCII digits: ``int()`` takes it. (``"²"``
    passes ``str.isdigit``, and ``int()`` refuses it, or 5,000 digits.)"""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def flag_field(value: Any, name: str) -> bool:
    """A boolean field: JSON true/false, or a form's ``true``/``false``/``1``/``0``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
        return value.lower() in ("true", "1")
    raise ApiError(400, f"Invalid request: {name} must be true or false")
