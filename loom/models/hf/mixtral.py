"""Hugging Face `MixtralForCausalLM` <-> loom's Mixtral (a Llama with a mixture of experts in
place of each MLP). Checkpoints keep every expert's matrices apart
(`block_sparse_moe.experts.N.w1/w2/w3.weight`); loom stacks them into one [E, ...] tensor per
projection, so an expert parameter comes from, and goes back to, n_experts tensors.

Load balancing: transformers' router_aux_loss_coef weighs E x sum_e f_e P_e with f summing to
top_k; loom's (Megatron's) loss is that divided by top_k, so the coefficient is multiplied by
top_k on import and divided on export."""
from __future__ import annotations

import dataclasses

import torch

from loom.models.hf.base import ExportRule, ImportRule, identity
from loom.models.hf.llama import BLOCK as LLAMA_BLOCK, LlamaAdapter, decoder_names
from loom.models.registry import MIXTRAL
from loom.models.transformer import ModelConfig

BLOCK = {k: v for k, v in LLAMA_BLOCK.items() if not k.startswith("feed_forward.")}
PROJECTIONS = ("w1", "w2", "w3")  # Mixtral's names, which are loom's


def _stack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.stack(tensors)


def _expert(e: int):
    def take(t: torch.Tensor) -> torch.Tensor:
        return t[e].contiguous()
    return take


class MixtralAdapter(LlamaAdapter):
    model_type, architecture, family = "mixtral", "MixtralForCausalLM", "mixtral"

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        top_k = int(hf.get("num_experts_per_tok", 2))
        return dataclasses.replace(
            super().config_from_hf(hf, source), family="mixtral", moe_experts=int(hf.get("num_local_experts", 8)),
            moe_top_k=top_k,
            moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", MIXTRAL["moe_aux_loss_coeff"] / 2)) * top_k)

    def hf_config(self, cfg: ModelConfig, dtype: str) -> dict:
        out = super().hf_config(cfg, dtype)
        out.update({"architectures": [self.architecture], "model_type": self.model_type,
                    "num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
                    "router_aux_loss_coef": cfg.moe_aux_loss_coeff / cfg.moe_top_k, "sliding_window": None,
                    "output_router_logits": False, "router_jitter_noise": 0.0})
        return out

    def names(self, cfg: ModelConfig) -> dict[str, str]:
        out = decoder_names(cfg, BLOCK, norms_have_bias=False)
        for i in range(cfg.n_layers):
            out[f"layers.{i}.feed_forward.router.gate.weight"] = f"model.layers.{i}.block_sparse_moe.gate.weight"
        return out

    def _expert_keys(self, cfg: ModelConfig, layer: int, proj: str) -> list[str]:
        return [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.weight" for e in range(cfg.moe_experts)]

    def import_rules(self, cfg: ModelConfig) -> dict[str, ImportRule]:
        rules = super().import_rules(cfg)
        for i in range(cfg.n_layers):
            for proj in PROJECTIONS:
                rules[f"layers.{i}.feed_forward.experts.{proj}"] = (self._expert_keys(cfg, i, proj), _stack)
        return rules

    def export_rules(self, cfg: ModelConfig) -> dict[str, ExportRule]:
        rules = {key: ([name], identity) for name, key in self.names(cfg).items()}
        for i in range(cfg.n_layers):
            for proj in PROJECTIONS:
                name = f"layers.{i}.feed_forward.experts.{proj}"
                for e, key in enumerate(self._expert_keys(cfg, i, proj)):
                    rules[key] = ([name], _expert(e))
        return rules
