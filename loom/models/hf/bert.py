"""Hugging Face `BertForMaskedLM` <-> loom's BERT family: a post-LayerNorm bidirectional
encoder with learned positions and token types, a LayerNorm after the embeddings, and the
masked-LM head (dense, GeLU, LayerNorm) before a decoder tied to the word embeddings, with its
own bias (cls.predictions.bias). The pooler and next-sentence head of pretraining checkpoints
are not part of the masked-LM model and are left out."""
from __future__ import annotations

from loom.models.hf.base import HFAdapter, need, need_ints
from loom.models.registry import BERT
from loom.models.transformer import ModelConfig

ACTIVATIONS = {"gelu": "gelu-erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
LAYER = {
    "attention.wq": "attention.self.query", "attention.wk": "attention.self.key",
    "attention.wv": "attention.self.value", "attention.wo": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm", "feed_forward.w1": "intermediate.dense",
    "feed_forward.w2": "output.dense", "ffn_norm": "output.LayerNorm",
}
TOP = {
    "tok_embeddings": "bert.embeddings.word_embeddings", "pos_embeddings": "bert.embeddings.position_embeddings",
    "type_embeddings": "bert.embeddings.token_type_embeddings", "embed_norm": "bert.embeddings.LayerNorm",
    "head.dense": "cls.predictions.transform.dense", "head.norm": "cls.predictions.transform.LayerNorm",
}


class BertAdapter(HFAdapter):
    model_type, architecture, family = "bert", "BertForMaskedLM", "bert"
    ignored = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    def is_ignored(self, key: str, cfg: ModelConfig) -> bool:
        return (super().is_ignored(key, cfg) or key.startswith(("bert.pooler.", "cls.seq_relationship."))
                or key.endswith("position_ids"))

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        need_ints(hf, source, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "vocab_size", "max_position_embeddings")
        act = hf.get("hidden_act", "gelu")
        need(act in ACTIVATIONS, source, f"hidden_act={act!r}; allowed: {', '.join(ACTIVATIONS)}")
        kind = hf.get("position_embedding_type", "absolute")
        need(kind == "absolute", source, f"position_embedding_type={kind!r}; allowed: 'absolute'")
        heads = hf["num_attention_heads"]
        return ModelConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads, n_kv_heads=heads,
                           ffn_dim=hf["intermediate_size"],
                           **{**BERT, "vocab_size": hf["vocab_size"], "max_seq_len": hf["max_position_embeddings"],
                              "token_types": int(hf.get("type_vocab_size", 2)), "mlp": ACTIVATIONS[act],
                              "norm_eps": float(hf.get("layer_norm_eps", 1e-12))},
                           init_std=float(hf.get("initializer_range", 0.02)))

    def hf_config(self, cfg: ModelConfig, dtype: str) -> dict:
        act = {"gelu-erf": "gelu", "gelu": "gelu_new"}[cfg.mlp]
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.token_types,
            "layer_norm_eps": cfg.norm_eps, "hidden_act": act, "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "tie_word_embeddings": True,
            "initializer_range": cfg.init_std, "torch_dtype": dtype,
        }

    def names(self, cfg: ModelConfig) -> dict[str, str]:
        out = {"output.bias": "cls.predictions.bias"}
        for ours, theirs in TOP.items():
            suffixes = ("weight",) if ours.endswith("embeddings") else ("weight", "bias")
            out.update({f"{ours}.{s}": f"{theirs}.{s}" for s in suffixes})
        for i in range(cfg.n_layers):
            for ours, theirs in LAYER.items():
                out.update({f"layers.{i}.{ours}.{s}": f"bert.encoder.layer.{i}.{theirs}.{s}" for s in ("weight", "bias")})
        return out
