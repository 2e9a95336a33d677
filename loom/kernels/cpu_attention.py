"""loom's CPU attention kernel (cpu_attention.cpp): build, load, and expose it as torch ops.

The kernel is plain C++ with AVX-512 intrinsics and no torch headers, so it compiles in seconds
with the system's g++ and is called through ctypes on the tensors' memory. It is built on first
use into loom's cache directory, keyed by the source, the flags and the compiler, under a file
lock (ranks starting together build it once). Where it cannot run (no AVX-512, not x86-64, no
compiler, a head dim it was not compiled for, a failed build) `available` / `supports` say no and
loom.models.attention keeps ATen's CPU flash op; `status()` says which and why.

The two entry points are registered as torch custom ops (`torch.ops.loom.cpu_attention_forward`
and `..._backward`) so that selective activation recomputation can name the forward as an op to
save, and torch.compile treats the calls as opaque.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp",
         "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"]
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)  # LOOM_HEAD_DIMS in the source

_lib: ctypes.CDLL | None = None
_status: str | None = None


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _why_not() -> str | None:
    """None when this machine can build and run the kernel, else the reason."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        return f"not an x86-64 POSIX machine ({platform.machine()}, {os.name})"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"CPU capability {torch.backends.cpu.get_cpu_capability()}, the kernel needs AVX512"
    if _compiler() is None:
        return "no C++ compiler (g++ or c++) on PATH"
    return None


def _build(cache: Path) -> Path:
    """Compile the kernel into `cache` once per (source, flags, compiler); returns the .so path."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    out = cache / f"cpu_attention-{key}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building the same file
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                target = Path(tmp) / out.name
                done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(target)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
                os.replace(target, out)
    return out


def load(cache: Path | None = None) -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None where it cannot run."""
    global _lib, _status
    if _status is not None:
        return _lib
    reason = _why_not()
    if reason is None:
        try:
            from loom.metrics.meter import cache_dir

            lib = ctypes.CDLL(str(_build(cache or cache_dir() / "kernels")))
            pointer, strides = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
            ints = [ctypes.c_int] * 5
            lib.loom_attention_forward.argtypes = [ctypes.c_int] + [pointer, strides] * 5 + ints + [
                ctypes.c_int, ctypes.c_float, ctypes.c_int]
            lib.loom_attention_backward.argtypes = [ctypes.c_int] + [pointer, strides] * 9 + ints + [
                ctypes.c_int, ctypes.c_float, ctypes.c_int]
            _lib, _status = lib, "loom AVX-512 kernel"
            return _lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = f"build failed: {e}"
    _status = f"ATen flash op ({reason})"
    return None


def available() -> bool:
    return load() is not None


def status() -> str:
    """Which CPU fp32 attention kernel runs, and if not loom's, why."""
    load()
    return _status


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these fp32 CPU tensors ([B, H, L, D], unit stride along D)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[-1] in HEAD_DIMS and q.dim() == 4 and available()
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _like_rows(t: torch.Tensor) -> torch.Tensor:
    """An empty fp32 [B, H, L, D] laid out [B, L, H, D] in memory (the layout ATen's op returns,
    so that [B, L, H * D] is a view of it)."""
    b, h, l, d = t.shape
    return torch.empty((b, l, h, d), dtype=torch.float32, device=t.device).transpose(1, 2)


@torch.library.custom_op("loom::cpu_attention_forward", mutates_args=())
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D] fp32 -> (out [B, Hq, Lq, D], lse [B, Hq, Lq])."""
    b, hq, lq, d = q.shape
    out, lse = _like_rows(q), torch.empty((b, hq, lq), dtype=torch.float32)
    if q.numel() == 0 or k.shape[2] == 0:
        return out.zero_(), lse.fill_(-torch.inf)
    rc = _lib.loom_attention_forward(
        d, _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out), _strides(out),
        _ptr(lse), _strides(lse), b, hq, k.shape[1], lq, k.shape[2], int(causal), scale,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"loom's CPU attention kernel has no head_dim={d}; compiled: {HEAD_DIMS}")
    return out, lse


@forward.register_fake
def _(q, k, v, causal, scale):
    b, hq, lq, _ = q.shape
    return _like_rows(q), q.new_empty((b, hq, lq))


@torch.library.custom_op("loom::cpu_attention_backward", mutates_args=())
def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), fp32, with the shapes of q, k, v, from the final out and lse."""
    b, hq, lq, d = q.shape
    dq, dk, dv = _like_rows(q), _like_rows(k), _like_rows(v)
    if q.numel() == 0 or k.shape[2] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    tensors = [dout, q, k, v, out, lse, dq, dk, dv]
    args = [a for t in tensors for a in (_ptr(t), _strides(t))]
    rc = _lib.loom_attention_backward(d, *args, b, hq, k.shape[1], lq, k.shape[2], int(causal), scale,
                                      torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"loom's CPU attention kernel has no head_dim={d}; compiled: {HEAD_DIMS}")
    return dq, dk, dv


@backward.register_fake
def _(dout, q, k, v, out, lse, causal, scale):
    return _like_rows(q), _like_rows(k), _like_rows(v)
