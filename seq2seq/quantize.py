"""Int8 decoding of a trained model on the CPU (opt-in: ``--quantize``).

Every ``nn.Linear`` with more than one output (Bahdanau attention's ``v`` stays float)
becomes an :class:`Int8Linear`: int8 weights with one scale per output row, and int8
activations with one scale per input row, multiplied in int8 with int32 sums
(``torch._int_mm``, oneDNN on x86). A row's output depends on that row alone, so the int8
products add nothing that depends on a sentence's batch mates: it translates as in fp32,
whatever it is batched with, up to the rounding that fp32's other passes have at other batch
shapes (:mod:`seq2seq.search.beam`). torch's dynamic quantisation (``quantize_dynamic``,
this module's earlier method) scales the activations by the whole batch's largest value
instead, so an output could change with its batch mates (100 of 1,000 served test sentences
differed from offline ``translate`` under it). The decoder's RNN
becomes an :class:`Int8RNN` (its projections :class:`Int8Linear`, its cell equations float),
and the encoder's an :class:`Int8PackedRNN`, the same over packed input in both directions
(torch's int8 RNN modules quantise per batch too). The encoder runs once per sentence, but
its float products were still about 9% of an int8 beam search's time (300 test sentences at
24 output tokens, beam 5, 2-core Zen 3 EPYC: encoding took 267 ms in fp32, 168 ms in int8).
Embeddings stay float. Only inference on the CPU is supported: int8
modules have no gradients and no CUDA kernels.

Where an x86 CPU lacks VNNI (AVX512-VNNI), torch's ``_int_mm`` is a plain loop, not oneDNN: on
a 2-core Zen 3 EPYC (AVX2 only), two threads, 133 ms at 500 x 512 x 1,536 against 6.1 ms for
the fp32 product, so int8 beam search ran at 2.3 sentences/s against fp32's 51. There the
products go to fbgemm instead (:func:`int8_kernel`), the library of torch's own dynamic
quantisation, with *7-bit* activations (-63..63), as torch's ``reduce_range`` does on x86:
without VNNI, fbgemm and oneDNN multiply unsigned 8-bit activations by signed 8-bit weights
with an instruction (``vpmaddubsw``) that adds pairs of products into 16 bits and saturates,
so only 7-bit activations keep every integer sum exact (2 x 127 x 127 < 2^15). Sums stay
exact, so a row still depends on itself alone; but a CPU without VNNI rounds activations
more coarsely than one with it, and the two can translate a sentence differently.

The int8 model keeps the search interface (``encode`` / ``init_state`` / ``step``): its
decoder computes with its modules (the plain path of :class:`seq2seq.models.Decoder`), since the
fused path reads the float weights of ``combine``, which an :class:`Int8Linear` no longer has.
"""

from __future__ import annotations

import copy
import platform
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from seq2seq import native
from seq2seq.errors import Seq2SeqError
from seq2seq.models.cells import CELLS, cell_update, layer_weights, packed_rnn, steps_packed
from seq2seq.models.decoder import Decoder
from seq2seq.models.encoder import Encoder
from seq2seq.models.packed import unpack

QMAX = 127.0  # symmetric int8: -127..127, so that -x quantises to -q(x)
QMAX_7BIT = 63.0  # activations for fbgemm: 7 bits, so that no pair of products saturates
KERNELS = ("int_mm", "fbgemm")
# torch 2.13 deprecates quantized tensors, which fbgemm's weight packing takes: one narrow
# filter, set once (``warnings.catch_warnings`` around each packing is not thread-safe).
warnings.filterwarnings("ignore", category=UserWarning,
                        message="torch.quantize_per_tensor, torch.quantize_per_channel")


