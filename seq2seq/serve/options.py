"""The service's limits and batching settings, and its optional API keys."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

from seq2seq.arguments import path
from seq2seq.errors import Seq2SeqError

# Most alternatives (n-best beyond the first) one request may ask for.
MAX_ALTERNATIVES = 10


def flag(default: Any, help: str) -> Any:
    """A dataclass field with its default and the help of its ``serve`` flag."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Everything ``seq2seq serve`` takes besides the checkpoints and the decoding flags.

    Each field but ``api_keys`` is the flag of its name (``batch_wait_ms``: ``--batch-wait-ms``).
    """

    host: str = flag("127.0.0.1", "address to bind (the default answers this machine only)")
    port: int = flag(5000, "TCP port (0: any free port)")
    batch_size: int = flag(64, "most sentences of concurrent requests decoded together: in "
                           "a beam search, which new requests join between steps; in a whole "
                           "decode otherwise (1: no batching across requests)")
    batch_wait_ms: float = flag(10.0, "how long a sentence waits for others: to join a "
                                "running beam search (unless a quarter of its size is waiting), "
                                "or, for a whole decode (greedy, CUDA graphs), for more after "
                                "the first one arrives")
    char_limit: int = flag(5000, "most characters of text in one request")
    body_limit: int = flag(1_000_000, "most bytes of request body (413 beyond)")
    max_texts: int = flag(100, "most strings in a q list")
    queue_size: int = flag(1000, "most sentences waiting per model (503 with Retry-After "
                           "beyond)")
    timeout: float = flag(60.0, "most seconds a request waits for its translation (503 beyond)")
    threads: int = flag(0, "CPU threads for torch in each model's process (0: torch's default, "
                        "one per core, shared among the models when there are several; 1 is "
                        "often fastest on a machine shared with other work)")
    api_keys: Optional[frozenset] = flag(None, "")
    """Keys a request must carry as ``api_key`` (``--api-keys FILE``); ``None``: none needed."""

    def __post_init__(self) -> None:
        problems = [f"--{name.replace('_', '-')} must be >= {least}, got {value}"
                    for name, least in [("batch_size", 1), ("char_limit", 1), ("body_limit", 1),
                                        ("max_texts", 1), ("queue_size", 1), ("port", 0),
                                        ("threads", 0)]
                    if (value := getattr(self, name)) < least]
        problems += [f"--{name.replace('_', '-')} must be <= {most}, got {value}"
                     for name, most in [("port", 65535), ("threads", 1024)]  # as train.threads
                     if (value := getattr(self, name)) > most]
        if not 0 < self.timeout < math.inf:
            problems.append(f"--timeout must be a number of seconds > 0, got {self.timeout}")
        if not 0 <= self.batch_wait_ms < math.inf:
            problems.append(f"--batch-wait-ms must be a number >= 0, got {self.batch_wait_ms}")
        elif self.batch_wait_ms > self.timeout * 1000:  # every request would time out waiting
            problems.append(f"--batch-wait-ms must not exceed --timeout ({self.timeout:g} s), "
                            f"got {self.batch_wait_ms:g} ms")
        if problems:
            raise Seq2SeqError("; ".join(problems))

    @classmethod
    def from_args(cls, args: Any) -> "ServeOptions":
        """The options of parsed ``seq2seq serve`` arguments."""
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
                  if field.name != "api_keys"}
        keys = load_api_keys(Path(args.api_keys)) if args.api_keys is not None else None
        return cls(**values, api_keys=keys)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``seq2seq serve`` for its options, defaults from :class:`ServeOptions`."""
    for field in dataclasses.fields(ServeOptions):
        if field.name != "api_keys":
            kind = type(field.default)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind,
                                default=field.default,
                                help=f"{field.metadata['help']} (default: {field.default})")
    # An empty path is refused: `--api-keys "$UNSET"` must not serve without keys.
    parser.add_argument("--api-keys", metavar="FILE", type=path,
                        help="require an api_key from this file (one key per line; 403 without)")


def load_api_keys(path: Path) -> frozenset[str]:
    """The keys in ``path``: one per line; blank lines and ``#`` comments are ignored.

    Raises:
        Seq2SeqError: the file cannot be read or holds no key.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is no part of the first key
    except (OSError, UnicodeDecodeError) as error:
        raise Seq2SeqError(f"{path}: cannot read the API keys ({error})") from None
    keys = frozenset(line.strip() for line in text.splitlines()
                     if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise Seq2SeqError(f"{path}: holds no API key (one per line)")
    return keys
