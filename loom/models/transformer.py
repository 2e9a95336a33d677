"""One transformer of named parts, as plain single-device PyTorch: Llama, GPT-3, Nemotron and BERT
are configurations of it. No torch.distributed and no kernel choice here: parallelism is applied
from outside after construction (loom.parallel), and loom's CPU kernels are installed by a
converter (loom.models.converters) that swaps the parts below for kernel-backed ones.

Build on the meta device, then materialize and initialize:

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)

The parts a config chooses:
    norm        rmsnorm | layernorm (with bias) | layernorm1p (LayerNorm with zero-centred gain:
                scale = 1 + weight, as Megatron's layernorm_zero_centered_gamma)
    mlp         swiglu (w2(silu(w1 x) * w3 x)) | gelu (tanh approximation, as Megatron's fused
                bias-GeLU) | gelu-erf (exact GeLU, BERT's checkpoints) | squared-relu (relu(w1 x)^2)
    positions   rope (over a fraction of each head, Llama 3.1 scaling optional) | learned
    bias        biases on every linear layer (yes/no); tied or untied embeddings; causal or
                bidirectional attention; head dimension independent of dim / n_heads
    norm_position  pre (GPT-2 onwards) | post (BERT: norm after each residual addition)
BERT adds token-type embeddings, a norm after the embeddings, and the masked-LM head (dense,
GeLU, norm) before the output layer tied to the embedding, with a bias.

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
from loom.kernels.matmul import Linear, linear
from loom.settings import need, one_of

NORMS = ("rmsnorm", "layernorm", "layernorm1p")
MLPS = ("swiglu", "gelu", "gelu-erf", "squared-relu")
POSITIONS = ("rope", "learned")
NORM_POSITIONS = ("pre", "post")
FAMILIES = ("llama", "gpt3", "nemotron", "bert", "mixtral")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths are stretched by `factor`, short ones kept,
    and the band between is interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    family: str = "llama"  # selects the Hugging Face architecture and names the FLOPs formula
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    positions: str = "rope"
    norm_position: str = "pre"
    bias: bool = False
    tie_embeddings: bool = False
    causal: bool = True
    kv_channels: int | None = None  # head dimension; None: dim // n_heads (Megatron's name)
    rotary_fraction: float = 1.0  # of each head's dimensions that RoPE rotates (Megatron: rotary_percent)
    token_types: int = 0  # BERT's segment embeddings (0: none)
    mlm_head: bool = False  # BERT's dense + GeLU + norm before the output layer, which has a bias
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096  # the published context length; with learned positions, the table size
    init_std: float = 0.02
    # Mixture of experts (loom.models.moe): moe_experts > 0 replaces every block's MLP by
    # moe_experts SwiGLU experts of hidden size ffn_dim, moe_top_k of them per token.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float | None = None  # None: dropless
    moe_aux_loss_coeff: float = 0.01
    moe_z_loss_coeff: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (even; 0 with learned positions)."""
        if self.positions != "rope":
            return 0
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    @property
    def gated(self) -> bool:
        return self.mlp == "swiglu"


