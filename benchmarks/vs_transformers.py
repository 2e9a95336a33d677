"""loom vs Hugging Face transformers: training tokens/s on the same shape, for the Llama shape
(LlamaForCausalLM) and a GPT-2 shape (loom's GPT-3 family against GPT2LMHeadModel).

loom runs as the trainer builds it: the model, then the converter that installs loom's CPU
kernels (train.kernels='auto'). Both models get identical weights (ours copied into theirs through
the family's Hugging Face adapter), the same batches and the same
optimizer (torch AdamW, fused); each trains through its own path (loom: fused, chunked output
layer + loss; transformers: logits, then fp32 cross-entropy). Runs alternate in blocks within one
process so that machine noise hits both alike; the ratio is the median over blocks of the
loom / transformers rates of a block pair run back to back.

bf16 means autocast for both (fp32 master weights, bf16 matmuls with fp32 accumulation). On x86
CPUs without AVX512-BF16/AMX loom runs those bf16 products as fp32 products of the bf16-rounded
operands (loom.kernels.matmul: the same bf16 result, 3-4x faster there than PyTorch's bf16
kernels); the row "loom, PyTorch bf16 kernels" runs loom with PyTorch's kernels instead, so the
table shows what that choice contributes. --compile adds loom with `train.compile` (compiled
blocks); the default trainer, and the headline ratio, are eager.

Also reports loom's achieved model FLOP/s against this machine's measured matmul peak at
hidden 1024 (target >= 60%).

    python benchmarks/vs_transformers.py [--dtype float32|bfloat16|both] [--blocks 10] [--steps 3]
                                         [--compile] [--skip-peak]
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

from loom.metrics.flops import flops_per_token
from loom.metrics.meter import cpu_peak_flops, measure_matmul_flops
from loom.models import matmul as matmul_module
from loom.models.converters import convert_model
from loom.models.hf import adapter_for
from loom.models.registry import GPT3
from loom.models.transformer import ModelConfig
from loom.kernels.matmul import bf16_via_fp32
from loom.models.transformer import init_model


def loom_model(cfg: ModelConfig):
    """The model as the trainer runs it on CPU: built, then loom's kernels installed."""
    model = init_model(cfg, torch.device("cpu"), seed=0)
    convert_model(model, "auto", torch.device("cpu"))
    return model


def hf_model(cfg: ModelConfig, ours):
    """transformers' model of cfg's family (LlamaForCausalLM, GPT2LMHeadModel) with our weights."""
    import transformers

    adapter = adapter_for(cfg)
    config = adapter.hf_config(cfg, "float32")
    config.pop("architectures"), config.pop("torch_dtype")
    hf_cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **{**config, "use_cache": False})
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    params, loom_params = dict(model.named_parameters()), dict(ours.named_parameters())
    with torch.no_grad():
        for key, (sources, combine) in adapter.export_rules(cfg).items():
            params[key].copy_(combine(*(loom_params[n] for n in sources)))
    return model.train()


