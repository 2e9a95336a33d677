"""One way to build a model for a run: on the meta device, converted, laid out, then allocated.

    build_model (meta) -> convert_model (kernels, LoRA, FP8) -> parallelize (PP, CP, TP, EP,
    recompute, FSDP) -> materialize (this rank's shards, initialized as one process would)

The trainer, the dry run (`loom train --dry-run`, which stops before materializing and allocates
fake tensors instead) and evaluation all call `build_parallel_model`, so the memory a dry run
reports is that of the model a run trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from loom.models.converters import convert_model
from loom.models.moe import MoE
from loom.models.transformer import ModelConfig, build_model
from loom.parallel.apply import materialize, parallelize
from loom.parallel.fsdp import reshard_units
from loom.parallel.layout import Layout
from loom.settings import DTYPES


@dataclass
class ParallelModel:
    """This rank's share of a laid-out model.

    parts: the pipeline stages this rank holds (stage_ids of n_stages), or [the whole model];
    each keeps the whole model's parameter names. kernels: the summary's line of which kernels,
    adapters and FP8 linears run."""

    parts: list[nn.Module]
    stage_ids: list[int]
    n_stages: int
    config: ModelConfig
    lora: object | None  # loom.models.lora.LoRASpec
    kernels: str
    fsdp: bool
    fp8: str
    init_peak_bytes: int = 0  # measured while materializing (tests hold it to shards + one block)
    shard_bytes: int = 0

    def __post_init__(self):
        # What a forward outside pipeline schedules calls, and what clipping sees: the model, or
        # the stages as one ModuleList.
        self.module = self.parts[0] if self.n_stages == 1 else nn.ModuleList(self.parts)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full-model name, parameter) of this rank's parameters."""
        for part in self.parts:
            yield from part.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def moe_layers(self) -> list[MoE]:
        return [m for part in self.parts for m in part.modules() if isinstance(m, MoE)]

    def materialize(self, device: torch.device, seed: int) -> None:
        """Allocate this rank's shards on `device` and initialize them from `seed`, with the
        values of one process (loom.parallel.init)."""
        spec_of = self.parts[0].init_spec
        if self.lora is not None:
            from loom.models.lora import adapter_init_spec

            spec_of = adapter_init_spec(spec_of, self.config)
        self.init_peak_bytes, self.shard_bytes = materialize(self.parts, device, seed, spec_of)

    def free_gathered_units(self) -> None:
        """Free the FSDP units a forward without backward leaves gathered (validation), so that
        parameters read between steps are the fp32 shards (loom.parallel.fsdp.reshard_units)."""
        if self.fsdp:
            reshard_units(self.parts)

    def refresh_fp8_scales(self) -> None:
        """After the weights change (initialized, loaded, stepped): the float8 scales FSDP
        gathers tensorwise FP8 weights with (a collective; a no-op for other layouts)."""
        if self.fsdp and self.fp8 != "none":
            from loom.parallel.fp8 import refresh_weight_scales

            refresh_weight_scales(self.parts)


def build_parallel_model(cfg, layout: Layout, device: torch.device, materialize: bool = True) -> ParallelModel:
    """The config's model, converted and laid out for `layout` on the meta device, then (with
    materialize) this rank's shards allocated on `device` and initialized from train.seed.
    cfg: a loom.config.Config (its model, train, parallel and lora sections)."""
    t, p = cfg.train, cfg.parallel
    model_cfg = cfg.model_config()
    dtype = DTYPES[t.dtype]
    model = build_model(model_cfg, "meta")
    lora = cfg.lora.spec(model_cfg)
    # The kernels are built (first run on this machine) or loaded here, before any step is timed.
    kernels = convert_model(model, t.kernels, device, dtype, t.fp8, float8_gather=layout.fsdp_enabled,
                            fp8_bf16_blocks=t.fp8_bf16_blocks, lora=lora)
    parts, stage_ids = parallelize(model, layout, p, t.recompute, dtype, t.fp8)
    built = ParallelModel(parts, stage_ids, layout.pp * p.pp_virtual_stages if layout.pp_enabled else 1,
                          model_cfg, lora, kernels, layout.fsdp_enabled, t.fp8)
    if materialize:
        built.materialize(device, t.seed)
        if t.compile:  # eager where nothing is materialized (the dry run traces fake tensors)
            for part in parts:
                for block in part.layers.values():
                    block.compile()
    return built
