"""Parameter counts and model FLOPs per token, as pure functions of the model config.

Conventions (DESIGN.md section 4), FLOPs per token for a training step (forward + backward):
- `megatron`: 6 * (matmul params of all blocks + V * D) + 12 * n_layers * D * S.
  The attention term counts QK^T and AV forward (4 * D * S per layer) and backward (twice
  that), with no discount for the causal mask. Embedding lookups, norms, softmax and
  recomputation are not counted. NeMo's and Megatron's published 2024 tables use this.
- `causal`: the same with the attention term halved, for the mask (newer Megatron, MaxText).
"""
from __future__ import annotations

from dataclasses import dataclass

from loom.models.llama import LlamaConfig

CONVENTIONS = ("megatron", "causal")
RECOMPUTE_MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    blocks: int  # everything inside the transformer blocks, norms included
    block_matmuls: int  # the weight matrices of the blocks only
    final_norm: int
    output: int

    @property
    def total(self) -> int:
        return self.embedding + self.blocks + self.final_norm + self.output


def param_counts(cfg: LlamaConfig) -> ParamCounts:
    d, e = cfg.dim, cfg.head_dim
    attention = d * cfg.n_heads * e * 2 + d * cfg.n_kv_heads * e * 2  # wq, wo; wk, wv
    mlp = 3 * d * cfg.ffn_dim  # w1, w3, w2
    norms = 2 * d
    return ParamCounts(
        embedding=cfg.vocab_size * d,
        blocks=cfg.n_layers * (attention + mlp + norms),
        block_matmuls=cfg.n_layers * (attention + mlp),
        final_norm=d,
        output=cfg.vocab_size * d,
    )


def _attention_flops_per_token(cfg: LlamaConfig, seq_len: int, convention: str) -> float:
    # QK^T and AV: 2 matmuls x 2 FLOPs x S x (H * E) per token and layer, forward; x3 with backward.
    full = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    if convention == "megatron":
        return full
    if convention == "causal":
        return full / 2
    raise ValueError(f"flops convention {convention!r} is unknown; allowed: {', '.join(CONVENTIONS)}")


def flops_per_token(cfg: LlamaConfig, seq_len: int, convention: str = "megatron") -> float:
    """Model FLOPs of one training step (forward + backward) per token."""
    p = param_counts(cfg)
    return 6 * (p.block_matmuls + p.output) + _attention_flops_per_token(cfg, seq_len, convention)


def hardware_flops_per_token(
    cfg: LlamaConfig, seq_len: int, recompute: str, convention: str = "megatron"
) -> float:
    """Model FLOPs plus the forward work that activation recomputation repeats.

    `full` re-runs each block's forward (its matmuls and attention, a third of the block's
    training FLOPs). loom's `selective` keeps every matmul and attention output and recomputes
    only element-wise work (norms, RoPE, SwiGLU's product), so it adds no matmul FLOPs.
    """
    model = flops_per_token(cfg, seq_len, convention)
    if recompute == "full":
        p = param_counts(cfg)
        return model + 2 * p.block_matmuls + _attention_flops_per_token(cfg, seq_len, convention) / 3
    if recompute in ("none", "selective"):
        return model
    raise ValueError(f"train.recompute={recompute!r} is unknown; allowed: {', '.join(RECOMPUTE_MODES)}")
