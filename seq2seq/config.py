"""Recipes: YAML files typed once, at the edge, into frozen dataclasses.

A recipe has the top-level keys ``name``, ``output_dir`` and ``seed`` and one section per
concern (``data``, ``tokenizer``, ``model``, ``train``, ``decode``, ``eval``, ``distributed``).
Every field has its default and a one-line description here and nowhere else.

``load_recipe(path, overrides)`` applies dotted ``section.key=value`` overrides, checks every
key and type, and raises one :class:`RecipeError` listing *all* problems, each by dotted path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class RecipeError(Exception):
    """One or more problems with a recipe; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and its one-line description."""
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check(problems: list[str], ok: bool, path: str, message: str) -> None:
    if not ok:
        problems.append(f"{path}: {message}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """One parallel corpus: where its sentence pairs come from."""

    format: Literal["text", "tsv", "jsonl", "hf", "generated"] = option(
        "text", "text: two line-aligned files; tsv; jsonl; hf: a Hugging Face dataset; "
        "generated: the built-in synthetic task")
    src: Optional[str] = option(None, "text: source file (.gz allowed), relative to data.root")
    trg: Optional[str] = option(None, "text: target file (.gz allowed), relative to data.root")
    path: Optional[str] = option(
        None, "tsv/jsonl: the file; hf: a save_to_disk directory (relative to data.root)")
    hf_name: Optional[str] = option(None, "hf: a hub dataset name, used when path is not set")
    hf_config: Optional[str] = option(None, "hf: the hub dataset's configuration name")
    split: str = option("train", "hf: which split; generated: train, valid or test")
    src_field: Optional[str] = option(
        None, "jsonl/hf: source field (default: data.src_lang, or translation.<src_lang> in hf)")
    trg_field: Optional[str] = option(
        None, "jsonl/hf: target field (default: data.trg_lang, or translation.<trg_lang> in hf)")
    size: int = option(0, "generated: number of pairs")
    seed: int = option(
        0, "generated: seed of the sentence stream; the corpus, unlike the run's seed, stays "
        "the same when the run's seed changes")


@dataclass(frozen=True)
class DataConfig:
    """Corpora, languages and the length filters applied to training data."""

    root: Optional[str] = option(
        None, "data root for relative corpus paths (default: $SEQ2SEQ_DATA, else ./data)")
    src_lang: str = option("src", "source language code")
    trg_lang: str = option("trg", "target language code")
    train: Corpus = option(Corpus(), "training corpus")
    valid: Corpus = option(Corpus(), "validation corpus (never filtered)")
    test: dict[str, Corpus] = option({}, "named test corpora (never filtered)")
    max_src_tokens: int = option(100, "drop training pairs whose source has more subword tokens")
    max_trg_tokens: int = option(100, "drop training pairs whose target has more subword tokens")
    max_length_ratio: float = option(
        0.0, "drop training pairs whose token length ratio exceeds this (0: no ratio filter)")
    num_proc: int = option(2, "worker processes for encoding the corpus")
    cache_dir: Optional[str] = option(
        None, "where the encoded Arrow cache lives (default: <output_dir>/cache)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.max_src_tokens >= 1, "data.max_src_tokens", "must be >= 1")
        _check(problems, self.max_trg_tokens >= 1, "data.max_trg_tokens", "must be >= 1")
        _check(problems, self.max_length_ratio >= 0, "data.max_length_ratio", "must be >= 0")
        _check(problems, self.num_proc >= 1, "data.num_proc", "must be >= 1")
        _check(problems, self.src_lang != self.trg_lang, "data.trg_lang",
               "must differ from data.src_lang")
        if problems:
            raise RecipeError(problems)


@dataclass(frozen=True)
class TokenizerConfig:
    """SentencePiece model(s), trained from the training corpus."""

    type: Literal["unigram", "bpe"] = option("unigram", "SentencePiece model type")
    joint: bool = option(True, "one model shared by source and target")
    vocab_size: int = option(8000, "vocabulary size of each model")
    character_coverage: float = option(1.0, "share of characters covered by the vocabulary")
    input_sentence_size: int = option(
        500_000, "sentences sampled from the corpus to train the model (0: all)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.vocab_size >= 8, "tokenizer.vocab_size", "must be >= 8")
        _check(problems, 0.9 <= self.character_coverage <= 1.0,
               "tokenizer.character_coverage", "must be in [0.9, 1.0]")
        _check(problems, self.input_sentence_size >= 0, "tokenizer.input_sentence_size",
               "must be >= 0")
        if problems:
            raise RecipeError(problems)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder-decoder architecture."""

    cell: Literal["gru", "lstm", "rnn"] = option("gru", "recurrent cell of encoder and decoder")
    emb_size: int = option(256, "embedding size (source and target)")
    enc_hidden: int = option(256, "encoder hidden size per direction")
    enc_layers: int = option(2, "encoder layers")
    bidirectional: bool = option(True, "bidirectional encoder")
    dec_hidden: int = option(512, "decoder hidden size")
    dec_layers: int = option(2, "decoder layers")
    attention: Literal["bahdanau", "dot", "general"] = option(
        "bahdanau", "bahdanau: additive MLP; dot / general: Luong et al. 2015 §3.1")
    attention_size: int = option(512, "hidden size of the additive attention MLP")
    decoder: Literal["bahdanau", "luong"] = option(
        "bahdanau", "bahdanau: attend with the previous state, context into the RNN; "
        "luong: attend after the RNN step, attentional hidden state")
    input_feeding: bool = option(
        True, "feed the previous attentional vector into the decoder RNN (luong style)")
    init: Literal["bridge", "zeros"] = option(
        "bridge", "decoder initial state: learned bridge from the encoder, or zeros")
    dropout: float = option(0.3, "dropout on embeddings, between layers and before the output")
    forget_bias: Optional[float] = option(
        None, "LSTM only: initial forget-gate bias, e.g. 1.0 (null: like every other weight)")
    tie_embeddings: Literal["none", "decoder", "all"] = option(
        "none", "decoder: tie target embeddings and output layer; all: also the source "
        "embeddings (needs a joint vocabulary)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("emb_size", "enc_hidden", "enc_layers", "dec_hidden", "dec_layers",
                     "attention_size"):
            _check(problems, getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        _check(problems, 0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(problems, self.forget_bias is None or self.cell == "lstm", "model.forget_bias",
               f"is an LSTM-only option, but model.cell is {self.cell!r}")
        if self.attention == "dot":
            enc_out = self.enc_hidden * (2 if self.bidirectional else 1)
            _check(problems, enc_out == self.dec_hidden, "model.attention",
                   f"dot attention needs dec_hidden ({self.dec_hidden}) equal to the encoder "
                   f"output size ({enc_out}); use general")
        if self.tie_embeddings != "none":
            # The output layer reads the attentional vector of size dec_hidden.
            _check(problems, self.emb_size == self.dec_hidden, "model.tie_embeddings",
                   f"tied embeddings need emb_size ({self.emb_size}) == dec_hidden "
                   f"({self.dec_hidden})")
        if problems:
            raise RecipeError(problems)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, batching, validation and checkpointing."""

    batch_tokens: int = option(
        4096, "target tokens per batch on one rank for one accumulation step")
    batch_sentences: int = option(0, "also cap sentences per batch (0: no cap)")
    accumulate: int = option(1, "batches accumulated per update on each rank")
    optimizer: Literal["adam", "adamw"] = option("adam", "optimizer")
    lr: float = option(1e-3, "peak learning rate")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam betas")
    weight_decay: float = option(0.0, "weight decay")
    schedule: Literal["constant", "plateau", "inverse_sqrt"] = option(
        "constant", "learning-rate schedule")
    warmup_steps: int = option(0, "linear warmup steps (inverse_sqrt; also before constant)")
    plateau_factor: float = option(0.5, "plateau: multiply the lr by this when stuck")
    plateau_patience: int = option(2, "plateau: validations without improvement before decay")
    min_lr: float = option(1e-6, "lower bound of the learning rate")
    clip_norm: float = option(1.0, "gradient-norm clipping (0: off)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "bf16: autocast (GPU); fp16: autocast with a grad scaler (GPU); RNN module "
        "calls (cuDNN) stay fp32 in both, as autocast would make them fp16")
    max_steps: int = option(0, "stop after this many updates (0: no limit)")
    max_epochs: int = option(10, "stop after this many epochs (0: no limit)")
    valid_every: int = option(1000, "validate every N updates (and at the end)")
    valid_search: Literal["greedy", "beam"] = option(
        "greedy", "decoding used for validation BLEU (beam uses the decode section)")
    log_every: int = option(100, "log training loss every N updates")
    early_stop_metric: Literal["bleu", "loss", "ppl"] = option(
        "bleu", "validation metric for best.pt, early stopping and the plateau schedule")
    patience: int = option(0, "stop after N validations without improvement (0: never)")
    keep_last: int = option(3, "keep the last K step checkpoints besides last.pt and best.pt")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: cuda when available")
    threads: int = option(0, "CPU threads for torch (0: torch's default)")
    max_bad_steps: int = option(
        5, "stop when this many updates in a row have a non-finite loss or gradient")
    tensorboard: bool = option(False, "also log to TensorBoard in <output_dir>/tensorboard")
    cuda_graphs: bool = option(
        False, "GPU: pad batches to bucket shapes and replay each training step as a CUDA "
        "graph (fp32/bf16)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, not (self.cuda_graphs and self.precision == "fp16"), "train.cuda_graphs",
               "needs train.precision fp32 or bf16 (fp16's grad scaler works on the host)")
        for name in ("batch_tokens", "accumulate", "valid_every", "log_every",
                     "max_bad_steps"):
            _check(problems, getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        for name in ("batch_sentences", "warmup_steps", "max_steps", "max_epochs",
                     "patience", "keep_last", "threads", "plateau_patience"):
            _check(problems, getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        _check(problems, self.lr > 0, "train.lr", "must be > 0")
        _check(problems, 0 < self.plateau_factor < 1, "train.plateau_factor", "must be in (0, 1)")
        _check(problems, all(0 <= b < 1 for b in self.betas), "train.betas",
               "each must be in [0, 1)")
        _check(problems, self.clip_norm >= 0, "train.clip_norm", "must be >= 0")
        _check(problems, 0 <= self.label_smoothing < 1, "train.label_smoothing",
               "must be in [0, 1)")
        _check(problems, self.max_steps > 0 or self.max_epochs > 0, "train.max_steps",
               "train.max_steps and train.max_epochs cannot both be 0 (the run would not stop)")
        if problems:
            raise RecipeError(problems)


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings shared by validation, translate and evaluate (their flags override)."""

    beam_size: int = option(5, "beam size (1: greedy)")
    n_best: int = option(1, "hypotheses returned per sentence")
    alpha: float = option(0.6, "GNMT length penalty alpha, Wu et al. 2016 §7 (0: none)")
    max_len_ratio: float = option(
        1.5, "maximum output length = ratio * source length + max_len_add")
    max_len_add: int = option(10, "constant added to the maximum output length")
    min_len: int = option(0, "minimum output length in tokens (EOS forbidden before)")
    no_repeat_ngram: int = option(0, "forbid repeating any n-gram of this size (0: off)")
    batch_tokens: int = option(4000, "source tokens per decoding batch")
    cuda_graphs: bool = option(
        False, "GPU beam search on fixed shapes, replayed as CUDA graphs (same results; not "
        "with attention output or no_repeat_ngram, which use the plain search)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.beam_size >= 1, "decode.beam_size", "must be >= 1")
        if self.beam_size >= 1:  # else n_best has no valid value to name
            _check(problems, 1 <= self.n_best <= self.beam_size, "decode.n_best",
                   f"must be between 1 and decode.beam_size ({self.beam_size}); "
                   f"got {self.n_best}")
        _check(problems, self.alpha >= 0, "decode.alpha", "must be >= 0")
        _check(problems, self.max_len_ratio > 0, "decode.max_len_ratio", "must be > 0")
        _check(problems, self.max_len_add >= 0, "decode.max_len_add", "must be >= 0")
        _check(problems, self.min_len >= 0, "decode.min_len", "must be >= 0")
        _check(problems, self.no_repeat_ngram >= 0, "decode.no_repeat_ngram", "must be >= 0")
        _check(problems, self.batch_tokens >= 1, "decode.batch_tokens", "must be >= 1")
        if problems:
            raise RecipeError(problems)


@dataclass(frozen=True)
class EvalConfig:
    """Scoring and reports of ``seq2seq evaluate``."""

    checkpoint: Literal["best", "last"] = option("best", "which checkpoint of the run to evaluate")
    lowercase: bool = option(False, "case-insensitive BLEU and chrF")
    tokenize: Literal["13a", "intl", "zh", "ja-mecab", "char", "none"] = option(
        "13a", "sacreBLEU tokenizer for BLEU")
    bootstrap: int = option(1000, "bootstrap resamples for 95% confidence intervals (0: off)")
    report_dir: Optional[str] = option(
        None, "report directory of the recipe's test sets (default: <output_dir>/eval; "
        "--quantize adds -int8)")
    attention_plots: int = option(3, "attention heatmaps drawn per test set")

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.bootstrap >= 0, "eval.bootstrap", "must be >= 0")
        _check(problems, self.attention_plots >= 0, "eval.attention_plots", "must be >= 0")
        if problems:
            raise RecipeError(problems)


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process training through torchrun (PyTorch's elastic launcher)."""

    nproc_per_node: int = option(1, "worker processes per node (GPUs per node)")
    nnodes: int = option(1, "number of nodes")
    node_rank: int = option(0, "this node's rank (static rendezvous)")
    rdzv_endpoint: str = option("127.0.0.1:29500", "host:port of the rendezvous")
    rdzv_id: str = option("seq2seq", "rendezvous id shared by all nodes of one job")
    backend: Literal["auto", "nccl", "gloo"] = option("auto", "auto: nccl on GPU, gloo on CPU")
    max_restarts: int = option(0, "restarts of the worker group after a failure")
    timeout_s: int = option(300, "collective timeout in seconds")

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.nproc_per_node >= 1, "distributed.nproc_per_node", "must be >= 1")
        _check(problems, self.nnodes >= 1, "distributed.nnodes", "must be >= 1")
        _check(problems, 0 <= self.node_rank < self.nnodes, "distributed.node_rank",
               f"must be in [0, nnodes) = [0, {self.nnodes})")
        _check(problems, self.max_restarts >= 0, "distributed.max_restarts", "must be >= 0")
        _check(problems, self.timeout_s >= 1, "distributed.timeout_s", "must be >= 1")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        _check(problems, bool(host) and port.isdigit(), "distributed.rdzv_endpoint",
               f"expected host:port, got {self.rdzv_endpoint!r}")
        if problems:
            raise RecipeError(problems)


@dataclass(frozen=True)
class Recipe:
    """A whole recipe."""

    name: str = option("seq2seq", "run name")
    output_dir: str = option("runs/seq2seq", "run directory: checkpoints, logs, tokenizer, cache")
    seed: int = option(1, "random seed of initialisation, dropout and batch order")
    data: DataConfig = option(DataConfig(), "corpora")
    tokenizer: TokenizerConfig = option(TokenizerConfig(), "SentencePiece")
    model: ModelConfig = option(ModelConfig(), "architecture")
    train: TrainConfig = option(TrainConfig(), "training")
    decode: DecodeConfig = option(DecodeConfig(), "search")
    eval: EvalConfig = option(EvalConfig(), "evaluation")
    distributed: DistributedConfig = option(DistributedConfig(), "multi-process training")

    def __post_init__(self) -> None:
        problems: list[str] = []
        # An empty value (say, from an unset shell variable) would write the run into ".".
        _check(problems, self.output_dir.strip() != "", "output_dir", "must not be empty")
        if self.model.tie_embeddings == "all":
            _check(problems, self.tokenizer.joint, "model.tie_embeddings",
                   "'all' needs a joint vocabulary (tokenizer.joint: true)")
        if problems:
            raise RecipeError(problems)


SECTIONS = ("data", "tokenizer", "model", "train", "decode", "eval", "distributed")

# --------------------------------------------------------------------------------------------
# Loading: YAML tree + overrides -> typed, checked dataclasses
# --------------------------------------------------------------------------------------------


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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError([f"{text}: overrides are written key.path=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
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


def recipe_from_dict(tree: Any, overrides: list[str] = (), source: str = "recipe") -> Recipe:
    """Build a checked :class:`Recipe` from a parsed YAML tree plus dotted overrides."""
    problems: list[str] = []
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError([f"{source}: expected a mapping at the top level, got {_show(tree)}"])
    tree = _deepcopy(tree)
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except RecipeError as error:
            problems.extend(error.problems)
            continue
        apply_override(tree, parts, value)
    recipe = _build(Recipe, tree, "", problems)
    if problems or recipe is _INVALID:
        raise RecipeError([f"{source}: {p}" for p in problems])
    return recipe


def _deepcopy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deepcopy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deepcopy(v) for v in tree]
    return tree


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe file and apply overrides; raise :class:`RecipeError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{path}: no such recipe file"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: is a directory, not a recipe file"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError([f"{path}: cannot read recipe ({error})"]) from None
    try:
        tree = yaml.safe_load(text)
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


def recipe_reference() -> str:
    """Markdown tables of every recipe key, its default and description (for the README)."""
    lines: list[str] = []

    def table(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        lines.append("| key | type | default | description |")
        lines.append("|---|---|---|---|")
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if tp is Corpus:
                lines.append(f"| `{prefix}{f.name}` | a corpus (below) | | {f.metadata['help']} |")
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
            lines.append(f"| `{prefix}{f.name}` | {kind} | {shown} | {f.metadata['help']} |")
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


def data_root(cfg: DataConfig) -> Path:
    """The directory relative corpus paths are resolved against."""
    import os

    if cfg.root:
        return Path(os.path.expandvars(os.path.expanduser(cfg.root)))
    return Path(os.environ.get("SEQ2SEQ_DATA") or "data")
