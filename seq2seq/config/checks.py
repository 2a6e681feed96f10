"""Range and cross-field rules of the recipe sections, one function per section.

Each ``check_<section>`` runs from that section's ``__post_init__``, collects every problem in
order and raises one :class:`RecipeError` naming each by its dotted path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from seq2seq.config.errors import RecipeError

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


def check_data(data: DataConfig) -> None:
    problems: list[str] = []
    _check(problems, data.max_src_tokens >= 1, "data.max_src_tokens", "must be >= 1")
    _check(problems, data.max_trg_tokens >= 1, "data.max_trg_tokens", "must be >= 1")
    _check(problems, data.max_length_ratio >= 0, "data.max_length_ratio", "must be >= 0")
    _check(problems, data.num_proc >= 1, "data.num_proc", "must be >= 1")
    _check(problems, data.src_lang != data.trg_lang, "data.trg_lang",
           "must differ from data.src_lang")
    _raise_any(problems)


def check_tokenizer(tokenizer: TokenizerConfig) -> None:
    problems: list[str] = []
    _check(problems, tokenizer.vocab_size >= 8, "tokenizer.vocab_size", "must be >= 8")
    _check(problems, 0.9 <= tokenizer.character_coverage <= 1.0,
           "tokenizer.character_coverage", "must be in [0.9, 1.0]")
    _check(problems, tokenizer.input_sentence_size >= 0, "tokenizer.input_sentence_size",
           "must be >= 0")
    _raise_any(problems)


def check_model(model: ModelConfig) -> None:
    problems: list[str] = []
    for name in ("emb_size", "enc_hidden", "enc_layers", "dec_hidden", "dec_layers",
                 "attention_size"):
        _check(problems, getattr(model, name) >= 1, f"model.{name}", "must be >= 1")
    _check(problems, 0.0 <= model.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(problems, model.forget_bias is None or model.cell == "lstm", "model.forget_bias",
           f"is an LSTM-only option, but model.cell is {model.cell!r}")
    if model.attention == "dot":
        enc_out = model.enc_hidden * (2 if model.bidirectional else 1)
        _check(problems, enc_out == model.dec_hidden, "model.attention",
               f"dot attention needs dec_hidden ({model.dec_hidden}) equal to the encoder "
               f"output size ({enc_out}); use general")
    if model.tie_embeddings != "none":
        # The output layer reads the attentional vector of size dec_hidden.
        _check(problems, model.emb_size == model.dec_hidden, "model.tie_embeddings",
               f"tied embeddings need emb_size ({model.emb_size}) == dec_hidden "
               f"({model.dec_hidden})")
    _raise_any(problems)


def check_train(train: TrainConfig) -> None:
    problems: list[str] = []
    _check(problems, not (train.cuda_graphs and train.precision == "fp16"), "train.cuda_graphs",
           "needs train.precision fp32 or bf16 (fp16's grad scaler works on the host)")
    for name in ("batch_tokens", "accumulate", "valid_every", "log_every",
                 "max_bad_steps"):
        _check(problems, getattr(train, name) >= 1, f"train.{name}", "must be >= 1")
    for name in ("batch_sentences", "warmup_steps", "max_steps", "max_epochs",
                 "patience", "keep_last", "threads", "plateau_patience"):
        _check(problems, getattr(train, name) >= 0, f"train.{name}", "must be >= 0")
    _check(problems, train.lr > 0, "train.lr", "must be > 0")
    _check(problems, 0 < train.plateau_factor < 1, "train.plateau_factor", "must be in (0, 1)")
    _check(problems, all(0 <= b < 1 for b in train.betas), "train.betas",
           "each must be in [0, 1)")
    _check(problems, train.clip_norm >= 0, "train.clip_norm", "must be >= 0")
    _check(problems, 0 <= train.label_smoothing < 1, "train.label_smoothing",
           "must be in [0, 1)")
    _check(problems, train.max_steps > 0 or train.max_epochs > 0, "train.max_steps",
           "train.max_steps and train.max_epochs cannot both be 0 (the run would not stop)")
    _raise_any(problems)


def check_decode(decode: DecodeConfig) -> None:
    problems: list[str] = []
    _check(problems, decode.beam_size >= 1, "decode.beam_size", "must be >= 1")
    if decode.beam_size >= 1:  # else n_best has no valid value to name
        _check(problems, 1 <= decode.n_best <= decode.beam_size, "decode.n_best",
               f"must be between 1 and decode.beam_size ({decode.beam_size}); "
               f"got {decode.n_best}")
    _check(problems, decode.alpha >= 0, "decode.alpha", "must be >= 0")
    _check(problems, decode.max_len_ratio > 0, "decode.max_len_ratio", "must be > 0")
    _check(problems, decode.max_len_add >= 0, "decode.max_len_add", "must be >= 0")
    _check(problems, decode.min_len >= 0, "decode.min_len", "must be >= 0")
    _check(problems, decode.no_repeat_ngram >= 0, "decode.no_repeat_ngram", "must be >= 0")
    _check(problems, decode.batch_tokens >= 1, "decode.batch_tokens", "must be >= 1")
    _raise_any(problems)


def check_eval(eval_cfg: EvalConfig) -> None:
    problems: list[str] = []
    _check(problems, eval_cfg.bootstrap >= 0, "eval.bootstrap", "must be >= 0")
    _check(problems, eval_cfg.attention_plots >= 0, "eval.attention_plots", "must be >= 0")
    _raise_any(problems)


def check_distributed(dist: DistributedConfig) -> None:
    problems: list[str] = []
    _check(problems, dist.nproc_per_node >= 1, "distributed.nproc_per_node", "must be >= 1")
    _check(problems, dist.nnodes >= 1, "distributed.nnodes", "must be >= 1")
    _check(problems, 0 <= dist.node_rank < dist.nnodes, "distributed.node_rank",
           f"must be in [0, nnodes) = [0, {dist.nnodes})")
    _check(problems, dist.max_restarts >= 0, "distributed.max_restarts", "must be >= 0")
    _check(problems, dist.timeout_s >= 1, "distributed.timeout_s", "must be >= 1")
    host, _, port = dist.rdzv_endpoint.rpartition(":")
    _check(problems, bool(host) and port.isdigit(), "distributed.rdzv_endpoint",
           f"expected host:port, got {dist.rdzv_endpoint!r}")
    _raise_any(problems)


def check_recipe(recipe: Recipe) -> None:
    """Rules across sections; each section has already passed its own check."""
    problems: list[str] = []
    # An empty value (say, from an unset shell variable) would write the run into ".".
    _check(problems, recipe.output_dir.strip() != "", "output_dir", "must not be empty")
    if recipe.model.tie_embeddings == "all":
        _check(problems, recipe.tokenizer.joint, "model.tie_embeddings",
               "'all' needs a joint vocabulary (tokenizer.joint: true)")
    _raise_any(problems)
