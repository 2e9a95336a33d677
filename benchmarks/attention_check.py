"""loom's attention kernel interface on a device against an fp64 reference computed on the CPU:
the output, the log-sum-exp and the three gradients, dense (causal and bidirectional, GQA) and
over packed documents (the tiles a packed sequence is cut into). Prints one row per case and
exits non-zero if any error passes its bound.

    python benchmarks/attention_check.py --device cuda [--length 2048 --head-dim 128]
    python benchmarks/attention_check.py --device cpu --length 128 --head-dim 32   # smoke size

Bounds, relative to each tensor's largest reference value: fp32 2e-4, bf16 3e-2 (bf16 rounds
to 8 significant bits; flash kernels also round the probabilities before the second product).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loom.kernels.attention import TORCH_ATTENTION, attention_backward, attention_forward  # noqa: E402
from loom.models.attention import CoreAttention, document_starts  # noqa: E402

BOUNDS = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def reference(q, k, v, dout, mask):
    """fp64 attention on the CPU: (out, lse, dq, dk, dv); mask [L, L] bool, True = visible."""
    q, k, v = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask.cpu(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vv
    out.backward(dout.double().cpu())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def inputs(device, dtype, length: int, head_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(2, h, length, head_dim, generator=g).to(device, dtype)  # noqa: E731
    return make(8), make(4), make(4), make(8)  # q (8 heads), k and v (4: GQA), dout


def dense_case(device, dtype, length, head_dim, causal: bool) -> dict:
    q, k, v, dout = inputs(device, dtype, length, head_dim, 0)
    scale = head_dim ** -0.5
    out, lse = attention_forward(q, k, v, causal, scale, kernel=TORCH_ATTENTION)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal, scale, kernel=TORCH_ATTENTION)
    mask = torch.ones(length, length, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    want = reference(q, k, v, dout, mask)
    return dict(zip(("out", "lse", "dq", "dk", "dv"), (rel(a, b) for a, b in zip((out, lse, dq, dk, dv), want))))


def packed_case(device, dtype, length, head_dim) -> dict:
    """Three documents of uneven lengths in one sequence (causal, as training packs them): the
    tiled path, through autograd, against the block-diagonal causal reference."""
    q, k, v, dout = inputs(device, dtype, length, head_dim, 1)
    cuts = [0, length // 5, length // 5 + length // 2, length]
    documents = torch.zeros(2, length, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        documents[:, a:b] = i
    leaf = [x.detach().requires_grad_() for x in (q, k, v)]
    out = CoreAttention(causal=True)(*leaf, doc_starts=document_starts(documents))
    out.backward(dout)
    same_doc = documents[0][:, None] == documents[0][None, :]
    want = reference(q, k, v, dout, same_doc & torch.ones(length, length, dtype=torch.bool).tril())
    got = (out, None, *(x.grad for x in leaf))
    return {name: rel(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want) if a is not None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    device = torch.device(a.device)
    print(f"attention on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"batch 2, 8 query / 4 kv heads, length {a.length}, head_dim {a.head_dim}; max error relative to the "
          "fp64 reference's largest value")
    print(f"{'case':<28}{'out':>10}{'lse':>10}{'dq':>10}{'dk':>10}{'dv':>10}  result")
    failed = 0
    for dtype in (torch.bfloat16, torch.float32):
        cases = {f"{str(dtype)[6:]} causal": lambda: dense_case(device, dtype, a.length, a.head_dim, True),
                 f"{str(dtype)[6:]} bidirectional": lambda: dense_case(device, dtype, a.length, a.head_dim, False),
                 f"{str(dtype)[6:]} packed documents": lambda: packed_case(device, dtype, a.length, a.head_dim)}
        for name, run in cases.items():
            errors = run()
            ok = all(e <= BOUNDS[dtype] for e in errors.values())
            failed += not ok
            cells = "".join(f"{errors[k]:>10.1e}" if k in errors else f"{'-':>10}" for k in ("out", "lse", "dq", "dk", "dv"))
            print(f"{name:<28}{cells}  {'ok' if ok else f'FAILED (bound {BOUNDS[dtype]:g})'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
