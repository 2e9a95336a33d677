"""loom's CPU kernels (the *.cpp files beside this module): build once, load, report.

The kernels are plain C++ with AVX-512 intrinsics and no torch headers, so they compile in
seconds with the system's g++ and are called through ctypes on the tensors' memory. They are
built on first use into loom's cache directory, keyed by the sources, the flags and the compiler,
under a file lock (ranks starting together build once). Compiled with -fopenmp and loaded after
torch, the library binds to torch's own libgomp (same soname), so the kernels run on PyTorch's
threads. Where they cannot run (no AVX-512, not x86-64, no compiler, a failed build) `load()`
returns None, callers keep PyTorch's ops, and `status()` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from loom.locks import exclusive_lock

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp",
         "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"]

_lib: ctypes.CDLL | None = None
_status: str | None = None


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _why_not() -> str | None:
    """None when this machine can build and run the kernels, else the reason."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        return f"not an x86-64 POSIX machine ({platform.machine()}, {os.name})"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"CPU capability {torch.backends.cpu.get_cpu_capability()}, the kernels need AVX512"
    if _compiler() is None:
        return "no C++ compiler (g++ or c++) on PATH"
    return None


def _build(cache: Path) -> Path:
    """Compile the kernels into `cache` once per (sources, flags, compiler); returns the .so."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(" ".join(FLAGS).encode() + version.encode())
    for source in SOURCES + HEADERS:
        digest.update(source.name.encode() + source.read_bytes())
    out = cache / f"loom_cpu_kernels-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / "build.lock"):  # another rank may be building the same file
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                target = Path(tmp) / out.name
                done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(target)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
                os.replace(target, out)
    return out


def load(cache: Path | None = None) -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None where it cannot run."""
    global _lib, _status
    if _status is not None:
        return _lib
    reason = _why_not()
    if reason is None:
        try:
            from loom.files import cache_dir

            _lib = ctypes.CDLL(str(_build(cache or cache_dir() / "kernels")))
            _status = "loom AVX-512 CPU kernels (attention, loss, RMSNorm, SwiGLU, RoPE)"
            return _lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = f"build failed: {e}"
    _status = f"PyTorch ops ({reason})"
    return None


def available() -> bool:
    return load() is not None


def status() -> str:
    """Which CPU kernels run (loom's or PyTorch's), and if not loom's, why."""
    load()
    return _status


def strides3(t: torch.Tensor):
    """The first three strides of t, as the kernels take them."""
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())
