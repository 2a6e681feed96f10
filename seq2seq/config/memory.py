"""Would a recipe's model and batches fit in this machine's memory? An estimate, made before any
work, so that a size typo ends in one line naming the key rather than in an out-of-memory kill.

The estimate (fp32, 4 bytes a number) is deliberately simple and errs low, so that it refuses
only what cannot fit:

- weights, gradients and the two Adam moments: 4 x the parameters, counted from the model
  section as :func:`seq2seq.models.seq2seq.build_model` builds it (a test checks the count);
- activations kept for the backward pass of one batch of ``train.batch_tokens`` target tokens
  (at least one longest pair): logits, log-probabilities and their gradient over the target
  vocabulary; the attention over sources of up to ``data.max_src_tokens`` tokens (the additive
  MLP's ``attention_size`` features per source position); the recurrent states; twice that
  with R-Drop (``train.rdrop_alpha``), which runs each batch twice.

Both are compared with the machine's RAM; the activations only when training runs on the CPU
(``train.device: cpu``, or ``auto`` on a machine without an NVIDIA driver), where each of
``distributed.nproc_per_node`` processes holds its own copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the schema's checks import nothing from here; keep it that way
    from seq2seq.config.schema import ModelConfig, Recipe

BYTES = 4  # fp32: mixed precision keeps fp32 weights and Adam state too
GIB = 2**30


def machine_memory() -> int:
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_problems(recipe: Recipe, ram: int | None = None) -> list[str]:
    """The sizes that would not fit in ``ram`` bytes (default: this machine's RAM), each
    named by the recipe key that matters most, with the figures."""
    ram = machine_memory() if ram is None else ram
    copies = recipe.distributed.nproc_per_node if _trains_on_cpu(recipe) else 1
    groups = parameter_groups(recipe.model, recipe.tokenizer.vocab_size)
    state = 4 * BYTES * sum(groups.values()) * copies  # weights, gradients, 2 Adam moments
    per = f" ({copies} processes)" if copies > 1 else ""
    if state > ram:
        key = max(groups, key=groups.get)
        return [f"{key}: the model would need ~{_gib(state)} GiB for weights, gradients and "
                f"Adam state{per}, this machine has {_gib(ram)} GiB"]
    if not _trains_on_cpu(recipe):
        return []
    batch = activation_bytes(recipe) * copies
    if state + batch > ram:
        return [f"train.batch_tokens: a batch of {recipe.train.batch_tokens} target tokens "
                f"(sources up to data.max_src_tokens {recipe.data.max_src_tokens}, vocabulary "
                f"{recipe.tokenizer.vocab_size}) would need ~{_gib(batch)} GiB of activations "
                f"besides ~{_gib(state)} GiB of weights, gradients and Adam state{per}, this "
                f"machine has {_gib(ram)} GiB"]
    return []


def parameter_groups(model: ModelConfig, vocab: int) -> dict[str, int]:
    """Parameters of the model by the recipe key that sizes them (their sum: the model's)."""
    gates = {"gru": 3, "lstm": 4, "rnn": 1}[model.cell]
    dirs = 2 if model.bidirectional else 1
    enc_out, dec = model.enc_hidden * dirs, model.dec_hidden
    emb = model.emb_size
    embeddings = vocab * emb * (1 if model.tie_embeddings == "all" else 2)
    output = (0 if model.tie_embeddings != "none" else dec * vocab) + vocab
    encoder = _rnn(gates, emb, model.enc_hidden, model.enc_layers, dirs)
    rnn_input = emb + (enc_out if model.decoder == "bahdanau" else 0)
    rnn_input += dec if model.input_feeding else 0
    decoder = _rnn(gates, rnn_input, dec, model.dec_layers, 1)
    combine_input = dec + enc_out + (emb if model.decoder == "bahdanau" else 0)
    decoder += combine_input * dec + dec
    if model.init == "bridge":
        states = 2 if model.cell == "lstm" else 1
        decoder += (enc_out * states + 1) * states * model.dec_layers * dec
    attention = {"bahdanau": (enc_out + 1 + dec + 1) * model.attention_size,
                 "general": enc_out * dec, "dot": 0}[model.attention]
    return {"tokenizer.vocab_size": embeddings + output, "model.enc_hidden": encoder,
            "model.dec_hidden": decoder, "model.attention_size": attention}


def activation_bytes(recipe: Recipe) -> int:
    """What the backward pass of one training batch keeps (see the module docstring)."""
    model, vocab = recipe.model, recipe.tokenizer.vocab_size
    trg = max(recipe.train.batch_tokens, recipe.data.max_trg_tokens + 1)
    src_len = recipe.data.max_src_tokens + 1
    dirs = 2 if model.bidirectional else 1
    gates = {"gru": 3, "lstm": 4, "rnn": 1}[model.cell]
    per_source = (src_len * 2 * model.attention_size if model.attention == "bahdanau"
                  else src_len * 2)
    per_target = (3 * vocab + per_source + model.dec_layers * model.dec_hidden * (gates + 2)
                  + 3 * model.dec_hidden + model.emb_size + 2 * model.enc_hidden * dirs)
    encoder = trg * (model.enc_layers * model.enc_hidden * dirs * (gates + 2) + model.emb_size)
    passes = 2 if recipe.train.rdrop_alpha > 0 else 1  # R-Drop runs each batch twice
    return BYTES * passes * (trg * per_target + encoder)


def _rnn(gates: int, input_size: int, hidden: int, layers: int, dirs: int) -> int:
    """Parameters of torch's ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN``: per layer and direction,
    ``gates`` blocks of input weights, recurrent weights and two biases."""
    first = gates * (input_size * hidden + hidden * hidden + 2 * hidden)
    later = gates * (hidden * dirs * hidden + hidden * hidden + 2 * hidden)
    return dirs * (first + (layers - 1) * later)


def _trains_on_cpu(recipe: Recipe) -> bool:
    if recipe.train.device != "auto":
        return recipe.train.device == "cpu"
    gpus = Path("/proc/driver/nvidia/gpus")
    return not (gpus.is_dir() and any(gpus.iterdir()))


def _gib(size: int) -> str:
    return f"{size / GIB:,.1f}"


SMALLER = {
    "train": "a training batch needs less with a smaller train.batch_tokens",
    "translate": "a search needs less with a smaller --batch-tokens or --beam",
    "evaluate": "a search needs less with a smaller --batch-tokens or --beam",
    "serve": "a search needs less with a smaller --batch-size, --batch-tokens or --beam",
}
"""What sizes a command's largest allocations, by command: said when one fails (which may
also be while the model loads)."""


def out_of_memory(error: BaseException, command: str) -> str | None:
    """One line for an allocation that failed (torch's CPU or CUDA allocator, or Python's
    ``MemoryError``), naming the settings that size it; None for any other error.

    The estimate above covers training on the CPU; a search's memory grows with the beam and
    the batch, and the flags' ranges allow more than a machine holds.
    """
    text = str(error)
    if not (isinstance(error, MemoryError) or "can't allocate memory" in text
            or "out of memory" in text):
        return None
    size = ""
    if match := re.search(r"[Tt]ried to allocate (\d+) bytes", text):  # CPU
        size = f" (allocating {int(match[1]) / GIB:.2f} GiB failed)"
    elif match := re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]iB)", text):  # CUDA
        size = f" (allocating {match[1]} failed)"
    hint = SMALLER.get(command)
    return f"out of memory{size}" + (f"; {hint}" if hint else "")
