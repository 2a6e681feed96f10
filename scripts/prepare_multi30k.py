#!/usr/bin/env python3
"""Fetch the Multi30k task-1 corpus (Elliott et al. 2016) as ``{split}.{lang}.gz`` files.

The files are the ones published in the multi30k/dataset GitHub repository under
``data/task1/raw``: splits ``train`` (29,000 lines), ``val`` (1,014) and ``test_2016_flickr``
(1,000) in German, English, French and Czech. They are downloaded with urllib, or copied from a
local mirror directory holding the same file names (``--mirror``), checked (gzip readable, line
count as published) and written atomically into ``--output``. Files already there that pass
the check are kept.

Usage::

    python scripts/prepare_multi30k.py --output data/multi30k
    python scripts/prepare_multi30k.py --mirror /shared/multi30k --output data/multi30k

Exit status 0 on success; 2 with a one-line ``error:`` message on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import math
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from seq2seq.files import OutputError, write_bytes

BASE_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
SPLITS = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
LANGS = ("de", "en", "fr", "cs")


class PrepareError(Exception):
    """A failure reported on one line."""


def count_lines(name: str, data: bytes) -> int:
    """Lines of the gzip file ``data`` (a last line without a newline counts)."""
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise PrepareError(f"{name}: not a readable gzip file ({error})") from None
    return text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0)


def fetch(name: str, mirror: Path | None, base_url: str, timeout: float) -> bytes:
    """The bytes of ``name`` from the mirror directory, else from ``base_url``."""
    if mirror is not None:
        path = mirror / name
        try:
            if path.exists() and not path.is_file():  # a FIFO would block for ever
                raise PrepareError(f"{path}: not a regular file in the mirror")
            return path.read_bytes()
        except FileNotFoundError:
            raise PrepareError(f"{path}: no such file in the mirror") from None
        except OSError as error:
            raise PrepareError(f"{path}: cannot read ({error.strerror or error})") from None
    url = f"{base_url}/{name}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise PrepareError(f"{url}: HTTP {error.code} {error.reason}") from None
    except ValueError as error:  # not a URL: "unknown url type" (a directory meant?)
        raise PrepareError(f"--base-url {base_url}: {error}; a local copy is --mirror DIR") \
            from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PrepareError(f"{url}: download failed ({reason}); use --mirror DIR "
                           "without a network") from None


def prepare(output: Path, mirror: Path | None, langs: list[str], base_url: str,
            timeout: float) -> list[str]:
    """Fetch, check and write every file; return one report line per file.

    The directories made for ``output`` are removed again when the run fails before writing
    into them."""
    if mirror is not None and not mirror.is_dir():
        raise PrepareError(f"--mirror {mirror}: "
                           + ("not a directory" if mirror.exists() else "no such directory"))
    created = [path for path in (output, *output.parents) if not path.exists()]  # deepest first
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PrepareError(f"{output}: cannot create directory ({error.strerror})") from None
    try:
        return _prepare_files(output, mirror, langs, base_url, timeout)
    except BaseException:  # Ctrl-C too
        for path in created:
            with contextlib.suppress(OSError):  # not empty: files of this run are in it
                path.rmdir()
        raise


def _prepare_files(output: Path, mirror: Path | None, langs: list[str], base_url: str,
                   timeout: float) -> list[str]:
    report = []
    for split, expected in SPLITS.items():
        for lang in langs:
            name = f"{split}.{lang}.gz"
            target = output / name
            if target.is_file() and _has_lines(target, expected):
                report.append(f"{name}: {expected:,} lines (already present)")
                continue
            data = fetch(name, mirror, base_url, timeout)
            source = str(mirror / name) if mirror is not None else f"{base_url}/{name}"
            lines = count_lines(source, data)
            if lines != expected:
                raise PrepareError(f"{source}: {lines:,} lines, expected {expected:,}; "
                                   "the file is incomplete or not the published one")
            try:
                write_bytes(target, data)
            except OutputError as error:
                raise PrepareError(str(error)) from None
            report.append(f"{name}: {lines:,} lines")
    return report


def _has_lines(path: Path, expected: int) -> bool:
    try:
        return count_lines(path.name, path.read_bytes()) == expected
    except (PrepareError, OSError):
        return False


def seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("must be a finite number of seconds above 0, "
                                         f"got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("data/multi30k"),
                        help="directory to write {split}.{lang}.gz into (default: data/multi30k)")
    parser.add_argument("--mirror", type=Path, default=None,
                        help="copy from this directory instead of downloading")
    parser.add_argument("--langs", nargs="+", default=list(LANGS), choices=LANGS,
                        help="languages to fetch (default: de en fr cs)")
    parser.add_argument("--base-url", default=BASE_URL, help="where the files are downloaded from")
    parser.add_argument("--timeout", type=seconds, default=60.0, help="seconds per download")
    args = parser.parse_args(argv)
    try:
        report = prepare(args.output, args.mirror, args.langs, args.base_url, args.timeout)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the files written so far are whole (written atomically)
        print("error: interrupted; the files written so far are complete", file=sys.stderr)
        return 130
    for line in report:
        print(line)
    print(f"Multi30k task 1 ready in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