def int8_kernel() -> str:
    """How this machine multiplies int8: ``"int_mm"`` (``torch._int_mm``: oneDNN where an x86
    CPU has VNNI, and on other architectures) or ``"fbgemm"`` (an x86 CPU without VNNI, where
    ``torch._int_mm`` is a plain loop)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "int_mm"
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if vnni is not None and vnni():
        return "int_mm"
    quantized = torch.backends.quantized  # fbgemm packs only under these engines
    return ("fbgemm" if "fbgemm" in quantized.supported_engines
            and quantized.engine in ("x86", "fbgemm") else "int_mm")


def quantize_rows(x: torch.Tensor, qmax: float = QMAX,
                  dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(N, K)`` float -> ``(N, K)`` integers in -qmax..qmax (as ``dtype``: int8, or
    float32 for fbgemm, which quantises its float input itself) and each row's scale
    ``(N, 1)``."""
    fused = native.quantize_rows(x, qmax, dtype)
    if fused is not None:
        return fused
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(qmax)
    # No clamp to +-qmax: |x| / scale is at most qmax / (1 - 2^-24) after rounding the scale,
    # which rounds to qmax (a row's quantisation runs at every int8 product of every step).
    return (x / scale).round_().to(dtype), scale


class Int8Linear(nn.Module):
    """``nn.Linear`` in int8: ``y = (q(x) q(W)^T) * s_x * s_W + b`` with a scale per row of
    ``x`` and per output of ``W`` (symmetric, round to nearest). Integer sums are exact, so each
    row of ``y`` depends on its own row of ``x`` only. Made by :meth:`quantize`.

    The weight is kept as ``nn.Linear`` keeps it, ``(N_out, K)`` rows, and ``torch._int_mm``
    multiplies by its transposed view. oneDNN's int8 products read that column-major operand
    faster than a row-major ``(K, N_out)`` copy where the CPU lacks AMX (held at AVX2 on a
    2-core Xeon, two threads: 2.06 against 2.44 ms at 500 x 512 x 1536, 0.07 against 0.42 ms
    at 5 rows); with AMX the two are level (0.92-1.09x). A shortlist's rows are then a plain
    row gather (:meth:`select`).

    With ``kernel="fbgemm"`` (see the module's docstring) the activations are quantised to 7
    bits and fbgemm multiplies them by a copy of the weights packed on first use: a second
    copy of the int8 weights, made again when ``qweight`` is replaced, moved or written to
    in place (writes that bypass torch's version counter, through ``.data`` or numpy, are
    not seen), and left out of copies and pickles. Its sums are the same integers, and the
    scaling after them is the same.

    Args:
        qweight: ``(N_out, K)`` int8 weights.
        weight_scale: ``(1, N_out)`` the scale of each output.
        bias: ``(N_out,)`` float, or None.
        kernel: ``"int_mm"`` or ``"fbgemm"``; default :func:`int8_kernel`'s choice.
    """

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, kernel: str | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.kernel = kernel or int8_kernel()
        if self.kernel not in KERNELS:
            raise ValueError(f"int8 kernel {self.kernel!r}: expected one of {KERNELS}")
        self._packed: tuple[tuple[Any, ...], Any] | None = None  # (qweight's key, pack)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                 kernel: str | None = None) -> Int8Linear:
        """The int8 layer of float ``weight`` ``(N_out, K)`` and ``bias``."""
        qweight, scale = quantize_rows(weight.detach().float())
        return cls(qweight, scale.t().contiguous(),
                   None if bias is None else bias.detach().float().clone(), kernel)

    def select(self, ids: torch.Tensor) -> Int8Linear:
        """This layer restricted to outputs ``ids`` (a shortlist's rows of an output layer):
        their values are this layer's bit for bit, at the cost of ``len(ids)`` outputs."""
        return Int8Linear(self.qweight.index_select(0, ids),
                          self.weight_scale.index_select(1, ids),
                          None if self.bias is None else self.bias.index_select(0, ids),
                          self.kernel)

    def fbgemm_weight(self) -> Any:
        """fbgemm's packed copy of ``qweight`` (unit scales: the products are the integer
        sums), made again whenever ``qweight`` is another tensor or was written to."""
        w = self.qweight
        # Inference tensors (made under torch.inference_mode) have no version counter.
        key = (w, w.data_ptr(), tuple(w.shape), -1 if w.is_inference() else w._version)
        packed = self._packed
        if packed is None or packed[0][0] is not w or packed[0][1:] != key[1:]:
            n = self.out_features
            weight = torch._make_per_channel_quantized_tensor(
                w.contiguous(), torch.ones(n, dtype=torch.float64),
                torch.zeros(n, dtype=torch.int64), 0)
            packed = (key, torch.ops.quantized.linear_prepack(weight, None))
            self._packed = packed
        return packed[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": None}  # packed again on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if self.kernel == "fbgemm":
            # Integers -63..63 as floats: fbgemm adds the zero point 64 to make its unsigned
            # operand (1..127), and multiplies exactly.
            rows, scale = quantize_rows(flat, QMAX_7BIT, torch.float32)
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                rows, 1.0, 64, self.fbgemm_weight())
        else:
            rows, scale = quantize_rows(flat)
            y = torch._int_mm(rows, self.qweight.t())
        scaled = native.scale_rows(y, scale, self.weight_scale, self.bias)
        if scaled is None:
            scaled = y.float().mul_(scale).mul_(self.weight_scale)
            if self.bias is not None:
                scaled.add_(self.bias)
        return scaled.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 "
                f"by {self.kernel}")


