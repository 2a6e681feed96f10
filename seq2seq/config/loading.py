"""Loading a recipe: YAML tree + dotted overrides -> typed, checked dataclasses, and back.

``load_recipe(path, overrides)`` applies ``section.key=value`` overrides, converts every value to
its field's type and reports *all* problems at once in one :class:`RecipeError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from seq2seq.config.errors import RecipeError
from seq2seq.config.schema import DataConfig, Recipe
from seq2seq.errors import warn

RECIPE_SAID = "SEQ2SEQ_RECIPE_WARNED"
"""Set for the workers that ``seq2seq train`` starts through torchrun: the launching process
has said the command line's warnings, so its workers' rank 0 does not say them again."""


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing what it would accept with another meaning: a duplicate key
    (PyYAML keeps the last silently), named with both lines; and a recursive alias
    (``a: &x [*x]``), which would build an infinitely deep value."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._open_anchors: set[str] = set()  # anchors of the nodes being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"recursive alias *{event.anchor} (inside the value it names)",
                    event.start_mark)
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(anchor)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # merged keys (<<) may be overridden: that is what merging means
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on lines {lines[key]} and {line}",
                    key_node.start_mark)
            lines[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> int:
        """An integer as written, refusing YAML 1.1's other bases that read like decimals:
        ``010000`` is octal 4096 there, ``1:00`` base 60 (so 60)."""
        text = str(self.construct_scalar(node)).replace("_", "")
        if re.fullmatch(r"[-+]?0[0-7]+|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+", text):
            raise yaml.constructor.ConstructorError(
                None, None, f"{text}: YAML 1.1 reads this integer as octal or base 60; write it "
                "in decimal without a leading 0", node.start_mark)
        return super().construct_yaml_int(node)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + str(len(typing.get_args(tp))) + " numbers"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert a YAML value to ``tp``; on failure append a problem and return a sentinel."""
    origin = typing.get_origin(tp)
    bad = f"expected {_type_name(tp)}, got {_show(value)}"
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        return _fail(problems, path, bad)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        scratch: list[str] = []
        result = _convert(value, inner[0], path, scratch)
        if scratch:
            return _fail(problems, path, bad)
        return result
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _fail(problems, path, bad)
        items = [_convert(v, a, f"{path}[{i}]", problems) for i, (v, a) in
                 enumerate(zip(value, args))]
        return tuple(items)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return _fail(problems, path, bad)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                problems.append(f"{path}: keys must be non-empty strings, got {_show(key)}")
                continue
            out[key] = _convert(item, val_tp, f"{path}.{key}", problems)
        return out
    if tp is bool:
        return value if isinstance(value, bool) else _fail(problems, path, bad)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else _fail(problems, path, bad)
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)  # an int of 400 digits is no float
            except OverflowError:
                return _fail(problems, path, bad)
            if math.isfinite(value):
                return value
        return _fail(problems, path, bad)
    if tp is str:
        return value if isinstance(value, str) else _fail(problems, path, bad)
    raise TypeError(f"unsupported recipe field type {tp!r} at {path}")  # a bug in this module


_INVALID = object()
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _fail(problems: list[str], path: str, message: str) -> Any:
    problems.append(f"{path}: {message}")
    return _INVALID


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    head, dot, rest = key.partition(".")
    if dot and head in valid:  # "train.lr: 2" in a YAML file: the override syntax
        return (f"; a dotted key is for the command line ({key}=VALUE); in YAML, nest it: "
                f"{prefix}{head}: {{{rest}: VALUE}}")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _build(cls: Any, tree: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, collecting every problem."""
    prefix = f"{path}." if path else ""
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        return _fail(problems, path or "recipe", f"expected a mapping, got {_show(tree)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        if not isinstance(key, str) or key not in fields:
            problems.append(f"{prefix}{key}: unknown key"
                            + _suggest(str(key), list(fields), prefix))
            continue
        converted = _convert(value, hints[key], f"{prefix}{key}", problems)
        if converted is not _INVALID:
            kwargs[key] = converted
    if any(v is _INVALID for v in _walk(kwargs)):
        return _INVALID
    try:
        return cls(**kwargs)
    except RecipeError as error:
        problems.extend(error.problems)
        return _INVALID


def _walk(value: Any):
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)


def read_yaml(text: str) -> Any:
    """``text`` parsed by :class:`RecipeLoader`, a ``yaml.SafeLoader`` (as ``yaml.load`` does
    with it, written out so that no unsafe loader can slip in)."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # PyYAML composes nested collections recursively
        raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, OverflowError) as error:  # a date such as 2026-02-30, a 5,000-digit int
        raise yaml.YAMLError(f"a value YAML cannot build: {error}") from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError([f"{text}: overrides are written key.path=value"])
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(tree: dict, parts: list[str], value: Any) -> None:
    """Set ``tree[parts[0]][parts[1]]... = value``, creating mappings on the way."""
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _dropped_keys(tree: dict, parts: list[str], value: Any) -> list[str]:
    """The keys of a recipe section (``train``, ...) that overriding it with the mapping
    ``value`` drops (a corpus or the test sets given whole are meant to be replaced)."""
    node = tree.get(parts[0]) if len(parts) == 1 else None
    if not isinstance(node, dict) or not isinstance(value, dict):
        return []
    return [str(name) for name in node if name not in value]


