"""LoRA: low-rank adapters on chosen projections, the rest of the model frozen (a model converter:
after construction, on the meta device, before parallelization; loom.models.converters runs it).

A target projection y = x W^T + b [.., out] becomes

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T       A [rank, in], B [out, rank]

`[lora] base_dtype = "bfloat16"` (with train.dtype bfloat16) holds the blocks' frozen projection
weights in bf16, halving the base's memory without changing a number (autocast rounds them so).

A starts as Kaiming's normal (fan in, std in^-1/2), B as zeros, so training starts from the base
model exactly. Every other parameter (the projections' W and b, embeddings, norms, the output
layer) is frozen: no gradient, no optimizer state. Parameter names are the base model's plus
`<projection>.lora_a` / `.lora_b`, so base checkpoints load unchanged.

`[lora] targets` names projections as PEFT and NeMo users know them:
    q, k, v, o        attention.wq, wk, wv, wo
    gate, up, down    feed_forward.w1, w3, w2 (gated MLPs); ungated MLPs have up (w1) and down (w2)
"all" (the default, as NeMo's) is every attention and MLP projection the model has. MoE experts
take no adapters (their attention projections do).

Under tensor parallelism the adapter is sharded as its projection (loom.parallel.tensor): a
column-parallel W shards B by rows like the output, a row-parallel W shards A by columns like
the input, so the base and adapter products meet in the one reduction the base already needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loom.models.init import InitSpec
from loom.kernels.matmul import Linear, linear

ATTENTION_TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo"}
GATED_MLP_TARGETS = {"gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}
UNGATED_MLP_TARGETS = {"up": "feed_forward.w1", "down": "feed_forward.w2"}
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # of TARGETS
    base_bf16: bool = False  # the blocks' frozen projection weights held in bf16 (under bf16 autocast)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def target_modules(gated: bool, moe: bool) -> dict[str, str]:
    """Target name -> the module path inside a block, for a model's MLP kind."""
    mlp = {} if moe else (GATED_MLP_TARGETS if gated else UNGATED_MLP_TARGETS)
    return {**ATTENTION_TARGETS, **mlp}


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """Module path inside a block -> (in, out) features of that projection."""
    d, attn, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    return {"attention.wq": (d, attn), "attention.wk": (d, kv), "attention.wv": (d, kv), "attention.wo": (attn, d),
            "feed_forward.w1": (d, f), "feed_forward.w3": (d, f), "feed_forward.w2": (f, d)}


def parse_targets(text: str, gated: bool, moe: bool) -> tuple[str, ...]:
    """`[lora] targets` ('all' or a comma-separated list of TARGETS) -> the names, in TARGETS'
    order; ValueError naming what is allowed for this model otherwise."""
    allowed = target_modules(gated, moe)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return tuple(allowed)
    unknown = [t for t in names if t not in allowed]
    if unknown or not names:
        raise ValueError(f"lora.targets={text!r}: {', '.join(unknown) or 'nothing'} is not a projection of this model; "
                         f"allowed: 'all' or a comma-separated list of {', '.join(allowed)}")
    return tuple(t for t in allowed if t in names)


class LoRALinear(Linear):
    """A frozen projection plus its adapter: x [..., in] -> [..., out]. Still an nn.Linear, with the
    base's parameter names (weight, bias) beside lora_a [rank, in] and lora_b [out, rank]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, scaling: float, dropout: float):
        super().__init__(in_features, out_features, bias=bias)
        self.scaling = scaling
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = linear(x, self.weight, self.bias)
        low = linear(self.lora_dropout(x), self.lora_a)  # [..., rank]
        return base + linear(low, self.lora_b) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scaling={self.scaling:g}"


def _with_adapter(base: nn.Linear, spec: LoRASpec) -> LoRALinear:
    """A LoRALinear holding `base`'s own (frozen) parameters, on base's device (meta)."""
    with torch.device(base.weight.device):
        module = LoRALinear(base.in_features, base.out_features, base.bias is not None, spec.rank, spec.scaling,
                            spec.dropout)
    module.weight = base.weight
    module.bias = base.bias
    return module


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Freeze every parameter of `model`, then give the target projections of every block an
    adapter (trainable). Returns the names of the adapted projections."""
    for p in model.parameters():
        p.requires_grad_(False)
    paths = [path for name, path in target_modules(model.cfg.gated, bool(model.cfg.moe_experts)).items()
             if name in spec.targets]
    adapted = []
    for block_name, block in model.layers.items():
        for path in paths:
            parent_path, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            base = getattr(parent, leaf, None)
            if isinstance(base, nn.Linear):
                setattr(parent, leaf, _with_adapter(base, spec))
                adapted.append(f"layers.{block_name}.{path}")
    if spec.base_bf16:
        hold_projections_in_bf16(model)
    return adapted


def hold_projections_in_bf16(model: nn.Module) -> None:
    """The blocks' frozen projection weights in bf16: half their memory, and the same numbers a
    bf16 autocast run computes with (it rounds them to bf16 before every product anyway). Norms,
    embeddings and the output layer keep fp32, so the residual stream stays fp32."""
    for block in model.layers.values():
        for module in block.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                module.weight = nn.Parameter(module.weight.to(torch.bfloat16), requires_grad=False)


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_init_spec(base_spec_of, model_cfg):
    """The model's init_spec, extended to adapters: A Kaiming normal (std in^-1/2), B zeros."""

    def spec_of(name: str) -> InitSpec:
        if name.endswith(".lora_b"):
            return InitSpec("zeros")
        if name.endswith(".lora_a"):
            # layers.N.<projection path>.lora_a: fan in is the projection's input width
            path = name.split(".", 2)[2].removesuffix(".lora_a")
            return InitSpec("normal", projection_shapes(model_cfg)[path][0] ** -0.5)
        return base_spec_of(name)

    return spec_of


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + (alpha / rank) B A, [out, in], in fp32."""
    return weight.float() + scaling * (lora_b.float() @ lora_a.float())
