"""Model converters: applied to a built model (on the meta device) after construction and before
parallelization, in a fixed order (torchtitan's model converters). Today: loom's CPU kernels
(`train.kernels`), LoRA adapters (`[lora]`) and FP8 linears (`train.fp8`).

`train.kernels`:
    torch  PyTorch's ops everywhere (the model as built).
    loom   loom's AVX-512 CPU kernels for attention, RMSNorm, SwiGLU, RoPE and the fused loss
           (loom.models.kernel_parts); an error before anything starts where they cannot run.
    auto   loom's kernels where they run (a CPU run on a machine that builds them), else
           PyTorch's, and `kernels_status` says why once.
LayerNorm and GeLU keep PyTorch's ops in every mode (no kernel of loom's pays there).
"""
from __future__ import annotations

import torch
from torch import nn

KERNEL_CHOICES = ("auto", "loom", "torch")


def loom_kernels_unavailable(device: torch.device) -> str | None:
    """None where loom's CPU kernels can run for a model on `device`, else why not."""
    if device.type != "cpu":
        return f"loom's kernels are CPU kernels and the run is on {device.type}"
    from loom.kernels import library

    if not library.available():
        return library.status()
    return None


def resolve_kernels(choice: str, device: torch.device) -> tuple[bool, str]:
    """(whether to install loom's kernels, a line saying which kernels run and why)."""
    if choice == "torch":
        return False, "PyTorch ops (train.kernels='torch')"
    why_not = loom_kernels_unavailable(device)
    if why_not is None:
        from loom.kernels import library

        return True, library.status()
    if choice == "loom":
        raise RuntimeError(f"train.kernels='loom' but loom's kernels cannot run here: {why_not}; "
                           f"allowed here: 'auto', 'torch'")
    if device.type == "cuda":
        return False, "PyTorch CUDA ops (SDPA flash / memory-efficient attention)"
    return False, f"PyTorch ops ({why_not})"


def install_cpu_kernels(model: nn.Module) -> list[str]:
    """Swap the model's plain parts for loom's kernel-backed ones, in place; returns which
    kernels the model now runs (attention, loss, RMSNorm, SwiGLU, RoPE: those its family has).
    Parameters (and their names) are unchanged."""
    from loom.kernels.cpu_attention import LOOM_CPU_ATTENTION
    from loom.models.attention import CoreAttention
    from loom.models.kernel_parts import SWAPS, as_kernel_module

    installed = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in SWAPS:
                installed.add(SWAPS[type(child)].kernel_name)
                setattr(parent, name, as_kernel_module(child))
            elif isinstance(child, CoreAttention):
                child.kernel = LOOM_CPU_ATTENTION
                installed.add("attention")
    order = ["attention", *(kernel.kernel_name for kernel in SWAPS.values())]
    return sorted(installed, key=order.index)


def convert_model(model: nn.Module, kernels: str, device: torch.device,
                  dtype: torch.dtype = torch.float32, fp8: str = "none", float8_gather: bool = False,
                  fp8_bf16_blocks: int = 0, lora=None) -> str:
    """Apply the converters the config asks for, in loom's fixed order (kernels, LoRA, FP8);
    returns the kernel line for the run's summary. dtype: the run's compute dtype, for what runs
    widened in bf16; fp8: train.fp8; float8_gather: the model will be FSDP-sharded (FP8 weights
    are then gathered as float8); fp8_bf16_blocks: train.fp8_bf16_blocks; lora: a
    loom.models.lora.LoRASpec, or None."""
    use_loom, line = resolve_kernels(kernels, device)
    if use_loom:
        from loom.kernels.cpu_attention import bf16_widening

        installed = install_cpu_kernels(model)
        line = f"loom AVX-512 CPU kernels ({', '.join(installed)})"
        if dtype == torch.bfloat16:
            line += f"; {bf16_widening(installed, model.cfg.head_dim)}"
    if lora is not None:
        from loom.models.lora import apply_lora

        adapted = apply_lora(model, lora)
        line += f"; LoRA rank {lora.rank} on {len(adapted)} projections ({', '.join(lora.targets)}), the rest frozen"
    if fp8 != "none":
        from loom.models.fp8 import apply_fp8

        emulate = device.type != "cuda"
        converted = apply_fp8(model, fp8, emulate, float8_gather, fp8_bf16_blocks)
        line += (f"; FP8 {fp8} (torchao{', emulated' if emulate else ''}) in {len(converted)} linears, "
                 f"the output layer in bf16")
    return line
