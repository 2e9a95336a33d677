"""Named model configurations at their published sizes."""
from __future__ import annotations

import difflib

from loom.models.llama import LlamaConfig, RopeScaling

LLAMA31_ROPE = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)

MODELS: dict[str, LlamaConfig] = {
    # CPU-sized models for demos and tests. Their vocabulary matches the builtin tokenizer.
    "tiny": LlamaConfig(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=8192,
        rope_theta=10000.0, max_seq_len=2048,
    ),
    "small": LlamaConfig(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=8192,
        rope_theta=10000.0, max_seq_len=2048,
    ),
    "llama2-7b": LlamaConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000,
        rope_theta=10000.0, max_seq_len=4096,
    ),
    "llama2-13b": LlamaConfig(
        dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, vocab_size=32000,
        rope_theta=10000.0, max_seq_len=4096,
    ),
    "llama2-70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=32000,
        rope_theta=10000.0, max_seq_len=4096,
    ),
    "llama3-8b": LlamaConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "llama3-70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "llama3.1-8b": LlamaConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_seq_len=131072,
    ),
    "llama3.1-70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_seq_len=131072,
    ),
    "llama3.1-405b": LlamaConfig(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_seq_len=131072,
    ),
}


class UnknownModelError(ValueError):
    pass


def get_model_config(name: str) -> LlamaConfig:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownModelError(
            f"model.name={name!r} is not a known model{hint}; allowed: {', '.join(MODELS)}"
        ) from None