def int8_projections(rnn: nn.RNNBase, skip: int = 0) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The input and hidden projections of every layer and direction of ``rnn`` (layer-major,
    as torch orders them) as :class:`Int8Linear`; with ``skip``, the first layer's input
    projection only of the input features past the first ``skip``, without its bias (both
    come from :class:`Int8RNN`'s table)."""
    ih, hh = nn.ModuleList(), nn.ModuleList()
    for layer in range(rnn.num_layers):
        for direction in range(2 if rnn.bidirectional else 1):
            w_ih, w_hh, b_ih, b_hh = layer_weights(rnn, layer, direction)
            if layer == 0 and skip:
                w_ih, b_ih = w_ih[:, skip:], None
            ih.append(Int8Linear.quantize(w_ih, b_ih))
            hh.append(Int8Linear.quantize(w_hh, b_hh))
    return ih, hh


class Int8RNN(nn.Module):
    """A unidirectional batch-first ``nn.GRU`` / ``nn.LSTM`` / tanh ``nn.RNN`` whose input and
    hidden projections are :class:`Int8Linear` (the decoder's: a step of it is the largest
    matmul after the output layer), stepped with the float cell equations of
    :func:`~seq2seq.models.cells.cell_update`. Same call as the module's, with the tokens
    whose embeddings open each input row where it holds a table for them.

    With ``embedding`` (the decoder's, whose vectors are the first ``E`` features of each
    input row), the first layer's input gates from the embeddings are looked up in a float
    table of every token's, ``E W^T + b``, made once, instead of multiplied at every step: a
    third of that layer's input product for ``de-en.gru``, for a table of ``V`` x ``G``
    fp32 values (43 MB there). It is made only where it holds at most :attr:`MAX_TABLE`
    values and the row holds more than the embeddings (context or input feeding); the rest
    of the row is multiplied in int8 as before. Lookups depend on the row alone, as the
    products do.
    """

    MAX_TABLE = 1 << 24  # values (64 MiB of fp32)

    def __init__(self, rnn: nn.RNNBase, embedding: nn.Embedding | None = None):
        super().__init__()
        self.cell, self.layers = CELLS[rnn.mode], rnn.num_layers
        self.emb_size = 0
        self.register_buffer("token_gates", None)
        w_ih, _, b_ih, _ = layer_weights(rnn, 0, 0)
        if (embedding is not None and w_ih.size(1) > embedding.embedding_dim
                and embedding.num_embeddings * w_ih.size(0) <= self.MAX_TABLE):
            self.emb_size = size = embedding.embedding_dim
            with torch.no_grad():
                self.token_gates = torch.addmm(
                    b_ih.float() if b_ih is not None else torch.zeros(w_ih.size(0)),
                    embedding.weight.float(), w_ih[:, :size].float().t())
        self.ih, self.hh = int8_projections(rnn, skip=self.emb_size)

    def forward(self, x: torch.Tensor, hx: Any, tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Any]:
        if self.token_gates is not None and (tokens is None or tokens.shape != x.shape[:2]):
            raise ValueError("this int8 RNN looks its input's embeddings up: it needs their "
                             f"tokens, ({x.size(0)}, {x.size(1)}), got "
                             f"{None if tokens is None else tuple(tokens.shape)}")
        lstm = self.cell == "lstm"
        hs = list((hx[0] if lstm else hx).unbind(0))  # per layer (B, H)
        cs: list[Any] = list(hx[1].unbind(0)) if lstm else [None] * self.layers
        outputs = []
        for t in range(x.size(1)):
            inp = x[:, t]
            for k in range(self.layers):
                if k == 0 and self.token_gates is not None:
                    gates = self.ih[0](inp[:, self.emb_size:]).add_(
                        self.token_gates.index_select(0, tokens[:, t]))
                else:
                    gates = self.ih[k](inp)
                hs[k], cs[k] = cell_update(self.cell, gates, self.hh[k](hs[k]), hs[k], cs[k])
                inp = hs[k]
            outputs.append(inp)
        h = torch.stack(hs)
        return torch.stack(outputs, dim=1), ((h, torch.stack(cs)) if lstm else h)


class Int8PackedRNN(nn.Module):
    """An encoder's batch-first ``nn.GRU`` / ``nn.LSTM`` / tanh ``nn.RNN`` (bidirectional or
    not) over packed input, its input and hidden projections :class:`Int8Linear`, stepped by
    :func:`~seq2seq.models.cells.packed_rnn` with the float cell equations. Called as the
    module is over a ``PackedSequence`` from zero states; returns what it returns.

    Each row's quantisation, integer sums and cell update depend on that row alone, so a
    sentence's encoding is the same, bit for bit, whatever its batch mates (the float
    module's products round differently at other batch sizes)."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.mode, self.num_layers = rnn.mode, rnn.num_layers
        self.bidirectional, self.hidden_size = rnn.bidirectional, rnn.hidden_size
        self.dropout = 0.0  # inference only
        self.ih, self.hh = int8_projections(rnn)

    def forward(self, packed: PackedSequence, hx: Any = None) -> tuple[PackedSequence, Any]:
        if not isinstance(packed, PackedSequence) or hx is not None:
            raise ValueError("an int8 encoder RNN takes packed input from zero states")
        return packed_rnn(self, packed, products=list(zip(self.ih, self.hh)))


def quantize_for_cpu(model: nn.Module) -> nn.Module:
    """An int8 copy of ``model`` (a ``Seq2Seq`` or an ``Ensemble``) in eval mode, its
    ``nn.Linear`` layers :class:`Int8Linear`; ``model`` itself is left unchanged.

    Raises:
        Seq2SeqError: the model is not on the CPU.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise Seq2SeqError("--quantize works on the CPU only (use --device cpu)")
    model = unpack(copy.deepcopy(model)).eval()  # fp32 weights packed for oneDNN: plain again
    for module in list(model.modules()):
        if isinstance(module, Decoder):
            module.fused = False
            if steps_packed(module.rnn):  # a decoder RNN is unidirectional
                module.rnn = Int8RNN(module.rnn, module.embedding)
        if isinstance(module, Encoder) and module.packed and steps_packed(module.rnn):
            module.rnn = Int8PackedRNN(module.rnn)
        for name, child in list(module.named_children()):
            # A vector product (one output) stays float: quantising its input (five passes over
            # it) costs more than an int8 product saves. Bahdanau attention's v is one, applied
            # to the (beams, source length, A) hidden layer at every step.
            if type(child) is nn.Linear and child.out_features > 1:
                setattr(module, name, Int8Linear.quantize(child.weight, child.bias))
    return model
