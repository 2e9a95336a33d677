"""Hugging Face `GPT2LMHeadModel` <-> loom's GPT-3 family (the same architecture: pre-LayerNorm,
learned positions, GeLU (tanh: "gelu_new"), biases everywhere, tied embeddings).

GPT-2 keeps its projections as Conv1D, weights [in, out] (loom's are [out, in]: transposed),
and the query, key and value projections fused in one c_attn [D, 3D] (split and joined here).
Checkpoints spell keys with or without the "transformer." prefix; loom reads both, writes it.
"""
from __future__ import annotations

import torch

from loom.models.hf.base import ExportRule, HFAdapter, ImportRule, identity, need, need_ints, transpose
from loom.models.registry import GPT3
from loom.models.transformer import ModelConfig

ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu-erf"}
PREFIX = "transformer."


def _top(cfg: ModelConfig) -> dict[str, str]:
    return {"tok_embeddings.weight": "wte.weight", "pos_embeddings.weight": "wpe.weight",
            "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias"}


def _layer(i: int) -> dict[str, tuple[str, bool]]:
    """loom name -> (HF key, transposed) for one block's one-to-one tensors."""
    h = f"h.{i}."
    return {
        f"layers.{i}.attention_norm.weight": (h + "ln_1.weight", False),
        f"layers.{i}.attention_norm.bias": (h + "ln_1.bias", False),
        f"layers.{i}.attention.wo.weight": (h + "attn.c_proj.weight", True),
        f"layers.{i}.attention.wo.bias": (h + "attn.c_proj.bias", False),
        f"layers.{i}.ffn_norm.weight": (h + "ln_2.weight", False),
        f"layers.{i}.ffn_norm.bias": (h + "ln_2.bias", False),
        f"layers.{i}.feed_forward.w1.weight": (h + "mlp.c_fc.weight", True),
        f"layers.{i}.feed_forward.w1.bias": (h + "mlp.c_fc.bias", False),
        f"layers.{i}.feed_forward.w2.weight": (h + "mlp.c_proj.weight", True),
        f"layers.{i}.feed_forward.w2.bias": (h + "mlp.c_proj.bias", False),
    }


def _qkv_slice(part: int, dim: int, weight: bool):
    """c_attn [D, 3D] (or its bias [3D]) -> part 0/1/2 (q/k/v) as loom's [D, D] (or [D])."""
    def take(t: torch.Tensor) -> torch.Tensor:
        piece = t[..., part * dim:(part + 1) * dim]
        return piece.t().contiguous() if weight else piece.contiguous()
    return take


def _join_qkv_weights(q, k, v):
    return torch.cat((q.t(), k.t(), v.t()), dim=1).contiguous()


def _join_qkv_biases(q, k, v):
    return torch.cat((q, k, v)).contiguous()


class GPT2Adapter(HFAdapter):
    model_type, architecture, family = "gpt2", "GPT2LMHeadModel", "gpt3"
    ignored = (".attn.bias", ".attn.masked_bias", "lm_head.weight")

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        need_ints(hf, source, "n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
        act = hf.get("activation_function", "gelu_new")
        need(act in ACTIVATIONS, source, f"activation_function={act!r}; allowed: {', '.join(ACTIVATIONS)}")
        need(hf.get("tie_word_embeddings", True), source, "tie_word_embeddings=false; GPT-2 ties them")
        need(not hf.get("scale_attn_by_inverse_layer_idx", False), source,
             "scale_attn_by_inverse_layer_idx=true; loom scales attention by 1/sqrt(head dim) only")
        need(hf.get("scale_attn_weights", True), source, "scale_attn_weights=false; loom scales attention")
        dim = hf["n_embd"]
        return ModelConfig(dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"], n_kv_heads=hf["n_head"],
                           ffn_dim=hf.get("n_inner") or 4 * dim,
                           **{**GPT3, "vocab_size": hf["vocab_size"], "max_seq_len": hf["n_positions"],
                              "mlp": ACTIVATIONS[act], "init_std": float(hf.get("initializer_range", 0.02))},
                           norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))

    def hf_config(self, cfg: ModelConfig, dtype: str) -> dict:
        act = {"gelu": "gelu_new", "gelu-erf": "gelu"}[cfg.mlp]
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim,
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": act, "tie_word_embeddings": True,
            "initializer_range": cfg.init_std, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "use_cache": True, "torch_dtype": dtype,
        }

    def canonical_key(self, key: str) -> str:
        return key.removeprefix(PREFIX)

    def import_rules(self, cfg: ModelConfig) -> dict[str, ImportRule]:
        rules = {name: (PREFIX + key, identity) for name, key in _top(cfg).items()}
        for i in range(cfg.n_layers):
            rules.update({name: (PREFIX + key, transpose if t else identity) for name, (key, t) in _layer(i).items()})
            for part, proj in enumerate(("wq", "wk", "wv")):
                base = f"{PREFIX}h.{i}.attn.c_attn"
                rules[f"layers.{i}.attention.{proj}.weight"] = (base + ".weight", _qkv_slice(part, cfg.dim, True))
                rules[f"layers.{i}.attention.{proj}.bias"] = (base + ".bias", _qkv_slice(part, cfg.dim, False))
        return rules

    def export_rules(self, cfg: ModelConfig) -> dict[str, ExportRule]:
        rules = {PREFIX + key: ([name], identity) for name, key in _top(cfg).items()}
        for i in range(cfg.n_layers):
            rules.update({PREFIX + key: ([name], transpose if t else identity) for name, (key, t) in _layer(i).items()})
            sources = [f"layers.{i}.attention.{p}" for p in ("wq", "wk", "wv")]
            rules[f"{PREFIX}h.{i}.attn.c_attn.weight"] = ([s + ".weight" for s in sources], _join_qkv_weights)
            rules[f"{PREFIX}h.{i}.attn.c_attn.bias"] = ([s + ".bias" for s in sources], _join_qkv_biases)
        return rules
