"""The recipe schema: one frozen dataclass per section, each field with its default and help.

The range and cross-field rules live in :mod:`seq2seq.config.checks`; each ``__post_init__``
calls its section's check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from seq2seq.config.checks import (
    check_data,
    check_decode,
    check_distributed,
    check_eval,
    check_model,
    check_recipe,
    check_tokenizer,
    check_train,
)
from seq2seq.config.ranges import SEED_MAX, STEPS_MAX, Range, floats, ints


def option(default: Any, help: str, bounds: Range | None = None) -> Any:
    """A dataclass field with a default, its one-line description and, for a number, its range
    (checked by :mod:`seq2seq.config.checks`, shown in the README's reference)."""
    metadata = {"help": help, "range": bounds}
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


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
    size: int = option(0, "generated: number of pairs", ints(0, 10_000_000))
    seed: int = option(
        0, "generated: seed of the sentence stream; the corpus, unlike the run's seed, stays "
        "the same when the run's seed changes", ints(0, SEED_MAX))


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
    max_src_tokens: int = option(100, "drop training pairs whose source has more subword tokens",
                                 ints(1, 10_000))
    max_trg_tokens: int = option(100, "drop training pairs whose target has more subword tokens",
                                 ints(1, 10_000))
    max_length_ratio: float = option(
        0.0, "drop training pairs whose token length ratio exceeds this (0: no ratio filter; "
        "else at least 1)",
        floats(0, 1000))
    num_proc: int = option(2, "worker processes for encoding the corpus", ints(1, 256))
    cache_dir: Optional[str] = option(
        None, "where the encoded Arrow cache lives (default: <output_dir>/cache)")

    def __post_init__(self) -> None:
        check_data(self)


@dataclass(frozen=True)
class TokenizerConfig:
    """SentencePiece model(s), trained from the training corpus."""

    type: Literal["unigram", "bpe"] = option("unigram", "SentencePiece model type")
    joint: bool = option(True, "one model shared by source and target")
    vocab_size: int = option(8000, "vocabulary size of each model", ints(8, 1_000_000))
    character_coverage: float = option(1.0, "share of characters covered by the vocabulary",
                                       floats(0.98, 1.0))
    input_sentence_size: int = option(
        500_000, "sentences sampled from the corpus to train the model (0: all; else more "
        "than 100, SentencePiece's least)",
        ints(0, 100_000_000))
    byte_fallback: bool = option(
        False, "a character outside the vocabulary becomes its UTF-8 bytes (256 pieces of the "
        "vocabulary), which decode back to it, instead of the unknown piece (⁇ in output)")
    normalization: Literal["nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"] = option(
        "nmt_nfkc", "SentencePiece's normalization of the text: nmt_nfkc (NFKC: ² becomes 2, "
        "full-width letters ASCII, ﬁ fi; control characters removed), _cf also case-folds; "
        "identity keeps the text as written")

    def __post_init__(self) -> None:
        check_tokenizer(self)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder-decoder architecture."""

    cell: Literal["gru", "lstm", "rnn"] = option("gru", "recurrent cell of encoder and decoder")
    emb_size: int = option(256, "embedding size (source and target)", ints(1, 65_536))
    enc_hidden: int = option(256, "encoder hidden size per direction", ints(1, 65_536))
    enc_layers: int = option(2, "encoder layers", ints(1, 64))
    bidirectional: bool = option(True, "bidirectional encoder")
    dec_hidden: int = option(512, "decoder hidden size", ints(1, 65_536))
    dec_layers: int = option(2, "decoder layers", ints(1, 64))
    attention: Literal["bahdanau", "dot", "general"] = option(
        "bahdanau", "bahdanau: additive MLP; dot / general: Luong et al. 2015 §3.1")
    attention_size: int = option(512, "hidden size of the additive attention MLP", ints(1, 65_536))
    decoder: Literal["bahdanau", "luong"] = option(
        "bahdanau", "bahdanau: attend with the previous state, context into the RNN; "
        "luong: attend after the RNN step, attentional hidden state")
    input_feeding: bool = option(
        True, "feed the previous attentional vector into the decoder RNN (luong style)")
    init: Literal["bridge", "zeros"] = option(
        "bridge", "decoder initial state: learned bridge from the encoder, or zeros")
    dropout: float = option(0.3, "dropout on embeddings, between layers and before the output",
                            floats(0, 1, hi_open=True))
    word_dropout: float = option(
        0.0, "probability of dropping a whole input token, source and target, in training "
        "(its embedding zeroed; Sennrich et al. 2016); 0: off", floats(0, 1, hi_open=True))
    forget_bias: Optional[float] = option(
        None, "LSTM only: initial forget-gate bias, e.g. 1.0 (null: like every other weight)",
        floats(-100, 100))
    tie_embeddings: Literal["none", "decoder", "all"] = option(
        "none", "decoder: tie target embeddings and output layer; all: also the source "
        "embeddings (needs a joint vocabulary)")

    def __post_init__(self) -> None:
        check_model(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, batching, validation and checkpointing."""

    batch_tokens: int = option(
        4096, "target tokens per batch on one rank for one accumulation step", ints(1, 1_000_000))
    batch_sentences: int = option(0, "also cap sentences per batch (0: no cap)", ints(0, 1_000_000))
    accumulate: int = option(1, "batches accumulated per update on each rank", ints(1, 10_000))
    optimizer: Literal["adam", "adamw"] = option("adam", "optimizer")
    lr: float = option(1e-3, "peak learning rate", floats(0, 10, lo_open=True))
    betas: tuple[float, float] = option((0.9, 0.999), "Adam betas", floats(0, 1, hi_open=True))
    weight_decay: float = option(0.0, "weight decay", floats(0, 10))
    schedule: Literal["constant", "plateau", "inverse_sqrt", "linear"] = option(
        "constant", "learning-rate schedule (linear: constant, then down in a straight line "
        "toward 0 over the run's last train.decay_last, held at min_lr once it gets there)")
    warmup_steps: int = option(0, "linear warmup steps (inverse_sqrt; also before constant)",
                               ints(0, STEPS_MAX))
    plateau_factor: float = option(0.5, "plateau: multiply the lr by this when stuck",
                                   floats(0, 1, True, True))
    plateau_patience: int = option(2, "plateau: validations without improvement before decay",
                                   ints(0, 1_000_000))
    decay_last: float = option(
        1.0, "linear schedule: the final share of the run (of train.max_epochs; of "
        "train.max_steps when max_epochs is 0) over which the rate falls toward 0 (held at "
        "min_lr)",
        floats(0, 1, lo_open=True))
    min_lr: float = option(1e-6, "lower bound of the learning rate", floats(0, 10))
    clip_norm: float = option(1.0, "gradient-norm clipping (0: off)", floats(0, 1_000_000))
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy",
                                    floats(0, 1, hi_open=True))
    rdrop_alpha: float = option(
        0.0, "R-Drop (Liang et al. 2021): each batch is run twice with different dropout and "
        "the two predicted distributions are pulled together by their symmetric KL, weighted "
        "by this (the paper's alpha; about twice the compute per update; 0: off)",
        floats(0, 1000))
    sample_alpha: float = option(
        0.0, "subword regularisation (Kudo 2018): re-tokenise the training pairs by sampling "
        "each epoch with this smoothing (unigram) or merge dropout (bpe); 0: off",
        floats(0, 1))
    sample_nbest: int = option(
        -1, "subword regularisation: sample from the best N segmentations (-1: all; else at "
        "least 2, at most 512, SentencePiece's limit; unigram)",
        ints(-1, 512))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "auto: bf16 on a GPU or a CPU with native bf16 (amx_bf16, avx512_bf16), else "
        "fp32; bf16: autocast, fp32 weights (on a CPU the RNNs too); fp16: autocast with a "
        "grad scaler (GPU); cuDNN RNN calls stay fp32")
    max_steps: int = option(0, "stop after this many updates (0: no limit)", ints(0, STEPS_MAX))
    max_epochs: int = option(10, "stop after this many epochs (0: no limit)", ints(0, 1_000_000))
    valid_every: int = option(1000, "validate every N updates (and at the end)", ints(1, STEPS_MAX))
    valid_search: Literal["greedy", "beam"] = option(
        "greedy", "decoding used for validation BLEU (beam uses the decode section)")
    log_every: int = option(100, "log training loss every N updates", ints(1, STEPS_MAX))
    early_stop_metric: Literal["bleu", "loss", "ppl"] = option(
        "bleu", "validation metric for best.pt, early stopping and the plateau schedule")
    patience: int = option(0, "stop after N validations without improvement (0: never)",
                           ints(0, 1_000_000))
    keep_last: int = option(3, "keep the last K step checkpoints besides last.pt and best.pt",
                            ints(0, 1_000_000))
    average_last: int = option(
        0, "at the end, average the weights of the last N step checkpoints into averaged.pt "
        "and validate it (needs train.keep_last >= N; 0: off)", ints(0, 1_000_000))
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: cuda when available")
    threads: int = option(0, "CPU threads for torch (0: torch's default, one per "
                                 "core, at most a container's CPU quota)", ints(0, 1024))
    max_bad_steps: int = option(
        5, "stop when this many updates in a row have a non-finite loss or gradient",
        ints(1, 1_000_000))
    tensorboard: bool = option(False, "also log to TensorBoard in <output_dir>/tensorboard")
    cuda_graphs: bool = option(
        False, "GPU: pad batches to bucket shapes and replay each training step as a CUDA "
        "graph (fp32/bf16)")

    def __post_init__(self) -> None:
        check_train(self)


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings shared by validation, translate and evaluate (their flags override)."""

    beam_size: int = option(5, "beam size (1 with alpha 0: greedy search)", ints(1, 1000))
    n_best: int = option(1, "hypotheses returned per sentence", ints(1, 1000))
    alpha: float = option(0.6, "GNMT length penalty alpha, Wu et al. 2016 §7 (0: none)",
                          floats(0, 10))
    max_len_ratio: float = option(
        1.5, "maximum output length = ratio * source length + max_len_add",
        floats(0, 10, lo_open=True))
    max_len_add: int = option(10, "constant added to the maximum output length", ints(0, 1000))
    min_len: int = option(0, "minimum output length in tokens (EOS forbidden before)",
                          ints(0, 1000))
    no_repeat_ngram: int = option(0, "forbid repeating any n-gram of this size (0: off)",
                                  ints(0, 100))
    batch_tokens: int = option(4000, "source tokens per decoding batch", ints(1, 1_000_000))
    shortlist: int = option(
        0, "beam search scores only the target tokens the run's lexicon aligns to the source: "
        "the best N per source token, plus decode.shortlist_frequent (0: every token; "
        "translate, evaluate and serve; not validation, greedy or cuda_graphs)", ints(0, 100))
    shortlist_frequent: int = option(
        100, "with decode.shortlist: the most frequent target tokens added to every "
        "shortlist", ints(0, 2000))
    cuda_graphs: bool = option(
        False, "GPU beam search on fixed shapes, replayed as CUDA graphs (same results; not "
        "with attention output or no_repeat_ngram, which use the plain search)")

    def __post_init__(self) -> None:
        check_decode(self)


DECODE_RANGES = {f.name: f.metadata["range"] for f in fields(DecodeConfig)
                 if f.metadata["range"] is not None}
"""The range of each numeric search setting: the recipe's, ``translate``'s and the API's."""


