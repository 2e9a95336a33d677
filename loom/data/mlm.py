"""Masked-language-model targets, as Megatron's and NeMo's BERT pretraining makes them.

Of each sequence's tokens (special tokens never), 15% are chosen; a chosen token's input becomes
the mask token 80% of the time, a random token 10%, and stays itself 10%; the loss is taken on
the chosen tokens only (every other label is IGNORE_INDEX). The choice is a pure function of
(seed, sequence index), like Megatron's per-sample generator: the same sequence is masked alike
on any layout, in any order, and when it comes round again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # loom.models.loss.IGNORE_INDEX (data does not import the models)
MASK_TOKEN = "[MASK]"


@dataclass(frozen=True)
class MaskingSpec:
    mask_id: int
    vocab_size: int  # random replacements are drawn from [0, vocab_size) minus special ids
    special_ids: tuple[int, ...]
    seed: int
    probability: float = 0.15


def mask_sequence(tokens: np.ndarray, index: int, spec: MaskingSpec) -> tuple[np.ndarray, np.ndarray]:
    """tokens [S] -> (inputs [S], labels [S]) int64 for sequence `index`."""
    rng = np.random.default_rng([spec.seed, 0x6D6C6D, int(index)])  # 'mlm': its own stream
    tokens = tokens.astype(np.int64)
    eligible = ~np.isin(tokens, spec.special_ids)
    chosen = (rng.random(tokens.shape) < spec.probability) & eligible
    action = rng.random(tokens.shape)  # < 0.8 mask, < 0.9 random, else keep
    random_tokens = rng.integers(0, spec.vocab_size, tokens.shape)
    specials = np.isin(random_tokens, spec.special_ids)
    random_tokens[specials] = tokens[specials]  # never a special token as a random replacement
    inputs = tokens.copy()
    inputs[chosen & (action < 0.8)] = spec.mask_id
    replace = chosen & (action >= 0.8) & (action < 0.9)
    inputs[replace] = random_tokens[replace]
    labels = np.where(chosen, tokens, IGNORE_INDEX)
    return inputs, labels


def mask_batch(rows: np.ndarray, indices, spec: MaskingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, S] of sequences `indices` -> (inputs, labels) [N, S] int64 tensors."""
    pairs = [mask_sequence(row, int(i), spec) for row, i in zip(rows, indices)]
    inputs = np.stack([p[0] for p in pairs])
    labels = np.stack([p[1] for p in pairs])
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def mask_token_id(tokenizer_path) -> int | None:
    """The id of [MASK] in a tokenizer.json, or None when it has none."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).token_to_id(MASK_TOKEN)
