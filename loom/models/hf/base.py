"""What every Hugging Face family adapter provides (loom.models.hf.<family>).

An adapter maps a Hugging Face architecture's config.json and tensor names to a loom ModelConfig
and parameter names, both ways:
- import: each loom parameter comes from one Hugging Face tensor (or a few: Mixtral's experts,
  stacked) through a function (identity, a transpose, a slice of a fused tensor), so
  `loom convert --from-hf` streams one parameter at a time;
- export: each Hugging Face tensor is built from one or more loom parameters (a fused
  query-key-value matrix from three).
Tensors a checkpoint may carry that are not parameters (buffers, tied copies, heads loom does
not train) are listed as ignored.
"""
from __future__ import annotations

from typing import Callable

import torch

from loom.models.transformer import ModelConfig


# The dtypes `loom convert --to-hf` writes weights in (--dtype).
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFFormatError(ValueError):
    """A Hugging Face folder loom cannot convert; the message is one line naming what and why."""


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


# (HF key or keys, HF tensor(s) -> loom tensor)
ImportRule = tuple[str | list[str], Callable[..., torch.Tensor]]
ExportRule = tuple[list[str], Callable[..., torch.Tensor]]  # (loom names, loom tensors -> HF tensor)


class HFAdapter:
    """A one-to-one adapter: `names(cfg)` maps every loom parameter name to one HF key."""

    model_type: str = ""
    architecture: str = ""
    family: str = ""
    ignored: tuple[str, ...] = ()  # HF keys ending so are not parameters

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig, dtype: str) -> dict:
        raise NotImplementedError

    def names(self, cfg: ModelConfig) -> dict[str, str]:
        """loom parameter name -> HF key."""
        raise NotImplementedError

    def canonical_key(self, key: str) -> str:
        """An HF key as `names` spells it (checkpoints of some architectures differ in prefixes)."""
        return key

    def is_ignored(self, key: str, cfg: ModelConfig) -> bool:
        return key.endswith(self.ignored)

    def import_rules(self, cfg: ModelConfig) -> dict[str, ImportRule]:
        return {name: (key, identity) for name, key in self.names(cfg).items()}

    def export_rules(self, cfg: ModelConfig) -> dict[str, ExportRule]:
        return {key: ([name], identity) for name, key in self.names(cfg).items()}


def need(ok: bool, source: str, what: str) -> None:
    if not ok:
        raise HFFormatError(f"{source}: {what}")


def need_ints(hf: dict, source: str, *keys: str) -> None:
    for key in keys:
        need(isinstance(hf.get(key), int), source, f"no integer {key!r}")

