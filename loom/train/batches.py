"""The run's data as steps consume it: this data rank's micro-batches of each optimizer step, the
validation batches, and, for packed fine-tuning examples, the divisor that makes every layout's
loss the mean over the global batch's answer tokens."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import torch

from loom.data.batch import Batch
from loom.data.dataset import BatchSchedule, EpochOrder, open_splits


class TrainingBatches:
    """Batches of the config's dataset for data-parallel rank `dp_rank` of `dp` (context-parallel
    ranks read the same whole sequences and keep their shards: loom.parallel.context)."""

    def __init__(self, cfg, model_cfg, dp_rank: int, dp: int, cp: int, progress: bool):
        t = cfg.train
        self.cfg, self.dp_rank, self.dp, self.cp = cfg, dp_rank, dp, cp
        self.sft = cfg.data.format == "sft"
        self.blend = None
        if cfg.data.blend:
            self.blend, self.vals = open_blend(cfg.data, t.seq_len, t.seed, progress)
            self.train, self.val = self.blend, self.vals[0]
            self.schedule = BatchSchedule(self.blend.order, t.global_batch)
        else:
            self.train, self.val = open_splits(cfg.data.path, t.seq_len, progress=progress,
                                               data_format=cfg.data.format, seed=t.seed, tokenizer=cfg.data.tokenizer)
            self.schedule = BatchSchedule(EpochOrder(self.train.n_sequences, t.seed), t.global_batch)
        self.masking = self._masking(model_cfg)
        self.n_micro = t.global_batch // dp // t.micro_batch  # per data rank and step
        self.tokens_per_step = t.global_batch * t.seq_len

    def _masking(self, model_cfg):
        """Masked-LM targets for a bidirectional model (BERT), else None (next-token targets)."""
        if model_cfg.causal:
            return None
        from loom.data.mlm import MaskingSpec

        mask_id = self.train.mask_token()
        if mask_id is None:
            raise ValueError(f"model {self.cfg.model.name!r} trains on masked-LM targets, but the tokenizer of "
                             f"data.path={self.cfg.data.path!r} has no [MASK] token")
        eos = self.train.meta.get("eos_id")
        special = tuple(i for i in (eos, mask_id) if i is not None)
        return MaskingSpec(mask_id, self.train.meta["vocab_size"], special, self.cfg.train.seed)

    def micro_batches(self, step: int) -> list[Batch]:
        """This data rank's share of optimizer step `step` (0-based; whole sequences [B, S]), cut
        into micro-batches of train.micro_batch."""
        idx = self.schedule.rank_indices(step, self.dp_rank, self.dp)
        mb = self.cfg.train.micro_batch
        packed = self.cfg.data.pack_documents
        batches = [self.train.batch(idx[i : i + mb], packed, self.masking) for i in range(0, len(idx), mb)]
        if not self.sft:
            return batches
        share = self.global_divisor(step) / mb
        return [dataclasses.replace(b, loss_tokens=torch.full((len(b.inputs),), share)) for b in batches]

    def global_divisor(self, step: int) -> float:
        """What each micro-batch's summed loss is divided by so that the step's gradient is that
        of the mean over the answer tokens of the whole global batch, in every layout:
        T / (micro-batches x dp x cp), T the global batch's answer tokens. Micro-batches are
        averaged (1 / micro-batches, or the pipeline schedule's gradient scaling) and FSDP
        averages over the dp x cp ranks, which together undo that denominator; every rank
        knows T without a collective, since every rank knows the global batch."""
        tokens = self.train.answer_tokens(self.schedule.global_indices(step))
        return max(tokens, 1) / (self.n_micro * self.dp * self.cp)

    def validation_sets(self) -> dict[str, Iterator[tuple[Batch, float]]]:
        """The validation batches of each source ({"": ...} without a blend), see validation_batches."""
        if self.blend is None:
            return {"": self.validation_batches(self.val)}
        return {name: self.validation_batches(val) for name, val in zip(self.blend.names, self.vals)}

    def validation_batches(self, val) -> Iterator[tuple[Batch, float]]:
        """(batch, weight) over the first train.eval_batches micro-batches of a validation split
        (the run's, or a blend source's `val`): batches weigh by their sequences, or for
        fine-tuning by their answer tokens (the validation loss is then the mean over all)."""
        mb = self.cfg.train.micro_batch
        n = min(self.cfg.train.eval_batches * mb, val.n_sequences)
        for i in range(0, n, mb):
            idx = np.arange(i, min(i + mb, n))
            batch = val.batch(idx, self.cfg.data.pack_documents, self.masking)
            yield batch, (val.answer_tokens(idx) if self.sft else len(batch.inputs))

    def state(self, step: int) -> dict | None:
        """Where the data stream stands after `step` steps, for a checkpoint: a blend's samples
        drawn from each source (its rule is sequential); None where a step number says it all."""
        if self.blend is None:
            return None
        at = step * self.cfg.train.global_batch
        return {"blend_samples": at, "blend_drawn": self.blend.drawn_at(at)}

    def restore(self, state: dict | None) -> None:
        if self.blend is not None and state and "blend_drawn" in state:
            self.blend.sequence.restore(state["blend_samples"], state["blend_drawn"])

    def samples_by_source(self, step: int) -> dict[str, int] | None:
        """Samples each blend source gave the run's first `step` steps (None without a blend)."""
        if self.blend is None:
            return None
        return dict(zip(self.blend.names, self.blend.drawn_at(step * self.cfg.train.global_batch)))

    @property
    def attention_len(self) -> float:
        """The sequence length attention FLOPs are counted at: train.seq_len, or for packed
        examples or documents the length whose attention costs what theirs does."""
        packed = self.sft or self.cfg.data.pack_documents
        return self.train.attention_len if packed else self.cfg.train.seq_len

    @property
    def packing_efficiency(self) -> float | None:
        """The share of packed slots holding example tokens (fine-tuning), else None."""
        return self.train.efficiency if self.sft else None


def open_blend(data, seq_len: int, seed: int, progress: bool):
    """data.blend's sources as one BlendedDataset of their train splits, and their validation
    splits in the blend's order."""
    from loom.data.blend import BlendedDataset

    splits = [open_splits(path, seq_len, progress=progress, tokenizer=data.tokenizer) for _, path in data.blend]
    names = [path for _, path in data.blend]
    blend = BlendedDataset(names, [w for w, _ in data.blend], [train for train, _ in splits], seed)
    return blend, [val for _, val in splits]
