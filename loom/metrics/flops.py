"""Parameter counts and model FLOPs per token, as pure functions of the model config.

Conventions (DESIGN.md section 4), FLOPs per token for a training step (forward + backward):
- `megatron`: 6 * (matmul weights of all blocks + V * D) + 12 * n_layers * H * E * S.
  The attention term counts QK^T and AV forward (4 * H * E * S per layer) and backward (twice
  that), with no discount for the causal mask. Embedding lookups, biases, norms, softmax, BERT's
  masked-LM transform and recomputation are not counted. NeMo's and Megatron's published 2024
  tables use this.
- `causal`: the same with the attention term of causal models halved, for the mask (newer
  Megatron, MaxText). Bidirectional models (BERT) attend to every key: never halved.

Per family this is exactly the formula of NeMo's own throughput tables (nemo/utils/
flops_formulas.py, NeMo 2.x, functions gpt3, llama2/llama3, nemotron, bert), divided by
gbs x seq_len, at their shapes:
    gpt3      72 L h^2 + 12 L s h + 6 V h              (ffn = 4h: 6 x 12 h^2 per layer)
    llama     L h^2 (12 + 12 g/a + 18 f/h) + 12 L s h + 6 V h   (gated MLP: 3 matrices)
    nemotron  L h^2 (12 + 12 g/a + 12 f/h) + 12 L s h + 6 V h   (ungated: 2 matrices)
    bert      72 L h^2 (1 + s / 6h) + 6 V h            (bidirectional, no causal discount)
    mixtral   L h^2 (12 + 12 g/a + 18 k f/h) + 12 L s h + 6 V h (top-k experts only, router excluded)
with g/a = kv heads / heads. NeMo's tables use a fixed vocabulary per family (gpt3 51,200,
nemotron 256,000, bert 29,000); loom counts the model's own (the registry's GPT-3 and Nemotron
vocabularies are NeMo's; BERT's is the uncased WordPiece 30,522).
"""
from __future__ import annotations

from dataclasses import dataclass

from loom.models.transformer import ModelConfig

CONVENTIONS = ("megatron", "causal")


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token, learned position and token-type tables, and BERT's embedding norm
    blocks: int  # everything inside the transformer blocks, norms and biases included
    block_matmuls: int  # the weight matrices of the blocks only
    final_norm: int  # the final norm, or BERT's masked-LM transform (dense, norm)
    output: int  # the output weight (0 when tied to the embedding) and its bias
    active_block_matmuls: int = -1  # a token's share of block_matmuls: top-k experts of a MoE (router excluded)
    inactive: int = 0  # parameters a token does not use: the experts it is not routed to

    @property
    def total(self) -> int:
        return self.embedding + self.blocks + self.final_norm + self.output

    @property
    def active(self) -> int:
        """Parameters one token uses (Mixtral's "active parameters")."""
        return self.total - self.inactive


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.dim if cfg.norm == "rmsnorm" else 2 * cfg.dim  # LayerNorms carry a bias


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, e = cfg.dim, cfg.head_dim
    attention = d * cfg.n_heads * e * 2 + d * cfg.n_kv_heads * e * 2  # wq, wo; wk, wv
    expert = (3 if cfg.gated else 2) * d * cfg.ffn_dim
    experts = max(1, cfg.moe_experts)
    mlp = experts * expert
    router = d * cfg.moe_experts
    biases = 0
    if cfg.bias:
        biases = (cfg.n_heads + 2 * cfg.n_kv_heads) * e + d + (2 if cfg.gated else 1) * cfg.ffn_dim + d
    embedding = cfg.vocab_size * d
    embedding += cfg.max_seq_len * d if cfg.positions == "learned" else 0
    embedding += cfg.token_types * d
    embedding += _norm_params(cfg) if cfg.norm_position == "post" else 0
    if cfg.mlm_head:
        final = d * d + d + _norm_params(cfg)
    else:
        final = _norm_params(cfg) if cfg.norm_position == "pre" else 0
    output = (0 if cfg.tie_embeddings else cfg.vocab_size * d) + (cfg.vocab_size if cfg.mlm_head else 0)
    active = min(cfg.moe_top_k, experts) if cfg.moe_experts else 1
    return ParamCounts(
        embedding=embedding,
        blocks=cfg.n_layers * (attention + mlp + router + biases + 2 * _norm_params(cfg)),
        block_matmuls=cfg.n_layers * (attention + mlp),
        final_norm=final,
        output=output,
        active_block_matmuls=cfg.n_layers * (attention + active * expert),
        inactive=cfg.n_layers * (experts - active) * expert,
    )


def _attention_flops_per_token(cfg: ModelConfig, seq_len: int, convention: str) -> float:
    # QK^T and AV: 2 matmuls x 2 FLOPs x S x (H * E) per token and layer, forward; x3 with backward.
    full = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    if convention == "megatron":
        return full
    if convention == "causal":
        return full / 2 if cfg.causal else full
    raise ValueError(f"flops convention {convention!r} is unknown; allowed: {', '.join(CONVENTIONS)}")


def adapter_params(cfg: ModelConfig, lora) -> int:
    """Parameters of LoRA's adapters (a loom.models.lora.LoRASpec): rank x (in + out) per adapted
    projection of every block."""
    from loom.models.lora import projection_shapes, target_modules

    shapes, paths = projection_shapes(cfg), target_modules(cfg.gated, bool(cfg.moe_experts))
    return cfg.n_layers * sum(lora.rank * sum(shapes[paths[t]]) for t in lora.targets)


def flops_per_token(cfg: ModelConfig, seq_len: float, convention: str = "megatron", lora=None) -> float:
    """Model FLOPs of one training step (forward + backward) per token. seq_len: the length
    attention is counted at (packed examples: sum of squared lengths / sequence length). With
    lora (a LoRASpec) the frozen matrices count no weight gradient (4 FLOPs per weight instead of
    6, the 2/3 of Megatron's PEFT figures) and the adapters count in full."""
    p = param_counts(cfg)
    matrices = p.active_block_matmuls + cfg.vocab_size * cfg.dim
    dense = 6 * matrices if lora is None else 4 * matrices + 6 * adapter_params(cfg, lora)
    return dense + _attention_flops_per_token(cfg, seq_len, convention)


def hardware_flops_per_token(
    cfg: ModelConfig, seq_len: float, recompute: str, convention: str = "megatron", lora=None
) -> float:
    """Model FLOPs plus the forward work that activation recomputation repeats.

    `full` re-runs each block's forward (its matmuls and attention, a third of the block's
    training FLOPs). loom's `selective` keeps every matmul and attention output and recomputes
    only element-wise work (norms, RoPE, SwiGLU's product), so it adds no matmul FLOPs.
    """
    model = flops_per_token(cfg, seq_len, convention, lora)
    if recompute == "full":
        p = param_counts(cfg)
        adapters = 2 * adapter_params(cfg, lora) if lora is not None else 0
        return model + 2 * p.active_block_matmuls + adapters + _attention_flops_per_token(cfg, seq_len, convention) / 3
    if recompute in ("none", "selective"):
        return model
    raise ValueError(f"train.recompute={recompute!r} is unknown; allowed: none, full, selective")
