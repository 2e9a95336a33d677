"""Named model configurations at their published sizes, with the source of each shape and of
its published parameter count (tests/test_models.py holds the counts to the figures cited).

Families (loom.models.transformer): llama (RMSNorm, SwiGLU, RoPE, untied, no biases), gpt3
(GPT-2/3: pre-LayerNorm with biases, GeLU (tanh), learned positions, biases everywhere, tied
embeddings), nemotron (layernorm1p, squared-ReLU without gate, RoPE on half of each head,
untied, no biases, vocabulary 256,000), bert (post-LayerNorm encoder, bidirectional, learned
positions and token types, masked-LM head tied to the embedding).
"""
from __future__ import annotations

import dataclasses
import difflib

from loom.models.transformer import ModelConfig, RopeScaling

LLAMA31_ROPE = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)
# NeMo's GPT-3: GPT-2's BPE (50,257 tokens) padded to a multiple of make_vocab_size_divisible_by
# (128) x tensor-parallel size; 51,200 is the padding at tp = 8, the vocabulary NeMo's throughput
# tables count (LLM_VOCAB_SIZE_MAP["gpt3"]), and it divides every tp up to 8.
GPT3_VOCAB = 51200
GPT3 = dict(family="gpt3", norm="layernorm", mlp="gelu", positions="learned", bias=True,
            tie_embeddings=True, vocab_size=GPT3_VOCAB, max_seq_len=2048, init_std=0.02)
NEMOTRON = dict(family="nemotron", norm="layernorm1p", mlp="squared-relu", positions="rope",
                rotary_fraction=0.5, bias=False, tie_embeddings=False, vocab_size=256000,
                max_seq_len=4096, rope_theta=10000.0)
MIXTRAL = dict(family="mixtral", vocab_size=32000, rope_theta=1e6, max_seq_len=32768, moe_experts=8, moe_top_k=2,
               moe_aux_loss_coeff=0.01)
BERT = dict(family="bert", norm="layernorm", mlp="gelu-erf", positions="learned", norm_position="post",
            bias=True, tie_embeddings=True, causal=False, token_types=2, mlm_head=True, norm_eps=1e-12,
            max_seq_len=512)


def _gpt3(dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, ffn_dim=4 * dim, **GPT3)


MODELS: dict[str, ModelConfig] = {
    # CPU-sized models for demos and tests. Their vocabulary matches the builtin tokenizer.
    "tiny": ModelConfig(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=8192,
        rope_theta=10000.0, max_seq_len=2048,
    ),
    "small": ModelConfig(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=8192,
        rope_theta=10000.0, max_seq_len=2048,
    ),
    "tiny-gpt3": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=1024,
                             **{**GPT3, "vocab_size": 8192}),
    "tiny-nemotron": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1024,
                                 **{**NEMOTRON, "vocab_size": 8192, "max_seq_len": 2048, "init_std": 0.02}),
    "tiny-bert": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=1024,
                             **{**BERT, "vocab_size": 8192, "max_seq_len": 2048}),
    # Llama 2 (arXiv 2307.09288), Llama 3 / 3.1 (arXiv 2407.21783 and the Hugging Face model cards).
    "llama2-7b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000,
        rope_theta=10000.0, max_seq_len=4096,
    ),
    "llama2-13b": ModelConfig(
        dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, vocab_size=32000,
        rope_theta=10000.0, max_seq_len=4096,
    ),
    "llama2-70b": ModelConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=32000,
        rope_theta=10000.0, max_seq_len=4096,
    ),
    "llama3-8b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "llama3-70b": ModelConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "llama3.1-8b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_seq_len=131072,
    ),
    "llama3.1-70b": ModelConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_seq_len=131072,
    ),
    "llama3.1-405b": ModelConfig(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_seq_len=131072,
    ),
    # GPT-3 shapes of NeMo's GPTConfig5B / GPTConfig20B / GPTConfig175B (nemo/collections/llm/gpt/
    # model/base.py; 175B is also GPT-3's own, arXiv 2005.14165 table 2.1: 96 x 12288, 96 heads).
    "gpt3-5b": _gpt3(4096, 24, 32),
    "gpt3-20b": _gpt3(6144, 44, 48),
    "gpt3-175b": _gpt3(12288, 96, 96),
    # Nemotron shapes of NeMo's Nemotron3Config8B / 22B and Nemotron4Config15B / 340B
    # (nemo/collections/llm/gpt/model/nemotron.py); Nemotron-4 15B: arXiv 2402.16819,
    # 340B: arXiv 2406.11704 (head dim 18432 / 96 = 192).
    "nemotron3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=16384,
                                **{**NEMOTRON, "init_std": 0.010}),
    "nemotron3-22b": ModelConfig(dim=6144, n_layers=40, n_heads=48, n_kv_heads=48, ffn_dim=24576,
                                 **{**NEMOTRON, "init_std": 0.008}),
    "nemotron4-15b": ModelConfig(dim=6144, n_layers=32, n_heads=48, n_kv_heads=8, ffn_dim=24576,
                                 **{**NEMOTRON, "init_std": 0.0134}),
    "nemotron4-340b": ModelConfig(dim=18432, n_layers=96, n_heads=96, n_kv_heads=8, ffn_dim=73728,
                                  kv_channels=192, **{**NEMOTRON, "init_std": 0.0063}),
    # Mixtral (arXiv 2401.04088 and the Hugging Face model cards mistralai/Mixtral-8x7B-v0.1,
    # Mixtral-8x22B-v0.1); 8x3B is NeMo's MixtralConfig8x3B (NeMo-Framework-Launcher mixtral_8x3b.yaml).
    "mixtral-8x3b": ModelConfig(dim=2560, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=8960, **MIXTRAL),
    "mixtral-8x7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **MIXTRAL),
    "mixtral-8x22b": ModelConfig(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, ffn_dim=16384,
                                 **{**MIXTRAL, "max_seq_len": 65536}),
    "tiny-moe": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=384,
                            **{**MIXTRAL, "vocab_size": 8192, "max_seq_len": 2048}),
    # BERT (arXiv 1810.04805; shapes and the uncased WordPiece vocabulary of google-bert/bert-*-uncased).
    "bert-base": ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=3072,
                             **{**BERT, "vocab_size": 30522}),
    "bert-large": ModelConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=4096,
                              **{**BERT, "vocab_size": 30522}),
}

