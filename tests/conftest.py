"""Shared fixtures: where the real corpora are, tiny recipes, the scripts as modules."""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module of that name (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_data_root() -> Path:
    """The real corpora: $SEQ2SEQ_DATA, else ../shared/data beside the checkout.

    Tests that need them fail (never skip) when they are missing: CI has them.
    """
    root = Path(os.environ.get("SEQ2SEQ_DATA") or REPO.parent / "shared" / "data")
    assert (root / "multi30k" / "train.de.gz").is_file(), (
        f"Multi30k not found under {root}; set SEQ2SEQ_DATA to the data root")
    return root


@pytest.fixture
def data_root() -> Path:
    return shared_data_root()


def tiny_tree(output_dir: str, **sections: dict) -> dict:
    """A tiny recipe tree on the generated task (trains in seconds on one core).

    ``sections`` update the named sections (top-level scalars such as ``seed`` replace).
    """
    tree = {
        "name": "tiny", "output_dir": output_dir, "seed": 3,
        "data": {"src_lang": "en", "trg_lang": "de", "num_proc": 1,
                 "train": {"format": "generated", "split": "train", "size": 300},
                 "valid": {"format": "generated", "split": "valid", "size": 20},
                 "test": {"t": {"format": "generated", "split": "test", "size": 20}}},
        "tokenizer": {"vocab_size": 120},
        "model": {"emb_size": 8, "enc_hidden": 8, "enc_layers": 1, "dec_hidden": 16,
                  "dec_layers": 1, "attention_size": 8, "dropout": 0.2},
        # fp32 pinned: auto would pick bf16 on a CPU with native bf16, so the numbers (and the
        # tolerances of tests that compare them) would depend on the machine the tests run on.
        "train": {"batch_tokens": 300, "max_steps": 6, "max_epochs": 0, "valid_every": 3,
                  "log_every": 1, "lr": 0.01, "keep_last": 2, "precision": "fp32"},
        "decode": {"beam_size": 2, "max_len_ratio": 1.2, "max_len_add": 2},
        "eval": {},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree[section].update(values)
        else:
            tree[section] = values
    return tree


@pytest.fixture
def fp32_gemm(monkeypatch):
    """``fp32_gemm(value)`` sets SEQ2SEQ_FP32_GEMM for the test and returns the backend it
    makes (seq2seq.models.gemm caches the choice per process: cleared here both ways)."""
    from seq2seq.models import gemm

    def use(value: str) -> str:
        monkeypatch.setenv(gemm.ENV, value)
        gemm.fp32_backend.cache_clear()
        gemm.fp32_packing.cache_clear()
        return gemm.fp32_backend()[0]

    yield use
    monkeypatch.delenv(gemm.ENV, raising=False)
    gemm.fp32_backend.cache_clear()
    gemm.fp32_packing.cache_clear()


@pytest.fixture
def torch_kernels(monkeypatch):
    """The torch code that the C kernels (seq2seq.native) replace, for tests of that code:
    SEQ2SEQ_NATIVE=0 for the test (the library's cache cleared both ways)."""
    from seq2seq import native

    monkeypatch.setenv("SEQ2SEQ_NATIVE", "0")
    native.library.cache_clear()
    yield
    monkeypatch.delenv("SEQ2SEQ_NATIVE")
    native.library.cache_clear()


@pytest.fixture(params=["int_mm", "fbgemm"])
def int8_kernel(request, monkeypatch) -> str:
    """Each of seq2seq.quantize's int8 products in turn, whatever this CPU would pick: int8
    layers made in the test use it. (``torch._int_mm`` is a slow loop on an x86 CPU without
    VNNI, but exact everywhere; the tests' layers are small.)"""
    from seq2seq import quantize

    monkeypatch.setattr(quantize, "int8_kernel", lambda: request.param)
    return request.param
