"""Which precision a run computes in: ``train.precision`` (fp32, bf16, fp16, auto) on a device.

``auto`` picks bf16 where the hardware computes it natively, else fp32:

- a CUDA GPU that supports bf16 (``torch.cuda.is_bf16_supported``);
- a CPU with bf16 matrix instructions, Intel AMX-BF16 or AVX512-BF16 (Sapphire Rapids, AMD
  Zen 4 and later): asked of torch (``torch.cpu._is_amx_tile_supported``,
  ``torch.cpu._is_avx512_bf16_supported``), else read from the ``flags`` of /proc/cpuinfo.

Other CPUs run bf16 too (oneDNN converts to fp32 inside each kernel), only slower than fp32, so
``auto`` keeps them in fp32. bf16 means fp32 master weights and optimizer state, with the
matmuls, the RNNs (:func:`seq2seq.models.encoder.run_rnn`), attention and output layer in
bf16 under autocast; the loss and its softmax statistics are computed in fp32.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from seq2seq.cpuinfo import CPUINFO, cpu_field

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
HELD_CAPABILITIES = ("DEFAULT", "NO AVX", "AVX2")  # torch.backends.cpu.get_cpu_capability()


def cpu_flags(cpuinfo: Path | None = None) -> set[str]:
    """The ``flags`` of the first CPU in ``cpuinfo`` (default /proc/cpuinfo; empty when it
    cannot be read)."""
    return set(cpu_field("flags", cpuinfo or CPUINFO).split())


def cpu_bf16_instructions() -> str | None:
    """The CPU's bf16 instructions ("torch: avx512_bf16", "cpuinfo: amx_bf16", ...), or None."""
    probes = {"amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None),
              "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None)}
    if all(probe is not None for probe in probes.values()):
        found = [flag for flag, probe in probes.items() if probe()]
        return f"torch: {', '.join(found)}" if found else None
    found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
    return f"cpuinfo: {', '.join(found)}" if found else None


def held_below_avx512() -> str | None:
    """torch's CPU kernel level ("AVX2", ...) where it is below AVX-512 on this x86 CPU, else
    None. ``ATEN_CPU_CAPABILITY=avx2`` holds it there on any CPU (with
    ``ONEDNN_MAX_CPU_ISA=AVX2``, the way to measure what a CPU without AVX-512 runs); its bf16
    products then fall back to code that does not use the bf16 instructions."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in HELD_CAPABILITIES else None


def cpu_native_bf16() -> str | None:
    """How this CPU computes bf16 natively ("torch: avx512_bf16", "cpuinfo: amx_bf16", ...),
    or None when it does not, or torch's kernels are held below AVX-512."""
    return None if held_below_avx512() else cpu_bf16_instructions()


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``(precision to compute in, why)`` for ``train.precision`` / ``--precision`` on
    ``device``: ``auto`` becomes bf16 or fp32; fp16 on a CPU becomes fp32 (no grad scaler)."""
    if device.type == "cuda":
        if precision != "auto":
            return precision, "as asked"
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp32", "auto: the GPU does not support bf16"
    if precision == "fp16":
        return "fp32", "fp16 applies on a GPU only"
    native = cpu_native_bf16()
    if precision == "auto":
        if native:
            return "bf16", f"auto: the CPU computes bf16 natively ({native})"
        held, instructions = held_below_avx512(), cpu_bf16_instructions()
        if held and instructions:
            return "fp32", (f"auto: torch's CPU kernels are held at {held}, below the CPU's "
                            f"bf16 instructions ({instructions})")
        return "fp32", "auto: the CPU has no native bf16 (no amx_bf16 or avx512_bf16)"
    if precision == "bf16" and not native:
        return "bf16", "as asked; the CPU has no native bf16, so it is slower than fp32"
    return precision, "as asked"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: fp32)."""
    return DTYPES.get(precision)


def decoding_model(model: torch.nn.Module, precision: str, device: torch.device
                   ) -> tuple[torch.nn.Module, str, str]:
    """``(model to decode with, precision, why)`` for ``--precision``: in bf16, a copy with
    every weight cast once (the searches take ``log_softmax`` of fp32 logits, so scores
    accumulate in fp32) and, on a CPU, packed once for oneDNN where torch can
    (:mod:`seq2seq.models.packed`); in fp32 a packed copy where fp32 products go to oneDNN
    (:mod:`seq2seq.models.gemm`), else the model itself. ``model`` is never changed."""
    from seq2seq.models.packed import pack_for_cpu, packing_supported, unpack

    resolved, why = resolve_precision(precision, device)
    if resolved != "bf16":
        if not packing_supported(device, torch.float32):
            return model, "fp32", why
        model = unpack(copy.deepcopy(model))  # packed already (translate's): packed anew
        pack_for_cpu(model)  # a no-op for a model that is not all fp32 (int8 layers)
        return model, "fp32", why
    model = unpack(copy.deepcopy(model)).to(torch.bfloat16)
    pack_for_cpu(model)  # a no-op on a GPU and where oneDNN has no bf16
    return model, "bf16", why