# The parameter count each entry's source publishes, and where: (count, how precisely it is
# published (relative), source). Exact counts are held exactly.
PUBLISHED_PARAMS: dict[str, tuple[int, float, str]] = {
    "llama2-7b": (6_738_415_616, 0.0, "Hugging Face meta-llama/Llama-2-7b-hf safetensors index"),
    "llama2-13b": (13_015_864_320, 0.0, "Hugging Face meta-llama/Llama-2-13b-hf safetensors index"),
    "llama2-70b": (68_976_648_192, 0.0, "Hugging Face meta-llama/Llama-2-70b-hf safetensors index"),
    "llama3-8b": (8_030_261_248, 0.0, "Hugging Face meta-llama/Meta-Llama-3-8B safetensors index"),
    "llama3-70b": (70_553_706_496, 0.0, "Hugging Face meta-llama/Meta-Llama-3-70B safetensors index"),
    "llama3.1-8b": (8_030_261_248, 0.0, "Hugging Face meta-llama/Llama-3.1-8B safetensors index"),
    "llama3.1-70b": (70_553_706_496, 0.0, "Hugging Face meta-llama/Llama-3.1-70B safetensors index"),
    "llama3.1-405b": (405_853_388_800, 0.0, "Hugging Face meta-llama/Llama-3.1-405B safetensors index (paper: 405B)"),
    "gpt3-5b": (5_000_000_000, 0.02, "NeMo GPTConfig5B / model card nemo-megatron-gpt-5B: 5B"),
    "gpt3-20b": (20_000_000_000, 0.02, "NeMo GPTConfig20B / model card nemo-megatron-gpt-20B: 20B"),
    "gpt3-175b": (175_000_000_000, 0.005, "GPT-3 paper (arXiv 2005.14165) table 2.1: 175.0B"),
    "nemotron3-8b": (8_000_000_000, 0.07, "model card nvidia/nemotron-3-8b-base-4k: 8B"),
    "nemotron3-22b": (22_000_000_000, 0.04, "NeMo Nemotron3Config22B: 22B"),
    "nemotron4-15b": (15_628_775_424, 0.0, "Nemotron-4 15B (arXiv 2402.16819), from the architecture"),
    "nemotron4-340b": (341_029_195_776, 0.0, "Nemotron-4 340B (arXiv 2406.11704), from the architecture"),
    "mixtral-8x3b": (18_305_026_560, 0.0, "NeMo MixtralConfig8x3B, from the architecture"),
    "mixtral-8x7b": (46_702_792_704, 0.0, "Hugging Face mistralai/Mixtral-8x7B-v0.1 safetensors index"),
    "mixtral-8x22b": (140_620_634_112, 0.0, "Hugging Face mistralai/Mixtral-8x22B-v0.1 safetensors index"),
    "bert-base": (110_000_000, 0.01, "BERT paper (arXiv 1810.04805): 110M"),
    "bert-large": (340_000_000, 0.02, "BERT paper (arXiv 1810.04805): 340M"),
}


class UnknownModelError(ValueError):
    pass


def get_model_config(name: str) -> ModelConfig:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownModelError(
            f"model.name={name!r} is not a known model{hint}; allowed: {', '.join(MODELS)}"
        ) from None


def model_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(ModelConfig))
