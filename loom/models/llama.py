"""Llama (2, 3, 3.1) as plain single-device PyTorch. No torch.distributed here: parallelism is
applied from outside, after construction (see loom.parallel).

Build on the meta device, then materialize and initialize:

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)

Shapes: B batch, L local sequence length, D model dim, H query heads, K kv heads, E head dim,
F feed-forward dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.attention import CoreAttention, document_starts
from loom.models.init import InitSpec, fill_region
from loom.models.loss import linear_cross_entropy
from loom.kernels import cpu_kernels
from loom.models.matmul import Linear


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths are stretched by `factor`, short ones kept,
    and the band between is interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096  # the published context length; longer sequences still run

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [E/2] in fp64, with the Llama 3.1 scaling when configured."""
    e = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float64) / e))
    s = cfg.rope_scaling
    if s is not None:
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
        high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
        smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > low_freq_wavelen,
            inv_freq / s.factor,
            torch.where(wavelen < high_freq_wavelen, inv_freq, interpolated),
        )
    return inv_freq


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [L] or [B, L] (global token positions) -> cos, sin [L, E/2] or [B, L, E/2], fp32.

    Angles are formed in fp64: at position 10^6 an fp32 angle is off by up to 0.06 rad, which
    would blur exactly the long-context positions loom is built for.
    """
    angles = positions.to(torch.float64)[..., None] * rope_inv_freq(cfg).to(positions.device)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, E] -> (x1 cos - x2 sin, x2 cos + x1 sin), x1 and x2 its halves along E.

    Eagerly each half is written in place into one output (a product, then a fused multiply-add):
    three times faster on CPU than forming four products and concatenating them. Under
    torch.compile the plain formula, which the compiler fuses itself (and which, unlike writes
    into views of an output, it can trace)."""
    half = x.shape[-1] // 2
    cos = cos.unsqueeze(-2).to(x.dtype)  # [(B,) L, 1, E/2] against x [B, L, H, E/2]
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    if torch.compiler.is_compiling():
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin)
    return out


class _Rope(torch.autograd.Function):
    """A rotation's gradient is the rotation by the opposite angle, so nothing of x is saved
    (autograd through the formula would keep q and k before rotation in every layer)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        if cpu_kernels.rope_supports(x, cos, sin):  # fp32 on CPU: one pass
            return cpu_kernels.rope(x, cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad.contiguous()
        if cpu_kernels.rope_supports(grad, cos, sin):
            return cpu_kernels.rope(grad, cos, sin, sign=-1.0), None, None
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + E/2]) by the position's angle (the Hugging Face layout, so
    published checkpoints load without permuting). x [B, L, H, E]; cos, sin [L, E/2] or
    [B, L, E/2]."""
    return _Rope.apply(x, cos, sin)