def recipe_from_dict(tree: Any, overrides: list[str] = (), source: str = "recipe") -> Recipe:
    """Build a checked :class:`Recipe` from a parsed YAML tree plus dotted overrides."""
    problems: list[str] = []
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError([f"{source}: expected a mapping at the top level, got {_show(tree)}"])
    tree = _deepcopy(tree, source)
    given = {}  # dotted key -> the override that set it, to name where a problem comes from
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except RecipeError as error:
            problems.extend(error.problems)
            continue
        key = ".".join(parts)
        # Scripts layer overrides (a base list, then a user's): said, not refused; once, not
        # by every worker of a process group, which reads the same command line.
        say = os.environ.get("RANK", "0") == "0" and RECIPE_SAID not in os.environ
        if key in given and say:
            warn(f"{key} is overridden twice ({given[key]}, then {text}); the last one holds")
        if (dropped := _dropped_keys(tree, parts, value)) and say:
            warn(f"{key}={{...}} replaces the whole {key} of the recipe: its "
                 f"{', '.join(dropped)} are dropped (defaults, if any, hold); to change one "
                 f"key, write {key}.KEY=VALUE")
        apply_override(tree, parts, value)
        given[key] = text
    recipe = _build(Recipe, tree, "", problems)
    if problems or recipe is _INVALID:
        raise RecipeError([f"{source}: {p}" + next(
            (f" (from the override {text})" for key, text in given.items()
             if p.startswith(f"{key}:")), "") for p in problems])
    return _expanded_outputs(recipe)


def _expanded_outputs(recipe: Recipe) -> Recipe:
    """``recipe`` with ``~`` and ``$VARS`` expanded in its output directories, as they are in
    its input paths (where they are expanded when read), so that no command writes to a
    literal ``./~`` directory."""
    def expand(path: str) -> str:
        return os.path.expandvars(os.path.expanduser(path))

    report_dir = recipe.eval.report_dir
    return dataclasses.replace(
        recipe, output_dir=expand(recipe.output_dir),
        eval=dataclasses.replace(recipe.eval,
                                 report_dir=None if report_dir is None else expand(report_dir)))


MAX_DEPTH = 50  # a recipe is 3 levels deep; a cycle (Python data) or alias bomb is not
MAX_RECIPE_BYTES = 2**20
MAX_VALUES = 100_000  # aliases inside aliases can expand a short file exponentially


def _deepcopy(tree: Any, source: str, depth: int = 0, count: list[int] | None = None) -> Any:
    """A copy of the tree; refuses one nested past ``MAX_DEPTH`` or holding ``MAX_VALUES``."""
    count = [0] if count is None else count
    count[0] += 1
    if depth > MAX_DEPTH or count[0] > MAX_VALUES:
        raise RecipeError([f"{source}: nested deeper than {MAX_DEPTH} levels or holding more "
                           f"than {MAX_VALUES:,} values (aliases repeated inside aliases?)"])
    if isinstance(tree, dict):
        return {k: _deepcopy(v, source, depth + 1, count) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deepcopy(v, source, depth + 1, count) for v in tree]
    return tree


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe file and apply overrides; raise :class:`RecipeError` on any problem."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:  # at most this much of /dev/zero, say
            data = handle.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise RecipeError([f"{path}: larger than {MAX_RECIPE_BYTES // 2**20} MiB, which no "
                               "recipe is"])
        text = data.decode("utf-8")
    except FileNotFoundError:
        hint = " (overrides come after the recipe file)" if "=" in str(path) else ""
        raise RecipeError([f"{path}: no such recipe file{hint}"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: is a directory, not a recipe file"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError([f"{path}: cannot read recipe ({error})"]) from None
    try:
        tree = read_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError([f"{path}:{where} invalid YAML ({reason})"]) from None
    return recipe_from_dict(tree, overrides, source=str(path))


def recipe_to_dict(recipe: Any) -> Any:
    """The recipe as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(recipe):
        return {f.name: recipe_to_dict(getattr(recipe, f.name))
                for f in dataclasses.fields(recipe)}
    if isinstance(recipe, dict):
        return {k: recipe_to_dict(v) for k, v in recipe.items()}
    if isinstance(recipe, (list, tuple)):
        return [recipe_to_dict(v) for v in recipe]
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


def data_root(cfg: DataConfig) -> Path:
    """The directory relative corpus paths are resolved against."""
    import os

    root = cfg.root or os.environ.get("SEQ2SEQ_DATA") or "data"
    return Path(os.path.expandvars(os.path.expanduser(root)))
