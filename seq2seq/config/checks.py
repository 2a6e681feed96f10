"""Range and cross-field rules of the recipe sections, one function per section.

Each ``check_<section>`` runs from that section's ``__post_init__``, collects every problem in
order and raises one :class:`RecipeError` naming each by its dotted path.

:func:`recipe_warnings` finds what a valid recipe asks for that its run will not do (a warm-up
longer than the run, more threads than CPUs, a minimum output length above the maximum): those
are said, not refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from seq2seq.config.errors import RecipeError
from seq2seq.cpuinfo import threads_problem

if TYPE_CHECKING:  # the schema calls these checks; importing it here would close a circle
    from seq2seq.config.schema import (
        DataConfig,
        DecodeConfig,
        DistributedConfig,
        EvalConfig,
        ModelConfig,
        Recipe,
        TokenizerConfig,
        TrainConfig,
    )


def _check(problems: list[str], ok: bool, path: str, message: str) -> None:
    if not ok:
        problems.append(f"{path}: {message}")


def _raise_any(problems: list[str]) -> None:
    if problems:
        raise RecipeError(problems)


def range_problems(section: Any, prefix: str) -> list[str]:
    """Every field of ``section`` outside the range its schema declares (wrong types included,
    for sections built from Python rather than from YAML); ``None`` passes where it is allowed.
    """
    problems = []
    for f in dataclasses.fields(section):
        bounds = f.metadata.get("range")
        value = getattr(section, f.name)
        if bounds is None or value is None:
            continue
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for index, item in items:
            problem = bounds.problem(item)
            where = f"{prefix}{f.name}" + ("" if index is None else f"[{index}]")
            if problem:
                problems.append(f"{where}: {problem}")
    return problems


def _in_range(problems: list[str], section: Any, prefix: str) -> Callable[..., bool]:
    """Add the range problems of ``section``; return a test of whether the fields it names all
    passed (a cross-field rule compares values, which is safe only then; the rules of the
    fields that passed still run, so every problem is said at once)."""
    found = range_problems(section, prefix)
    problems.extend(found)
    bad = {problem.split(":")[0].split("[")[0].removeprefix(prefix) for problem in found}
    return lambda *names: bad.isdisjoint(names)


def check_data(data: DataConfig) -> None:
    problems: list[str] = []
    valid = _in_range(problems, data, "data.")
    corpora = [("data.train.", data.train), ("data.valid.", data.valid)]
    corpora += [(f"data.test.{name}.", corpus) for name, corpus in data.test.items()]
    for prefix, corpus in corpora:
        _in_range(problems, corpus, prefix)
    # A ratio below 1 would drop every pair: the longer side is always >= 1 x the shorter.
    if valid("max_length_ratio"):
        _check(problems, not 0 < data.max_length_ratio < 1, "data.max_length_ratio",
               f"must be 0 (no ratio filter) or at least 1, got {data.max_length_ratio}")
    for key in ("src_lang", "trg_lang"):
        code = getattr(data, key)
        _check(problems, bool(re.fullmatch(r"\S+", code)), f"data.{key}",
               f"must be a language code such as de or pt-BR (no spaces), got {code!r}")
    _check(problems, data.src_lang.lower() != data.trg_lang.lower(), "data.trg_lang",
           "must differ from data.src_lang")
    _raise_any(problems)


def check_tokenizer(tokenizer: TokenizerConfig) -> None:
    problems: list[str] = []
    valid = _in_range(problems, tokenizer, "tokenizer.")
    if valid("input_sentence_size"):  # (SentencePiece's own bound)
        _check(problems, tokenizer.input_sentence_size == 0
               or tokenizer.input_sentence_size > 100, "tokenizer.input_sentence_size",
               f"must be 0 (all) or more than 100, got {tokenizer.input_sentence_size}")
    _raise_any(problems)


def check_model(model: ModelConfig) -> None:
    problems: list[str] = []
    valid = _in_range(problems, model, "model.")
    _check(problems, model.forget_bias is None or model.cell == "lstm", "model.forget_bias",
           f"is an LSTM-only option, but model.cell is {model.cell!r}")
    if model.attention == "dot" and valid("enc_hidden", "dec_hidden"):
        enc_out = model.enc_hidden * (2 if model.bidirectional else 1)
        _check(problems, enc_out == model.dec_hidden, "model.attention",
               f"dot attention needs dec_hidden ({model.dec_hidden}) equal to the encoder "
               f"output size ({enc_out}); use general")
    if model.tie_embeddings != "none" and valid("emb_size", "dec_hidden"):
        # The output layer reads the attentional vector of size dec_hidden.
        _check(problems, model.emb_size == model.dec_hidden, "model.tie_embeddings",
               f"tied embeddings need emb_size ({model.emb_size}) == dec_hidden "
               f"({model.dec_hidden})")
    _raise_any(problems)


def check_train(train: TrainConfig) -> None:
    problems: list[str] = []
    valid = _in_range(problems, train, "train.")
    _check(problems, not (train.cuda_graphs and train.precision == "fp16"), "train.cuda_graphs",
           "needs train.precision fp32 or bf16 (fp16's grad scaler works on the host)")
    if valid("min_lr", "lr"):
        # The schedule floors the rate at min_lr: above lr, it would silently replace it.
        _check(problems, train.min_lr <= train.lr, "train.min_lr",
               f"must not exceed train.lr ({train.lr}), got {train.min_lr}")
    if valid("sample_nbest"):
        _check(problems, train.sample_nbest not in (0, 1), "train.sample_nbest",
               f"must be -1 (all) or at least 2 (1 would sample nothing), got "
               f"{train.sample_nbest}")
    if valid("average_last", "keep_last"):
        _check(problems, train.average_last <= train.keep_last, "train.average_last",
               f"averages step checkpoints, so it needs train.keep_last >= "
               f"{train.average_last}; got keep_last {train.keep_last}")
    if valid("warmup_steps"):  # lr * sqrt(warmup / step) after warm-up: none, no decay
        _check(problems, train.schedule != "inverse_sqrt" or train.warmup_steps > 0,
               "train.warmup_steps", "must be at least 1 with train.schedule inverse_sqrt (the "
               "rate falls as sqrt(warmup_steps / step) after warm-up; with 0 it would not fall)")
    if valid("max_steps", "max_epochs"):
        _check(problems, train.max_steps > 0 or train.max_epochs > 0, "train.max_steps",
               "train.max_steps and train.max_epochs cannot both be 0 (the run would not stop)")
    _raise_any(problems)


def check_decode(decode: DecodeConfig) -> None:
    problems: list[str] = []
    if _in_range(problems, decode, "decode.")("n_best", "beam_size"):
        _check(problems, decode.n_best <= decode.beam_size, "decode.n_best",
               f"must be between 1 and decode.beam_size ({decode.beam_size}); "
               f"got {decode.n_best}")
    _raise_any(problems)


def check_eval(eval_cfg: EvalConfig) -> None:
    problems: list[str] = []
    valid = _in_range(problems, eval_cfg, "eval.")
    if valid("bootstrap"):  # (one resample has no spread: the intervals vanished silently)
        _check(problems, eval_cfg.bootstrap != 1, "eval.bootstrap",
               "must be 0 (off) or at least 2, got 1")
    _raise_any(problems)


def check_distributed(dist: DistributedConfig) -> None:
    problems: list[str] = []
    if _in_range(problems, dist, "distributed.")("node_rank", "nnodes"):
        _check(problems, dist.node_rank < dist.nnodes, "distributed.node_rank",
               f"must be below distributed.nnodes ({dist.nnodes}), got {dist.node_rank}")
    host, _, port = dist.rdzv_endpoint.rpartition(":")
    _check(problems, bool(host) and port.isdigit() and 1 <= int(port) <= 65_535,
           "distributed.rdzv_endpoint", f"expected host:port (port 1 to 65535), got "
           f"{dist.rdzv_endpoint!r}")
    _raise_any(problems)


def check_recipe(recipe: Recipe) -> None:
    """Rules across sections; each section has already passed its own check."""
    problems: list[str] = []
    _in_range(problems, recipe, "")
    # An empty value (say, from an unset shell variable) would write the run into ".".
    _check(problems, recipe.output_dir.strip() != "", "output_dir", "must not be empty")
    if recipe.model.tie_embeddings == "all":
        _check(problems, recipe.tokenizer.joint, "model.tie_embeddings",
               "'all' needs a joint vocabulary (tokenizer.joint: true)")
    if recipe.train.rdrop_alpha > 0:
        # The two passes differ only by their dropout masks: without dropout the KL term is 0.
        _check(problems, recipe.model.dropout > 0 or recipe.model.word_dropout > 0,
               "train.rdrop_alpha", "R-Drop compares two passes that differ only in their "
               "dropout masks, and model.dropout and model.word_dropout are 0: it would double "
               "the cost of each update for nothing; set a dropout, or train.rdrop_alpha: 0")
    _raise_any(problems)


def recipe_warnings(recipe: Recipe, cpus: int | None = None) -> list[str]:
    """What ``recipe`` asks for that its run will not do, each ``key: why`` on one line
    (``train`` says them as it starts: :func:`seq2seq.training.step.say_recipe_warnings`).

    Args:
        cpus: the CPUs this process may use (default: :func:`seq2seq.cpuinfo.usable_cpus`,
            this machine's).
    """
    train, processes = recipe.train, recipe.distributed.nproc_per_node
    found = []
    if train.max_steps:
        found += warmup_warnings(train, train.max_steps, f"train.max_steps ({train.max_steps})")
    threads = threads_problem("train.threads", train.threads, processes,
                              "processes (distributed.nproc_per_node)", "training", cpus)
    return found + ([threads] if threads else []) + min_len_warnings(recipe.decode)


def warmup_warnings(train: TrainConfig, updates: int, length: str) -> list[str]:
    """The warning for a warm-up (``train.warmup_steps``) not shorter than a run of
    ``updates`` updates, whose count ``length`` explains; [] when it is shorter.

    The rate of update ``step`` is ``lr * step / warmup_steps`` during the warm-up (lowered
    further by a linear or plateau schedule), never below min_lr
    (:class:`seq2seq.training.optim.Schedule`): it never gets past its last update's ramp.
    """
    if not 0 < updates <= train.warmup_steps:
        return []
    share = f"{updates}/{train.warmup_steps}"
    ramp = train.lr * updates / train.warmup_steps
    peak = (f"{ramp:.3g} (train.lr {train.lr:g} x {share})" if ramp >= train.min_lr
            else f"train.min_lr ({train.min_lr:g}, above train.lr x {share})")
    return [f"train.warmup_steps: {train.warmup_steps} is not below {length}: the whole run is "
            f"warm-up, in which the learning rate climbs to no more than {peak}"]


def _max_output_length(decode: DecodeConfig, src_tokens: int) -> int:
    """The search's bound on the output of a source of ``src_tokens`` subwords (and its EOS),
    as :func:`seq2seq.search.common.max_output_lengths` computes it."""
    return max(1, math.floor(decode.max_len_ratio * (src_tokens + 1) + decode.max_len_add))


def min_len_warnings(decode: DecodeConfig, names: Mapping[str, str] | None = None
                     ) -> list[str]:
    """The warning for a ``decode.min_len`` above the maximum output length of short sources:
    EOS is forbidden throughout, and the search cuts their outputs at that maximum.

    Args:
        decode: the search settings (a recipe's, or a command's over a checkpoint's).
        names: how the caller spells a setting, by field (``{"max_len_ratio":
            "--max-len-ratio"}``); the others are named ``decode.<field>``.
    """
    def name(key: str) -> str:
        return (names or {}).get(key, f"decode.{key}")

    shortest = _max_output_length(decode, 1)
    if decode.min_len <= shortest:  # (equal: a one-token source's outputs are min_len long)
        return []
    # The bound grows with the source: solve ratio * (k + 1) + add < min_len for the longest
    # source k cut short, then step over the float rounding of the division.
    k = max(1, math.ceil((decode.min_len - decode.max_len_add) / decode.max_len_ratio) - 2)
    while _max_output_length(decode, k + 1) < decode.min_len:
        k += 1
    while k > 1 and _max_output_length(decode, k) >= decode.min_len:
        k -= 1
    return [f"{name('min_len')}: {decode.min_len} is above the maximum output length of "
            f"sources of up to {k:,} subword token{'s' if k > 1 else ''} ({shortest} for one: "
            f"{name('max_len_ratio')} {decode.max_len_ratio:g} x (source tokens + 1 for EOS) + "
            f"{name('max_len_add')} {decode.max_len_add}, rounded down): their outputs are cut "
            f"at that maximum, without EOS, shorter than min_len"]