class _RMSNormFn(torch.autograd.Function):
    """y = x / rms(x) * w, in at least fp32 whatever the compute dtype (bf16 sums of squares lose
    too much). Saves x and the per-row 1/rms only; the backward is written out, which here is
    about a quarter faster than autograd through the formula and keeps fewer tensors alive.

    x [..., D], w [D]; dx = (g*w - xhat * mean(g*w*xhat)) / rms, dw = sum over rows of g*xhat.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        if cpu_kernels.rms_norm_supports(x, weight):  # fp32 on CPU: one fused pass
            y, rstd = cpu_kernels.rms_norm_forward(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        if cpu_kernels.rms_norm_supports(x, weight):
            dx, dw = cpu_kernels.rms_norm_backward(grad, x, weight, rstd)
            return dx, dw, None
        xhat = x.to(rstd.dtype) * rstd
        g = grad.to(rstd.dtype)
        grad_weight = (g * xhat).flatten(0, -2).sum(0)
        gw = g * weight.to(rstd.dtype)
        dot = (gw * xhat).mean(-1, keepdim=True)
        grad_x = gw.sub_(xhat.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.core_attention = CoreAttention()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                doc_starts: list[list[int]] | None = None) -> torch.Tensor:
        """x [B, L, D]; rope (cos, sin) [(B,) L, E/2], or None for positions 0..L-1 of this x;
        doc_starts: per sample, where the documents of the whole sequence start (packed
        documents, see `document_starts`), or None."""
        b, l, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, l, -1, self.head_dim)
        k = self.wk(x).view(b, l, -1, self.head_dim)
        v = self.wv(x).view(b, l, -1, self.head_dim)
        # Derived here, not upstream: a later pipeline stage under sequence parallelism only sees
        # its shard of the sequence, while attention sees the gathered whole.
        cos, sin = rope if rope is not None else rope_cos_sin(self.cfg, torch.arange(l, device=q.device))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc_starts)
        return self.wo(out.transpose(1, 2).reshape(b, l, -1))


class _SwiGLUFn(torch.autograd.Function):
    """silu(a) * b in one pass each way (loom's CPU kernel); saves a and b only."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return cpu_kernels.swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, grad):
        return cpu_kernels.swiglu_backward(grad, *ctx.saved_tensors)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b: a, b [..., F]."""
    if cpu_kernels.swiglu_supports(a, b):
        return _SwiGLUFn.apply(a, b)
    return F.silu(a) * b


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                doc_starts: list[list[int]] | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, doc_starts=doc_starts)
        return x + self.feed_forward(self.ffn_norm(x))


class OutputLayer(Linear):
    """The output projection [V, D], and with labels the loss: h [B, L, D] -> logits [B, L, V],
    or with labels [B, L] the mean cross-entropy, fused and chunked so that the logits are never
    materialized (see loom.models.loss). One module for both, so that whoever shards the
    output layer (tensor parallelism over the vocabulary, FSDP) also shards the loss."""

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, labels)


class Transformer(nn.Module):
    """tokens [B, L] -> logits [B, L, V], or with labels [B, L] -> mean loss (fp32 scalar)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A dict keyed by layer index, so that a pipeline stage can drop layers and keep the
        # parameter names (and so checkpoints) of the full model.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = OutputLayer(cfg.dim, cfg.vocab_size)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, L] int64; positions [L] or [B, L] global positions (default: 0..L-1 of the
        sequence attention sees); documents [B, S] int, a document id per token of the whole
        sequence (S = L, or L x cp under context parallelism), for packed documents: attention
        never crosses a document boundary. None: one causal sequence.

        Without labels: logits [B, L, V]. With labels [B, L]: the mean cross-entropy, computed
        by the fused, chunked output layer so that the logits are never materialized.
        A pipeline stage lacks some parts (set to None): without the embedding it takes hidden
        states [B, L, D]; without the output layer it returns them (and ignores labels).
        """
        rope = rope_cos_sin(self.cfg, positions) if positions is not None else None
        # Once per forward, not per layer: every layer masks alike (and on GPUs reading the
        # boundaries back to the host is a synchronization).
        doc_starts = document_starts(documents) if documents is not None else None
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, rope, doc_starts)
        if self.output is None:
            return h
        return self.output(self.norm(h), labels)

    def init_spec(self, name: str, std: float = 0.02) -> InitSpec:
        """How parameter `name` (a full-model name) starts. Norm gains are ones; matrices are
        normal (embedding) or truncated normal; the output projections of each block are scaled
        by 1/sqrt(2 * n_layers) (GPT-2 / Megatron), so the residual stream does not grow with
        depth; the output layer has std dim^-1/2."""
        if name.endswith("norm.weight"):
            return InitSpec("ones")
        if name == "tok_embeddings.weight":
            return InitSpec("normal", std)
        if name == "output.weight":
            return InitSpec("trunc_normal", self.cfg.dim ** -0.5)
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return InitSpec("trunc_normal", std / math.sqrt(2 * self.cfg.n_layers))
        return InitSpec("trunc_normal", std)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter of this (unsharded) model from `seed`. The values are a
        pure function of (seed, parameter name, element index) (see loom.models.init), so a
        sharded model initialized shard by shard (loom.parallel.init) holds the same bits."""
        for name, param in self.named_parameters():
            fill_region(param, name, tuple(param.shape), (0,) * param.ndim, self.init_spec(name), seed)


def build_model(cfg: LlamaConfig, device: torch.device | str = "meta") -> Transformer:
    """Construct without allocating (on meta) or directly on a device, uninitialized."""
    with torch.device(device):
        return Transformer(cfg)
