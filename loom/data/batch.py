"""What the data side hands the trainer: a batch of token sequences; and a prepared dataset's
meta.json. A leaf: token datasets and packed fine-tuning examples both build on it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Batch:
    """inputs, labels [N, S] int64; documents [N, S] int64 (a document index per input token,
    equal within a document) when documents are packed, else None; loss_tokens [N] float."""

    inputs: torch.Tensor
    labels: torch.Tensor
    documents: torch.Tensor | None = None
    # [N] per sample, a share of what the micro-batch's summed loss is divided by
    # (loom.models.loss.loss_divisor); None: its own labels' mean.
    loss_tokens: torch.Tensor | None = None


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())
