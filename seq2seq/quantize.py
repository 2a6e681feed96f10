"""Int8 dynamic quantisation of a trained model for CPU decoding (opt-in: ``--quantize``).

``torch.ao.quantization.quantize_dynamic`` stores the weights of every ``nn.Linear``,
``nn.GRU`` and ``nn.LSTM`` as int8 and quantises activations on the fly, per batch; matrix
products then run in int8 (fbgemm on x86). Measured on a 2-core AVX2 CPU: the (500, 512) x
(512, 8000) output layer of beam-5 at batch 100 runs 2.1x faster, beam-5 decoding of the
Multi30k-sized model (recipes/multi30k/de-en.gru.yaml) ~1.45x faster per CPU-second; the small
quickstart model gains little (its matrices are too small for the int8 kernels to pay off) and
its BLEU stays at 98.39 (beam 5). Embeddings stay fp32. Only inference on the CPU is
supported: quantised modules have no gradients and no CUDA kernels.

The quantised model keeps the search interface (``encode`` / ``init_state`` / ``step``): its
decoder computes with its modules (the plain path of :class:`seq2seq.models.Decoder`), since the
fused path reads fp32 parameters that the packed int8 modules no longer expose.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from seq2seq.errors import Seq2SeqError
from seq2seq.models.decoder import Decoder

QUANTIZED_TYPES = {nn.Linear, nn.GRU, nn.LSTM}


def quantize_for_cpu(model: nn.Module) -> nn.Module:
    """An int8 dynamically quantised copy of ``model`` (a ``Seq2Seq`` or an ``Ensemble``) in
    eval mode; ``model`` itself is left unchanged.

    Raises:
        Seq2SeqError: the model is not on the CPU, or this torch build has no int8 engine.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise Seq2SeqError("--quantize works on the CPU only (use --device cpu)")
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("fbgemm", "x86", "qnnpack") if e in engines), None)
    if engine is None:
        raise Seq2SeqError(f"--quantize: this torch build has no int8 engine ({engines})")
    torch.backends.quantized.engine = engine
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, Decoder):
            module.fused = False
    with warnings.catch_warnings():
        # torch >= 2.9 announces the move of eager quantisation to torchao; it still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, QUANTIZED_TYPES, dtype=torch.qint8)
