"""The [train] section's checks, before anything starts; the training dtypes, devices and
non-finite policies live here, recomputation modes in recompute.py, kernel choices in
loom.models.converters."""
from __future__ import annotations

import torch

from loom.models.converters import KERNEL_CHOICES, loom_kernels_unavailable
from loom.models.fp8 import FP8_INSTALL, FP8_RECIPES, torchao_missing
from loom.models.transformer import ModelConfig
from loom.settings import DTYPES, need, one_of
from loom.parallel.recompute import RECOMPUTE_MODES

NONFINITE = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")


def check_train(t, model: ModelConfig, checkpoint_dir: str) -> None:
    for key in ("steps", "seq_len", "micro_batch", "global_batch", "eval_batches"):
        need(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be a positive integer")
    need(t.lr > 0, f"train.lr={t.lr} must be positive")
    need(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}")
    need(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be 0 or more")
    need(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be 0 or more")
    need(0 <= t.beta1 < 1, f"train.beta1={t.beta1} must be in [0, 1)")
    need(0 <= t.beta2 < 1, f"train.beta2={t.beta2} must be in [0, 1)")
    need(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be 0 (off) or positive")
    need(t.timeout_s > 0, f"train.timeout_s={t.timeout_s} must be positive (seconds a collective may wait)")
    need(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be 0 (end only) or positive")
    one_of("train.dtype", t.dtype, tuple(DTYPES))
    one_of("train.recompute", t.recompute, RECOMPUTE_MODES)
    one_of("train.on_nonfinite", t.on_nonfinite, NONFINITE)
    need(t.stop_at >= 0, f"train.stop_at={t.stop_at} must be 0 (run to train.steps) or positive")
    need(t.stop_at == 0 or bool(checkpoint_dir),
         f"train.stop_at={t.stop_at} needs checkpoint.dir (the next launch resumes from its checkpoint)")
    if model.positions == "learned":
        need(t.seq_len <= model.max_seq_len,
             f"train.seq_len={t.seq_len} exceeds model.max_seq_len={model.max_seq_len}, the size of the "
             f"learned position table")
    _check_device(t)
    _check_fp8(t, model)


def _check_fp8(t, model: ModelConfig) -> None:
    one_of("train.fp8", t.fp8, FP8_RECIPES)
    need(0 <= 2 * t.fp8_bf16_blocks <= model.n_layers,
         f"train.fp8_bf16_blocks={t.fp8_bf16_blocks} must be between 0 and half of model.n_layers={model.n_layers} "
         f"(the first and the last that many blocks stay in bf16)")
    if t.fp8 == "none":
        return
    need(t.dtype == "bfloat16", f"train.fp8={t.fp8!r} needs train.dtype='bfloat16' (FP8 matmuls under bf16 "
                                f"autocast), not {t.dtype!r}; allowed with float32: 'none'")
    why = torchao_missing()
    need(why is None, f"train.fp8={t.fp8!r} needs torchao, which does not import here ({why}); install it: {FP8_INSTALL}")


def _check_device(t) -> None:
    one_of("train.device", t.device, DEVICES)
    one_of("train.kernels", t.kernels, KERNEL_CHOICES)
    if t.device == "cuda":
        need(torch.cuda.is_available(), "train.device='cuda' but this machine has no CUDA device; allowed: 'auto', 'cpu'")
    if t.kernels == "loom":
        on_gpu = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        why_not = loom_kernels_unavailable(torch.device("cuda" if on_gpu else "cpu"))
        need(why_not is None, f"train.kernels='loom' but loom's kernels cannot run here ({why_not}); "
                              f"allowed here: 'auto', 'torch'")
