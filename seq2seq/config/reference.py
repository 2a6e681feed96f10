"""The README's recipe reference, generated from the schema so it cannot drift from it."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from seq2seq.config.loading import _type_name, recipe_to_dict
from seq2seq.config.schema import Corpus, Recipe


def recipe_reference() -> str:
    """Markdown tables of every recipe key, its default and description (for the README)."""
    lines: list[str] = []

    def table(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        lines.append("| key | type | default | range | description |")
        lines.append("|---|---|---|---|---|")
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if tp is Corpus:
                lines.append(f"| `{prefix}{f.name}` | a corpus (below) | | | "
                             f"{f.metadata['help']} |")
                continue
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{f.name}."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = recipe_to_dict(default)
            flow = yaml.safe_dump(default, default_flow_style=True)
            shown = "`null`" if default is None else f"`{flow.strip().removesuffix('...').strip()}`"
            kind = "a mapping of name to corpus" if tp == dict[str, Corpus] else _type_name(tp)
            kind = kind.replace("|", "\\|")
            bounds = f.metadata.get("range")
            within = f"`{bounds}`" if bounds else ""
            lines.append(f"| `{prefix}{f.name}` | {kind} | {shown} | {within} | "
                         f"{f.metadata['help']} |")
        for tp, sub in nested:
            lines.append("")
            lines.append(f"### `{sub.rstrip('.')}`")
            lines.append("")
            table(tp, sub)

    lines.append("### top level")
    lines.append("")
    table(Recipe, "")
    lines.append("")
    lines.append("### `data.train`, `data.valid`, `data.test.<name>` (a corpus)")
    lines.append("")
    table(Corpus, "")
    return "\n".join(lines) + "\n"
