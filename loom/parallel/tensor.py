"""Tensor parallelism with sequence parallelism (Megatron-style), on the mesh's `tp` axis.

Per block: column-parallel wq, wk, wv and w1, w3 (each rank computes a slice of the heads and of
the hidden units), row-parallel wo and w2. With sequence parallelism the residual stream and the
norms between them are sharded along the sequence: [B, L/tp, D] on each rank, all-gathered
before the column-parallel matmuls and reduce-scattered after the row-parallel ones. The
embedding, and the output layer with the loss, are vocabulary-parallel (loom.parallel.vocab_parallel):
no rank holds more than one chunk of its shard's logits, nor the gradient of rows it does not hold.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from loom.parallel.vocab_parallel import apply_vocab_parallel_embedding, apply_vocab_parallel_output


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `model` in place over tp_mesh (a 1-D DeviceMesh)."""
    # Between blocks: sequence-sharded with SP, replicated without.
    stream = Shard(1) if sequence_parallel else Replicate()
    if model.tok_embeddings is not None:  # a pipeline stage may lack the embedding or the output
        apply_vocab_parallel_embedding(model, tp_mesh, sequence_parallel)
    if model.output is not None:
        if sequence_parallel:
            parallelize_module(model, tp_mesh, {"norm": SequenceParallel()})  # a sequence-sharded DTensor out
        apply_vocab_parallel_output(model, tp_mesh)
    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(
                input_layouts=(stream, None), desired_input_layouts=(Replicate(), None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
