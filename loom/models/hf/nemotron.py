"""Hugging Face `NemotronForCausalLM` <-> loom: layernorm1p (HF stores the zero-centred gain, as
loom does), squared-ReLU MLP without gate (up_proj, down_proj), RoPE on partial_rotary_factor of
each head (the same (i, i + R/2) pairs), untied, no biases."""
from __future__ import annotations

from loom.models.hf.base import HFAdapter, need
from loom.models.hf.llama import decoder_fields, decoder_names
from loom.models.registry import NEMOTRON
from loom.models.transformer import ModelConfig

BLOCK = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


class NemotronAdapter(HFAdapter):
    model_type, architecture, family = "nemotron", "NemotronForCausalLM", "nemotron"
    ignored = ("rotary_emb.inv_freq",)

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        need(hf.get("hidden_act", "relu2") == "relu2", source, f"hidden_act={hf.get('hidden_act')!r}; allowed: 'relu2'")
        need(not hf.get("attention_bias", False) and not hf.get("mlp_bias", False), source,
             "attention_bias/mlp_bias=true; loom's Nemotron has no biases")
        rope = hf.get("rope_parameters") or {}
        fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        return ModelConfig(**{**NEMOTRON, **decoder_fields(hf, source), "rotary_fraction": float(fraction),
                              "init_std": float(hf.get("initializer_range", 0.01)),
                              "norm_eps": float(hf.get("norm_eps", 1e-5))})

    def hf_config(self, cfg: ModelConfig, dtype: str) -> dict:
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.rotary_fraction, "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": "relu2", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "torch_dtype": dtype,
        }

    def names(self, cfg: ModelConfig) -> dict[str, str]:
        return decoder_names(cfg, BLOCK, norms_have_bias=True)
