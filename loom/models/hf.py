"""Hugging Face `LlamaForCausalLM` <-> loom: parameter names and model configs.

Both use the same RoPE layout (pairs (i, i + E/2)), so weights map one to one by name; no
permutation of the query and key projections is needed.
"""
from __future__ import annotations

import dataclasses

from loom.models.transformer import ModelConfig, RopeScaling

_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


class HFFormatError(ValueError):
    """A Hugging Face folder loom cannot convert; the message is one line naming what and why."""


def hf_param_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    key = name.removesuffix(".weight")
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        return f"model.layers.{i}.{_BLOCK[rest]}.weight"
    return f"{_TOP[key]}.weight"


def loom_param_name(hf_name: str) -> str | None:
    """The inverse of hf_param_name; None for a name loom's Llama has no parameter for."""
    if not hf_name.endswith(".weight"):
        return None
    key = hf_name.removesuffix(".weight")
    if key.startswith("model.layers."):
        _, _, i, rest = key.split(".", 3)
        return f"layers.{i}.{_BLOCK_BACK[rest]}.weight" if rest in _BLOCK_BACK else None
    return f"{_TOP_BACK[key]}.weight" if key in _TOP_BACK else None


def llama_config_from_hf(hf: dict, source: str) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json (transformers 4 `rope_theta`/`rope_scaling`
    or transformers 5 `rope_parameters`). Refuses what loom's Llama does not implement."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise HFFormatError(f"{source}: {what}")

    need(hf.get("model_type") == "llama", f"model_type={hf.get('model_type')!r}; allowed: 'llama'")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        need(isinstance(hf.get(key), int), f"no integer {key!r}")
    need(not hf.get("attention_bias", False), "attention_bias=true; loom's Llama has no biases")
    need(not hf.get("mlp_bias", False), "mlp_bias=true; loom's Llama has no biases")
    need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}; allowed: 'silu'")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    need(head_dim * heads == dim, f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={dim}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in ("default", "llama3"), f"rope_type={rope_type!r}; allowed: 'default', 'llama3'")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return ModelConfig(
        dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
        rope_scaling=scaling, max_seq_len=int(hf.get("max_position_embeddings", 4096)),
    )


def hf_config_from_llama(cfg: ModelConfig, dtype: str) -> dict:
    """config.json for LlamaForCausalLM, in the form the published Llama checkpoints use
    (top-level rope_theta and rope_scaling; transformers 5 reads it too)."""
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        s = dataclasses.asdict(cfg.rope_scaling)
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s["factor"],
                               "low_freq_factor": s["low_freq_factor"], "high_freq_factor": s["high_freq_factor"],
                               "original_max_position_embeddings": s["original_max_seq_len"]}
    return out
