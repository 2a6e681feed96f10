"""Recipes: YAML files typed once, at the edge, into frozen dataclasses.

A recipe has the top-level keys ``name``, ``output_dir`` and ``seed`` and one section per
concern (``data``, ``tokenizer``, ``model``, ``train``, ``decode``, ``eval``, ``distributed``).

- :mod:`seq2seq.config.schema`: the dataclasses; every field's default and one-line description.
- :mod:`seq2seq.config.checks`: range and cross-field rules, one function per section.
- :mod:`seq2seq.config.loading`: ``load_recipe(path, overrides)`` applies dotted
  ``section.key=value`` overrides, checks every key and type, and raises one
  :class:`RecipeError` listing *all* problems, each by dotted path.
- :mod:`seq2seq.config.reference`: the README's table of every recipe key.
"""

from seq2seq.config.checks import min_len_warnings
from seq2seq.config.errors import RecipeError
from seq2seq.config.loading import (
    apply_override,
    data_root,
    load_recipe,
    parse_override,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_yaml,
)
from seq2seq.config.reference import recipe_reference
from seq2seq.config.schema import (
    DECODE_RANGES,
    SECTIONS,
    Corpus,
    DataConfig,
    DecodeConfig,
    DistributedConfig,
    EvalConfig,
    ModelConfig,
    Recipe,
    TokenizerConfig,
    TrainConfig,
    option,
)

__all__ = [
    "DECODE_RANGES",
    "SECTIONS",
    "Corpus",
    "DataConfig",
    "DecodeConfig",
    "DistributedConfig",
    "EvalConfig",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "TokenizerConfig",
    "TrainConfig",
    "apply_override",
    "data_root",
    "load_recipe",
    "min_len_warnings",
    "option",
    "parse_override",
    "recipe_from_dict",
    "recipe_reference",
    "recipe_to_dict",
    "recipe_to_yaml",
]