@dataclass(frozen=True)
class EvalConfig:
    """Scoring and reports of ``seq2seq evaluate``."""

    checkpoint: Literal["best", "last", "averaged"] = option(
        "best", "which checkpoint of the run to evaluate (averaged: train.average_last's)")
    lowercase: bool = option(False, "case-insensitive BLEU and chrF")
    tokenize: Literal["auto", "13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none",
                      "flores101", "flores200"] = option(
        "auto", "sacreBLEU tokenizer for BLEU; auto: as sacreBLEU picks for data.trg_lang (zh, "
        "ja-mecab, ko-mecab for Chinese, Japanese, Korean; else 13a)")
    bootstrap: int = option(1000, "bootstrap resamples for 95% confidence intervals (0: off)",
                            ints(0, 100_000))
    report_dir: Optional[str] = option(
        None, "report directory of the recipe's test sets (default: <output_dir>/eval; "
        "--quantize adds -int8, --precision bf16 -bf16)")
    attention_plots: int = option(3, "attention heatmaps drawn per test set", ints(0, 1000))

    def __post_init__(self) -> None:
        check_eval(self)


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process training through torchrun (PyTorch's elastic launcher)."""

    nproc_per_node: int = option(1, "worker processes per node (GPUs per node)", ints(1, 1024))
    nnodes: int = option(1, "number of nodes", ints(1, 10_000))
    node_rank: int = option(
        0, "0 on the node that hosts the rendezvous (at rdzv_endpoint), 1.. on the others; the "
        "c10d rendezvous numbers the workers in the order the nodes join", ints(0, 9_999))
    rdzv_endpoint: str = option(
        "127.0.0.1:29500", "host:port of the rendezvous of several nodes (one node takes a free "
        "local port)")
    rdzv_id: str = option("seq2seq", "rendezvous id shared by all nodes of one job")
    backend: Literal["auto", "nccl", "gloo"] = option("auto", "auto: nccl on GPU, gloo on CPU")
    max_restarts: int = option(0, "restarts of the worker group after a failure", ints(0, 1000))
    timeout_s: int = option(300, "collective timeout in seconds", ints(1, 604_800))

    def __post_init__(self) -> None:
        check_distributed(self)


@dataclass(frozen=True)
class Recipe:
    """A whole recipe."""

    name: str = option("seq2seq", "run name")
    output_dir: str = option("runs/seq2seq", "run directory: checkpoints, logs, tokenizer, cache")
    seed: int = option(1, "random seed of initialisation, dropout and batch order",
                       ints(0, SEED_MAX))
    data: DataConfig = option(DataConfig(), "corpora")
    tokenizer: TokenizerConfig = option(TokenizerConfig(), "SentencePiece")
    model: ModelConfig = option(ModelConfig(), "architecture")
    train: TrainConfig = option(TrainConfig(), "training")
    decode: DecodeConfig = option(DecodeConfig(), "search")
    eval: EvalConfig = option(EvalConfig(), "evaluation")
    distributed: DistributedConfig = option(DistributedConfig(), "multi-process training")

    def __post_init__(self) -> None:
        check_recipe(self)


SECTIONS = ("data", "tokenizer", "model", "train", "decode", "eval", "distributed")
