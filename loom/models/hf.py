"""Names of loom's Llama parameters in Hugging Face's `LlamaForCausalLM`.

Both use the same RoPE layout (pairs (i, i + E/2)), so weights map one to one by name.
"""
from __future__ import annotations

_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_param_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    key = name.removesuffix(".weight")
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        return f"model.layers.{i}.{_BLOCK[rest]}.weight"
    return f"{_TOP[key]}.weight"
