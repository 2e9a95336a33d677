"""Hugging Face `LlamaForCausalLM` <-> loom. Both use the same RoPE layout (pairs (i, i + E/2)),
so weights map one to one by name; no permutation of the query and key projections."""
from __future__ import annotations

import dataclasses

from loom.models.hf.base import HFAdapter, need, need_ints
from loom.models.transformer import ModelConfig, RopeScaling

BLOCK = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def decoder_names(cfg: ModelConfig, block: dict[str, str], norms_have_bias: bool) -> dict[str, str]:
    """The `model.layers.N....` naming Llama, Nemotron and most decoders share."""
    out = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if norms_have_bias:
        out["norm.bias"] = "model.norm.bias"
    if not cfg.tie_embeddings:
        out["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for ours, theirs in block.items():
            if ours.endswith("norm"):
                suffixes = ("weight", "bias") if norms_have_bias else ("weight",)
            elif ours == "feed_forward.w3" and not cfg.gated:
                continue
            else:
                suffixes = ("weight", "bias") if cfg.bias else ("weight",)
            for suffix in suffixes:
                out[f"layers.{i}.{ours}.{suffix}"] = f"model.layers.{i}.{theirs}.{suffix}"
    return out


def rope_from_hf(hf: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in ("default", "llama3"), source, f"rope_type={rope_type!r}; allowed: 'default', 'llama3'")
    if rope_type != "llama3":
        return float(theta), None
    return float(theta), RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_seq_len=int(rope["original_max_position_embeddings"]))


def decoder_fields(hf: dict, source: str) -> dict:
    """The ModelConfig fields every decoder's config.json (Llama, Nemotron, Mixtral) gives
    alike: shape, head dimension, RoPE, context length and tying."""
    need_ints(hf, source, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "vocab_size")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    theta, scaling = rope_from_hf(hf, source)
    return dict(
        dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], rope_theta=theta, rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        kv_channels=None if head_dim * heads == dim else head_dim,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


class LlamaAdapter(HFAdapter):
    model_type, architecture, family = "llama", "LlamaForCausalLM", "llama"
    ignored = ("rotary_emb.inv_freq",)

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        need(not hf.get("attention_bias", False), source, "attention_bias=true; loom's Llama has no biases")
        need(not hf.get("mlp_bias", False), source, "mlp_bias=true; loom's Llama has no biases")
        need(hf.get("hidden_act", "silu") == "silu", source, f"hidden_act={hf.get('hidden_act')!r}; allowed: 'silu'")
        return ModelConfig(**decoder_fields(hf, source), norm_eps=float(hf.get("rms_norm_eps", 1e-5)))

    def hf_config(self, cfg: ModelConfig, dtype: str) -> dict:
        """config.json in the form the published Llama checkpoints use (top-level rope_theta and
        rope_scaling; transformers 5 reads it too)."""
        out = {
            "architectures": [self.architecture], "model_type": self.model_type,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "use_cache": True,
            "torch_dtype": dtype,
        }
        if cfg.rope_scaling is not None:
            s = dataclasses.asdict(cfg.rope_scaling)
            out["rope_scaling"] = {"rope_type": "llama3", "factor": s["factor"],
                                   "low_freq_factor": s["low_freq_factor"], "high_freq_factor": s["high_freq_factor"],
                                   "original_max_position_embeddings": s["original_max_seq_len"]}
        return out

    def names(self, cfg: ModelConfig) -> dict[str, str]:
        return decoder_names(cfg, BLOCK, norms_have_bias=False)

    def is_ignored(self, key: str, cfg: ModelConfig) -> bool:
        return super().is_ignored(key, cfg) or (cfg.tie_embeddings and key == "lm_head.weight")