def make_step(model, loss_fn, dtype: torch.dtype):
    """One training step: loss_fn(inputs, labels) -> mean loss, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else None

    def step(inputs, labels):
        if ctx:
            with ctx():
                loss = loss_fn(inputs, labels)
        else:
            loss = loss_fn(inputs, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def compare(cfg: ModelConfig, seq_len: int, batch: int, dtype: torch.dtype, blocks: int, steps: int,
            with_hf: bool = True, with_peak: bool = False, variants: bool = False,
            compiled: bool = False) -> dict:
    """Median tokens/s of each runner and, against transformers, the median over blocks of each
    loom runner's rate over transformers' rate in the same block. with_peak also measures the
    matmul peak in every block, so that the fraction of peak compares figures taken under the
    same machine load. variants: also loom with PyTorch's own bf16 kernels (where loom would widen
    them); compiled: also loom with compiled blocks."""
    ours = loom_model(cfg)
    runners = {"loom": make_step(ours, lambda x, y: ours(x, labels=y), dtype)}
    if variants and dtype == torch.bfloat16 and bf16_via_fp32(torch.device("cpu")):
        native = loom_model(cfg)
        native_step = make_step(native, lambda x, y: native(x, labels=y), dtype)

        def pytorch_bf16_kernels(x, y):
            with mock.patch.object(matmul_module, "cpu_lacks_bf16_arithmetic", lambda: False):
                return native_step(x, y)

        runners["loom, PyTorch bf16 kernels"] = pytorch_bf16_kernels
    if compiled:
        comp = loom_model(cfg)
        for block in comp.layers.values():
            block.compile()
        runners["loom, compiled blocks"] = make_step(comp, lambda x, y: comp(x, labels=y), dtype)
    if with_hf:
        theirs = hf_model(cfg, ours)
        runners["transformers"] = make_step(
            theirs,
            lambda x, y: F.cross_entropy(theirs(input_ids=x).logits.flatten(0, 1).float(), y.flatten()),
            dtype,
        )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    first = {name: run(inputs, labels) for name, run in runners.items()}  # also warms up (compiles)
    for run in runners.values():
        run(inputs, labels)
    times: dict[str, list[float]] = {name: [] for name in runners}
    block_ratios: dict[str, list[float]] = {name: [] for name in runners if name != "transformers"}
    peak_fractions: list[float] = []
    peaks: list[float] = []
    tokens_per_step = batch * seq_len
    for _ in range(blocks):
        block_rate = {}
        for name, run in runners.items():
            block = []
            for _ in range(steps):
                t0 = time.perf_counter()
                run(inputs, labels)
                block.append(time.perf_counter() - t0)
            times[name] += block
            block_rate[name] = tokens_per_step / statistics.median(block)
        if with_hf:
            for name in block_ratios:
                block_ratios[name].append(block_rate[name] / block_rate["transformers"])
        if with_peak:
            peak = measure_matmul_flops(dtype, repeats=5, warmup_s=0.2)
            peaks.append(peak)
            peak_fractions.append(block_rate["loom"] * flops_per_token(cfg, seq_len, "megatron") / peak)
    out = {"rate": {name: tokens_per_step / statistics.median(ts) for name, ts in times.items()},
           "first_loss": first}
    if with_hf:
        out["ratio"] = {name: (statistics.median(r), min(r), max(r)) for name, r in block_ratios.items()}
    if with_peak:
        out["peak"] = statistics.median(peaks)
        out["fraction_of_peak"] = statistics.median(peak_fractions)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="also loom with compiled blocks")
    ap.add_argument("--skip-peak", action="store_true", help="skip the hidden-1024 fraction-of-peak table")
    args = ap.parse_args()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 products widened to fp32: {bf16_via_fp32(torch.device('cpu'))}")

    shapes = {
        "Llama (LlamaForCausalLM)": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=768,
                                                vocab_size=args.vocab),
        "GPT-2 (GPT2LMHeadModel)": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=1024,
                                               **{**GPT3, "vocab_size": args.vocab}),
    }
    print(f"\n## loom vs transformers: 4 layers, hidden 256, 8 heads, vocab {args.vocab}, seq 1024, batch 1, "
          f"AdamW (ffn 768 SwiGLU for Llama, 1024 GeLU for GPT-2)")
    print("(ratio: median over blocks of loom / transformers, each block pair run back to back; "
          "range over blocks in brackets)")
    print("| shape | dtype | runner | tokens/s | vs transformers | first loss |")
    print("|---|---|---|---:|---:|---:|")
    for label, shape in shapes.items():
        for name in dtypes:
            r = compare(shape, 1024, 1, getattr(torch, name), args.blocks, args.steps, variants=True,
                        compiled=args.compile)
            for runner, rate in r["rate"].items():
                if runner == "transformers":
                    ratio = "1"
                else:
                    med, lo, hi = r["ratio"][runner]
                    ratio = f"{med:.2f}x [{lo:.2f}-{hi:.2f}]"
                print(f"| {label} | {name} | {runner} | {rate:,.0f} | {ratio} | {r['first_loss'][runner]:.4f} |",
                      flush=True)
    if args.skip_peak:
        return

    big = ModelConfig(dim=1024, n_layers=4, n_heads=16, n_kv_heads=16, ffn_dim=2816, vocab_size=args.vocab)
    print("\n## loom achieved model FLOP/s vs measured matmul peak: hidden 1024, 4 layers, 16 heads, "
          "ffn 2816, seq 1024, batch 1")
    print("(peak: a 2048^3 matmul through loom's kernel for the dtype, measured after every block of "
          "model steps; fraction: median over blocks)")
    print("| dtype | tokens/s | model TFLOP/s | matmul peak TFLOP/s (same run) | fraction of peak | cached calibration |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in dtypes:
        dtype = getattr(torch, name)
        r = compare(big, 1024, 1, dtype, max(4, args.blocks // 2), 2, with_hf=False, with_peak=True)
        achieved = r["rate"]["loom"] * flops_per_token(big, 1024, "megatron")
        print(f"| {name} | {r['rate']['loom']:,.0f} | {achieved / 1e12:.4f} | {r['peak'] / 1e12:.4f} | "
              f"{r['fraction_of_peak']:.1%} | {cpu_peak_flops(dtype) / 1e12:.4f} |", flush=True)


if __name__ == "__main__":
    main()