# -- positions -----------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [R/2] (R = cfg.rotary_dim) in fp64, with the Llama 3.1 scaling when
    configured."""
    e = cfg.rotary_dim
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


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [L] or [B, L] (global token positions) -> cos, sin [L, R/2] or [B, L, R/2], fp32.

    Angles are formed in fp64: at position 10^6 an fp32 angle is off by up to 0.06 rad, which
    would blur exactly the long-context positions loom is built for.
    """
    angles = positions.to(torch.float64)[..., None] * rope_inv_freq(cfg).to(positions.device)
    return angles.cos().float(), angles.sin().float()


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, R] -> (x1 cos - x2 sin, x2 cos + x1 sin), x1 and x2 its halves along R.

    Eagerly each half is written in place into one output (a product, then a fused multiply-add):
    three times faster on CPU than forming four products and concatenating them. Under
    torch.compile the plain formula, which the compiler fuses itself."""
    half = x.shape[-1] // 2
    cos = cos.unsqueeze(-2).to(x.dtype)  # [(B,) L, 1, R/2] against x [B, L, H, R/2]
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    if torch.compiler.is_compiling():
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin)
    return out


class _RotateFn(torch.autograd.Function):
    """A rotation's gradient is the rotation by the opposite angle, so nothing of x is saved
    (autograd through the formula would keep q and k before rotation in every layer)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate_halves(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate_halves(grad.contiguous(), cos, -sin), None, None


class Rotary(nn.Module):
    """RoPE on the first R dimensions of each head, pairs (i, i + R/2) (the Hugging Face layout,
    so published checkpoints load without permuting); the rest pass through (Nemotron rotates
    half of each head). x [B, L, H, E]; cos, sin [L, R/2] or [B, L, R/2]."""

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _RotateFn.apply(x, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = 2 * cos.shape[-1]
        if r == x.shape[-1]:
            return self.rotate(x, cos, sin)
        return torch.cat((self.rotate(x[..., :r].contiguous(), cos, sin), x[..., r:]), dim=-1)


# -- norms ---------------------------------------------------------------------------------------
class _RMSNormFn(torch.autograd.Function):
    """y = x / rms(x) * w, in at least fp32 whatever the compute dtype (bf16 sums of squares lose
    too much). Saves x and the per-row 1/rms only; the backward is written out, which here is
    about a quarter faster than autograd through the formula and keeps fewer tensors alive.

    x [..., D], w [D]; dx = (g*w - xhat * mean(g*w*xhat)) / rms, dw = sum over rows of g*xhat.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
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


class LayerNorm(nn.Module):
    """LayerNorm with bias, computed in fp32. zero_centered: the gain is 1 + weight (Megatron's
    layernorm1p; weight starts at 0, so weight decay pulls the gain to 1)."""

    def __init__(self, dim: int, eps: float, zero_centered: bool = False):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In at least fp32 whatever the input's and the parameters' dtypes (FSDP may gather them
        # in bf16), returned in the input's dtype, like RMSNorm.
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        if self.zero_centered:
            weight = weight + 1
        return F.layer_norm(x.to(dtype), (x.shape[-1],), weight, bias, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return LayerNorm(dim, cfg.norm_eps, zero_centered=cfg.norm == "layernorm1p")


# -- attention -----------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.rotary = Rotary() if cfg.positions == "rope" else None
        self.core_attention = CoreAttention(causal=cfg.causal)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                doc_starts: list[list[int]] | None = None) -> torch.Tensor:
        """x [B, L, D]; rope (cos, sin) [(B,) L, R/2], or None for positions 0..L-1 of this x;
        doc_starts: per sample, where the documents of the whole sequence start (packed
        documents, see `document_starts`), or None."""
        b, l, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, l, -1, self.head_dim)
        k = self.wk(x).view(b, l, -1, self.head_dim)
        v = self.wv(x).view(b, l, -1, self.head_dim)
        if self.rotary is not None:
            # Derived here, not upstream: a later pipeline stage under sequence parallelism only
            # sees its shard of the sequence, while attention sees the gathered whole.
            cos, sin = rope if rope is not None else rope_cos_sin(self.cfg, torch.arange(l, device=q.device))
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc_starts)
        return self.wo(out.transpose(1, 2).reshape(b, l, -1))


# -- feed-forward --------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """silu(a) * b: a, b [..., F]."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.silu(a) * b


class Activation(nn.Module):
    """The ungated activations: gelu (tanh approximation), gelu-erf, squared-relu."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.kind == "squared-relu":
            return F.relu(a).square()
        return F.gelu(a, approximate="tanh" if self.kind == "gelu" else "none")

    def extra_repr(self) -> str:
        return self.kind


class FeedForward(nn.Module):
    """Gated (swiglu): w2(act(w1 x, w3 x)); ungated: w2(act(w1 x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.bias) if cfg.gated else None
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, bias=cfg.bias)
        self.act = SwiGLU() if cfg.gated else Activation(cfg.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(self.act(self.w1(x), self.w3(x)))
        return self.w2(self.act(self.w1(x)))


def make_moe(cfg: ModelConfig) -> nn.Module:
    from loom.models.moe import MoE

    return MoE(cfg.dim, cfg.ffn_dim, cfg.moe_experts, cfg.moe_top_k, cfg.moe_capacity_factor,
               cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = make_moe(cfg) if cfg.moe_experts else FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                doc_starts: list[list[int]] | None = None) -> torch.Tensor:
        if self.post_norm:  # BERT: normalize the sum after each residual addition
            x = self.attention_norm(x + self.attention(x, rope, doc_starts=doc_starts))
            return self.ffn_norm(x + self.feed_forward(x))
        x = x + self.attention(self.attention_norm(x), rope, doc_starts=doc_starts)
        return x + self.feed_forward(self.ffn_norm(x))


# -- the ends ------------------------------------------------------------------------------------
class MaskedLMHead(nn.Module):
    """BERT's transform before the output layer: norm(gelu(dense(h))), [B, L, D] -> [B, L, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.dim, cfg.dim, bias=True)
        self.act = Activation("gelu-erf" if cfg.mlp == "gelu-erf" else "gelu")
        self.norm = make_norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class OutputLayer(nn.Module):
    """The output projection [V, D] (and bias [V] for BERT), and with labels the loss:
    h [B, L, D] -> logits [B, L, V], or with labels [B, L] the mean cross-entropy, fused and
    chunked so that the logits are never materialized (see loom.models.loss). One module for
    both, so that whoever shards the output layer (tensor parallelism over the vocabulary, FSDP)
    also shards the loss. `softmax_cross_entropy` is the per-chunk kernel (PyTorch's ops here;
    loom's CPU kernel once the converter installs it).

    Tied to the embedding (tied_to), the layer has no weight of its own: it reads the embedding
    module's weight at every call, so whatever replaces that parameter (materialization, FSDP's
    gathering, tensor parallelism) the two stay one."""

    softmax_cross_entropy = None  # None: loom.models.loss's PyTorch implementation

    def __init__(self, dim: int, vocab_size: int, bias: bool = False, tied_to: nn.Module | None = None):
        super().__init__()
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        else:
            object.__setattr__(self, "tied_to", tied_to)  # not a child: its parameter is the embedding's
        self.bias = nn.Parameter(torch.empty(vocab_size)) if bias else None

    @property
    def tied(self) -> bool:
        return "tied_to" in self.__dict__

    def projection(self) -> torch.Tensor:
        """The weight [V, D]: the embedding's when tied."""
        return self.tied_to.weight if self.tied else self.weight

    def untie(self) -> None:
        """Give the layer its own weight, shaped like the embedding's (a pipeline's last stage
        that does not hold the embedding; loom.parallel.pipeline keeps the two equal)."""
        weight = self.tied_to.weight
        del self.__dict__["tied_to"]
        self.weight = nn.Parameter(torch.empty_like(weight), requires_grad=weight.requires_grad)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                loss_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return linear(h, self.projection(), self.bias)
        return linear_cross_entropy(h, self.projection(), labels, self.bias, self.softmax_cross_entropy, loss_tokens)


def embedding(num: int, dim: int) -> nn.Embedding:
    """A lookup table [num, dim], uninitialized like every parameter here (init_weights, or
    loom.parallel.init for shards, fills it): nn.Embedding's own normal_ init would also cost a
    second on the meta device, where torch runs it through its Python reference ops."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class Transformer(nn.Module):
    """tokens [B, L] -> logits [B, L, V], or with labels [B, L] -> mean loss (fp32 scalar)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        self.type_embeddings = embedding(cfg.token_types, cfg.dim) if cfg.token_types else None
        self.embed_norm = make_norm(cfg) if cfg.norm_position == "post" else None
        # A dict keyed by layer index, so that a pipeline stage can drop layers and keep the
        # parameter names (and so checkpoints) of the full model.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.head = MaskedLMHead(cfg) if cfg.mlm_head else None
        self.output = OutputLayer(cfg.dim, cfg.vocab_size, bias=cfg.mlm_head,
                                  tied_to=self.tok_embeddings if cfg.tie_embeddings else None)
        self.first_stage, self.last_stage = True, True  # a pipeline split changes these

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None,
              token_types: torch.Tensor | None) -> torch.Tensor:
        """tokens [B, L] -> h [B, L, D]: token, learned position and token-type embeddings."""
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            if positions is None:
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
            h = h + self.pos_embeddings(positions)
        if self.type_embeddings is not None:
            h = h + self.type_embeddings(token_types if token_types is not None else torch.zeros_like(tokens))
        return self.embed_norm(h) if self.embed_norm is not None else h

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        loss_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, L] int64; positions [L] or [B, L] global positions (default: 0..L-1 of the
        sequence attention sees); documents [B, S] int, a document id per token of the whole
        sequence (S = L, or L x cp under context parallelism), for packed documents: attention
        never crosses a document boundary. None: one sequence. token_types [B, L] (BERT).
        loss_tokens [B]: what the loss's mean divides by, per sample (loom.models.loss.loss_divisor);
        None: this call's valid labels.

        Without labels: logits [B, L, V]. With labels [B, L]: the mean cross-entropy, computed
        by the fused, chunked output layer so that the logits are never materialized.
        A pipeline stage lacks some parts: a later stage takes hidden states [B, L, D] for
        tokens; an earlier one returns them (and ignores labels).
        """
        rope = None
        if positions is not None and self.cfg.positions == "rope":
            rope = rope_cos_sin(self.cfg, positions)
        # Once per forward, not per layer: every layer masks alike (and on GPUs reading the
        # boundaries back to the host is a synchronization).
        doc_starts = document_starts(documents) if documents is not None else None
        h = self.embed(tokens, positions, token_types) if self.first_stage else tokens
        for layer in self.layers.values():
            h = layer(h, rope, doc_starts)
        if not self.last_stage:
            return h
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None:
            h = self.head(h)
        return self.output(h, labels, loss_tokens)

    # -- initialization ------------------------------------------------------------------------
    def init_spec(self, name: str) -> InitSpec:
        """How parameter `name` (a full-model name) starts. Norm gains are ones (zeros for
        layernorm1p's zero-centred gain), biases zeros; embeddings normal; other matrices
        truncated normal with the config's std, the output projections of each block scaled by
        1/sqrt(2 * n_layers) (GPT-2 / Megatron) so the residual stream does not grow with depth;
        an untied output layer has std dim^-1/2. A tied output layer has no weight of its own,
        except a pipeline stage's copy: it starts as the embedding (same seed key)."""
        std = self.cfg.init_std
        if name.endswith("bias"):
            return InitSpec("zeros")
        if "norm" in name.rsplit(".", 2)[-2]:
            return InitSpec("zeros" if self.cfg.norm == "layernorm1p" else "ones")
        if name == "output.weight" and self.cfg.tie_embeddings:
            return InitSpec("normal", std, key="tok_embeddings.weight")
        if name.endswith("embeddings.weight"):
            return InitSpec("normal", std)
        if name == "output.weight":
            return InitSpec("trunc_normal", self.cfg.dim ** -0.5)
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts.w2")):
            return InitSpec("trunc_normal", std / math.sqrt(2 * self.cfg.n_layers))
        return InitSpec("trunc_normal", std)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter of this (unsharded) model from `seed`. The values are a
        pure function of (seed, parameter name, element index) (see loom.models.init), so a
        sharded model initialized shard by shard (loom.parallel.init) holds the same bits."""
        for name, param in self.named_parameters():
            fill_region(param, name, tuple(param.shape), (0,) * param.ndim, self.init_spec(name), seed)


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> Transformer:
    """Construct without allocating (on meta) or directly on a device, uninitialized."""
    with torch.device(device):
        return Transformer(cfg)


def init_model(cfg: ModelConfig, device: torch.device | str, seed: int) -> Transformer:
    """A whole model on one device, initialized from `seed` (tests, benchmarks, conversions; a
    run builds its shards with loom.parallel.build instead)."""
    model = build_model(cfg, "meta")
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


def check_model_config(cfg: ModelConfig) -> None:
    """The model's own constraints, as one-line SettingErrors naming model.<key>."""
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        need(getattr(cfg, key) > 0, f"model.{key}={getattr(cfg, key)} must be positive")
    one_of("model.family", cfg.family, FAMILIES)
    one_of("model.norm", cfg.norm, NORMS)
    one_of("model.mlp", cfg.mlp, MLPS)
    one_of("model.positions", cfg.positions, POSITIONS)
    one_of("model.norm_position", cfg.norm_position, NORM_POSITIONS)
    need(cfg.n_heads % cfg.n_kv_heads == 0,
         f"model.n_kv_heads={cfg.n_kv_heads} does not divide model.n_heads={cfg.n_heads}")
    if cfg.kv_channels is None:
        need(cfg.dim % cfg.n_heads == 0, f"model.n_heads={cfg.n_heads} does not divide model.dim={cfg.dim} "
                                         f"(or set model.kv_channels, the head dimension)")
    else:
        need(cfg.kv_channels > 0, f"model.kv_channels={cfg.kv_channels} must be positive")
    need(0 < cfg.rotary_fraction <= 1, f"model.rotary_fraction={cfg.rotary_fraction} must be in (0, 1]")
    if cfg.positions == "rope":
        need(cfg.rotary_dim >= 2 and cfg.rotary_dim % 2 == 0,
             f"model.rotary_fraction={cfg.rotary_fraction} x head dim {cfg.head_dim} rotates {cfg.rotary_dim} "
             f"dimensions; RoPE needs an even number, at least 2")
    need(cfg.token_types >= 0, f"model.token_types={cfg.token_types} must be 0 (none) or positive")
    need(cfg.norm_eps > 0, f"model.norm_eps={cfg.norm_eps} must be positive")
    need(cfg.init_std > 0, f"model.init_std={cfg.init_std} must be positive")
    if cfg.moe_experts:
        need(cfg.moe_experts > 0, f"moe.n_experts={cfg.moe_experts} must be 0 (dense) or positive")
        need(1 <= cfg.moe_top_k <= cfg.moe_experts,
             f"moe.top_k={cfg.moe_top_k} must be between 1 and moe.n_experts={cfg.moe_experts}")
        need(cfg.moe_capacity_factor is None or cfg.moe_capacity_factor > 0,
             f"moe.capacity_factor={cfg.moe_capacity_factor} must be positive (or unset: dropless)")
        need(cfg.moe_aux_loss_coeff >= 0 and cfg.moe_z_loss_coeff >= 0,
             f"moe.aux_loss_coeff={cfg.moe_aux_loss_coeff} and moe.z_loss_coeff={cfg.moe_z_loss_coeff} "
             f"must be 0 or positive")
        need(cfg.mlp == "swiglu", f"model.mlp={cfg.mlp!r} with moe.n_experts={cfg.moe_experts}: loom's experts "
                                  f"are SwiGLU; allowed: 'swiglu'")
