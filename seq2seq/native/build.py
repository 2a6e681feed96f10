"""Building and loading the C kernels (``rows.c``): once per source, compiler and CPU, into a
cache directory, under a temporary name renamed when complete."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from seq2seq.cpuinfo import cpu_field
from seq2seq.errors import Seq2SeqError
from seq2seq.signals import signals_held

ENV = "SEQ2SEQ_NATIVE"
SOURCE = Path(__file__).with_name("rows.c")
# -fno-math-errno lets the compiler call libmvec's vector expf; no -ffast-math, which would
# also let it assume that no value is infinite.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

_voidp, _long, _int = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
SIGNATURES = {
    "log_softmax_rows": [_voidp, _int, _long, _long, _long, _voidp, _voidp, _int],
    "cross_entropy_rows": [_voidp, _int, _long, _long, _long, _voidp, ctypes.c_float, _voidp,
                           _voidp, _voidp, _int],
    "additive_scores": [_voidp, _voidp, _voidp, _int, _long, _long, _long, _long, _voidp,
                        _voidp, _int],
    "additive_scores_backward": [_voidp, _voidp, _voidp, _voidp, _int, _long, _long, _long,
                                 _long, _voidp, _voidp, _int, _voidp, _voidp, _int],
    "quantize_rows": [_voidp, _long, _long, _long, ctypes.c_float, _int, _voidp, _voidp, _int],
    "scale_rows": [_voidp, _int, _long, _long, _voidp, _voidp, _voidp, _voidp, _int],
    "gru_update": [_voidp, _long, _voidp, _long, _voidp, _long, _long, _long, _voidp, _int],
    "tanh_values": [_voidp, _long, _voidp, _int],
    "gru_train_forward": [_voidp, _long, _voidp, _long, _voidp, _long, _int, _long, _long,
                          _voidp, _voidp, _voidp, _voidp, _int],
    "gru_train_backward": [_voidp, _voidp, _voidp, _voidp, _long, _voidp, _long, _int, _long,
                           _long, _voidp, _voidp, _voidp, _voidp, _int],
}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$SEQ2SEQ_CACHE``, else ``~/.cache/seq2seq``."""
    root = os.environ.get("SEQ2SEQ_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seq2seq"


def compiler() -> list[str] | None:
    """The C compiler command to build with: ``$CC`` (which may hold arguments, as
    ``ccache gcc``), else ``cc`` or ``gcc`` on the PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def build(cc: list[str], directory: Path) -> Path:
    """Compile ``rows.c`` into ``directory`` (unless built already); the library's path.

    Raises:
        OSError: the directory cannot be written; subprocess.CalledProcessError: the compiler
            failed.
    """
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(encoding="utf-8"), version, *FLAGS,
                                    cpu_field("model name"), cpu_field("flags")]).encode())
    path = directory / f"rows-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with signals_held() as release:
        handle, partial = tempfile.mkstemp(prefix=path.stem + ".", suffix=".part", dir=directory)
        try:
            release()
            os.close(handle)
            subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", partial, "-lm"],
                           capture_output=True, text=True, check=True, timeout=300)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return path


def wanted() -> bool:
    """Whether ``$SEQ2SEQ_NATIVE`` asks for the kernels: unset, empty or 1 (the default) yes,
    0 no.

    Raises:
        Seq2SeqError: another value (the CLI asks before any command runs, so it is said in
            one line).
    """
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise Seq2SeqError(f"{ENV}={value!r}: 1 (the C kernels where they build, the default) "
                           "or 0 (torch's code)")
    return value != "0"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library, or None where it is off or cannot be built (said once, on stderr)."""
    if not wanted():
        return None
    cc = compiler()
    if cc is None:
        print("note: no C compiler (cc, gcc or $CC): the fused CPU kernels are off",
              file=sys.stderr)
        return None
    try:
        lib = ctypes.CDLL(str(build(cc, cache_dir())))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        last = detail.strip().splitlines()[-1] if detail.strip() else err
        print(f"note: the fused CPU kernels are off: building {SOURCE.name} with "
              f"{shlex.join(cc)} failed: {last}", file=sys.stderr)
        return None
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib
