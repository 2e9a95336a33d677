"""Hugging Face interchange per family: Llama (`LlamaForCausalLM`), Nemotron
(`NemotronForCausalLM`), GPT-3 as GPT-2 (`GPT2LMHeadModel`, the same architecture), BERT
(`BertForMaskedLM`) and Mixtral (`MixtralForCausalLM`). `adapter_for_hf` picks the adapter of a config.json, `adapter_for` the one
of a loom model config."""
from __future__ import annotations

from loom.models.hf.base import EXPORT_DTYPES, HFAdapter, HFFormatError
from loom.models.hf.bert import BertAdapter
from loom.models.hf.gpt2 import GPT2Adapter
from loom.models.hf.llama import LlamaAdapter
from loom.models.hf.mixtral import MixtralAdapter
from loom.models.hf.nemotron import NemotronAdapter
from loom.models.transformer import ModelConfig

ADAPTERS: tuple[HFAdapter, ...] = (LlamaAdapter(), NemotronAdapter(), GPT2Adapter(), BertAdapter(), MixtralAdapter())


def adapter_for_hf(hf: dict, source: str) -> HFAdapter:
    model_type = hf.get("model_type")
    for adapter in ADAPTERS:
        if adapter.model_type == model_type:
            return adapter
    allowed = ", ".join(repr(a.model_type) for a in ADAPTERS)
    raise HFFormatError(f"{source}: model_type={model_type!r}; allowed: {allowed}")


def adapter_for(cfg: ModelConfig) -> HFAdapter:
    for adapter in ADAPTERS:
        if adapter.family == cfg.family:
            return adapter
    raise HFFormatError(f"model family {cfg.family!r} has no Hugging Face architecture in loom")


def hf_param_name(name: str, cfg: ModelConfig) -> str:
    """A loom parameter's Hugging Face key, for the one-to-one families (Llama, Nemotron, BERT)."""
    return adapter_for(cfg).names(cfg)[name]


__all__ = ["ADAPTERS", "EXPORT_DTYPES", "HFAdapter", "HFFormatError", "adapter_for", "adapter_for_hf", "hf_param_name"]
