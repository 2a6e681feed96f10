"""Hugging Face ``datasets`` corpora (``format: hf``): a ``save_to_disk`` directory or a hub
dataset, read in Arrow record batches with the text rules of :mod:`seq2seq.data.corpus`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from seq2seq.config import Corpus, DataConfig
from seq2seq.data.fields import DataError, field_text, resolve_path


def read_hf(corpus: Corpus, data: DataConfig) -> Iterator[tuple[str, str]]:
    """The (source, target) pairs of an ``hf`` corpus (see :func:`.corpus.read_pairs`)."""
    dataset, name = _load_hf(corpus, data)
    columns = dataset.column_names
    src_col, src_key = _hf_column(corpus.src_field, data.src_lang, dataset, name)
    trg_col, trg_key = _hf_column(corpus.trg_field, data.trg_lang, dataset, name)
    dataset = dataset.select_columns(sorted({src_col, trg_col}))
    row = 0
    # Batched iteration reads Arrow record batches: constant memory, far faster than rows.
    for batch in dataset.iter(batch_size=1000):
        for src_value, trg_value in zip(batch[src_col], batch[trg_col]):
            row += 1
            where = f"{name}: row {row}"
            yield (_hf_sentence(src_value, src_key, src_col, where, columns),
                   _hf_sentence(trg_value, trg_key, trg_col, where, columns))


def _load_hf(corpus: Corpus, data: DataConfig) -> tuple[Any, str]:
    """The dataset split to read and a name for messages."""
    import datasets

    if corpus.path:
        path = resolve_path(corpus.path, data)
        if not path.is_dir():
            raise DataError(f"{path}: no such directory (an hf corpus path is a "
                            "save_to_disk directory)")
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as error:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({error})") from None
        name = str(path)
    elif corpus.hf_name:
        name = corpus.hf_name + (f"/{corpus.hf_config}" if corpus.hf_config else "")
        try:
            loaded = datasets.load_dataset(corpus.hf_name, corpus.hf_config, split=corpus.split)
        except Exception as error:  # noqa: BLE001 - the hub raises many types, all "cannot load"
            first_line = (str(error).splitlines() or [""])[0]
            raise DataError(f"hf dataset {name} (split {corpus.split!r}): cannot load "
                            f"({error.__class__.__name__}: {first_line})") from None
        return loaded, f"{name}[{corpus.split}]"
    else:
        raise DataError("an hf corpus needs 'path' (a save_to_disk directory) or 'hf_name'")
    if isinstance(loaded, datasets.DatasetDict):
        if corpus.split not in loaded:
            raise DataError(f"{name}: no split {corpus.split!r}; it has "
                            f"{', '.join(loaded)}")
        return loaded[corpus.split], f"{name}[{corpus.split}]"
    return loaded, name


def _hf_column(field: str | None, lang: str, dataset: Any, name: str) -> tuple[str, str | None]:
    """(column, key inside the column's dicts or None) holding the sentences of ``lang``."""
    columns = dataset.column_names
    if field:
        column, _, key = field.partition(".")
        if column in columns:
            return column, key or None
    elif lang in columns:
        return lang, None
    elif "translation" in columns and lang in _dict_keys(dataset.features["translation"]):
        return "translation", lang
    wanted = field or f"{lang!r} or translation.{lang}"
    raise DataError(f"{name}: no field {wanted}; its columns are {_describe(dataset)}")


def _dict_keys(feature: Any) -> list[str]:
    """Keys of a dict-valued feature: Translation languages or a dict of Values."""
    languages = getattr(feature, "languages", None)
    if languages is not None:
        return list(languages)
    return list(feature) if isinstance(feature, dict) else []


def _describe(dataset: Any) -> str:
    parts = []
    for column in dataset.column_names:
        keys = _dict_keys(dataset.features[column])
        parts.append(f"{column} ({', '.join(keys)})" if keys else column)
    return ", ".join(parts)


def _hf_sentence(value: Any, key: str | None, column: str, where: str, columns: list[str]
                 ) -> str:
    field = f"{column}.{key}" if key else column
    if key is not None:
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"{where}: missing field {field!r}")
        value = value[key]
    return field_text(value, where, field)
