"""Regenerate the recipe and CLI references in README.md from the code.

    python scripts/update_readme.py          # rewrite README.md in place
    python scripts/update_readme.py --check  # exit 1 if README.md is stale

The recipe reference comes from the dataclasses in seq2seq/config/schema.py and the CLI
reference from the argparse parser in seq2seq/cli.py, so neither can drift from the code.
"""

import argparse
import re
import sys
from pathlib import Path

from seq2seq.cli import build_parser
from seq2seq.config import recipe_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def cli_reference() -> str:
    parser = build_parser()
    parts = []
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        sub.prog = f"seq2seq {name}"
        parts.append(f"#### `seq2seq {name}`\n\n```\n{sub.format_help().strip()}\n```\n")
    return "\n".join(parts)


def replace_block(text: str, tag: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"README.md has no <!-- {tag}:start --> ... <!-- {tag}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args()
    old = README.read_text(encoding="utf-8")
    new = replace_block(old, "recipe-reference", recipe_reference())
    new = replace_block(new, "cli-reference", cli_reference())
    if args.check:
        if new != old:
            print("README.md is stale: run python scripts/update_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
