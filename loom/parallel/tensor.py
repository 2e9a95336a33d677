"""Tensor parallelism with sequence parallelism (Megatron-style), on the mesh's `tp` axis.

Per block: column-parallel wq, wk, wv and w1, w3 (each rank computes a slice of the heads and of
the hidden units, and holds that slice of their biases), row-parallel wo and w2 (their biases
replicated, added once after the reduction). With sequence parallelism the residual stream and the
norms between them are sharded along the sequence: [B, L/tp, D] on each rank, all-gathered
before the column-parallel matmuls and reduce-scattered after the row-parallel ones. The
embedding, and the output layer with the loss, are vocabulary-parallel (loom.parallel.vocab_parallel):
no rank holds more than one chunk of its shard's logits, nor the gradient of rows it does not hold.
A LoRA projection's adapter is sharded as its base (_ColwiseWithAdapter, _RowwiseWithAdapter), so
adapters add no collective of their own. Every family goes through the same plan: norms of any kind (with their biases), BERT's norm after
the embeddings and its masked-LM head run on the sequence shards like the norms between blocks.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from loom.models.lora import LoRALinear
from loom.models.moe import MoE
from loom.parallel.vocab_parallel import apply_vocab_parallel_embedding, apply_vocab_parallel_output


def _distribute_params(module: nn.Module, device_mesh, placement_of, src_data_rank) -> None:
    """Each parameter of `module` (not its children's) as a DTensor placed by placement_of(name)."""
    for pname, param in module.named_parameters(recurse=False):
        module.register_parameter(pname, nn.Parameter(
            distribute_tensor(param, device_mesh, [placement_of(pname)], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad))


class _ColwiseWithAdapter(ColwiseParallel):
    """Column-parallel W [out/tp, in] and bias; a LoRA adapter's B [out/tp, rank] sharded like the
    output, A [rank, in] whole: x A^T B^T comes out sharded as x W^T does."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute_params(module, device_mesh, lambda p: Replicate() if p == "lora_a" else Shard(0),
                           self.src_data_rank)


class _RowwiseWithAdapter(RowwiseParallel):
    """Row-parallel W [out, in/tp]; a LoRA adapter's A [rank, in/tp] sharded like the input, B
    [out, rank] and the bias whole: x A^T is a partial sum as x W^T is, and both are reduced in
    the one reduction (or reduce-scatter) of the sum."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _distribute_params(module, device_mesh, lambda p: Shard(1) if p in ("weight", "lora_a") else Replicate(),
                           self.src_data_rank)


def _column(module: nn.Module):
    return _ColwiseWithAdapter() if isinstance(module, LoRALinear) else ColwiseParallel()


def _row(module: nn.Module, **kwargs):
    return _RowwiseWithAdapter(**kwargs) if isinstance(module, LoRALinear) else RowwiseParallel(**kwargs)


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `model` in place over tp_mesh (a 1-D DeviceMesh)."""
    # Between blocks: sequence-sharded with SP, replicated without.
    stream = Shard(1) if sequence_parallel else Replicate()
    if model.first_stage:  # a pipeline stage may lack the embedding or the output
        apply_vocab_parallel_embedding(model, tp_mesh, sequence_parallel)
        if sequence_parallel and model.embed_norm is not None:
            parallelize_module(model, tp_mesh, {"embed_norm": SequenceParallel(use_local_output=True)})
    if model.last_stage:
        if sequence_parallel:  # the last of them hands a sequence-sharded DTensor to the output layer
            ends = (["norm"] if model.norm is not None else []) + (["head.dense", "head.norm"] if model.head is not None else [])
            parallelize_module(model, tp_mesh, {name: SequenceParallel(use_local_output=name != ends[-1])
                                                for name in ends})
        apply_vocab_parallel_output(model, tp_mesh)
    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(
                input_layouts=(stream, None), desired_input_layouts=(Replicate(), None)
            ),
            "attention.wq": _column(block.attention.wq),
            "attention.wk": _column(block.attention.wk),
            "attention.wv": _column(block.attention.wv),
            "attention.wo": _row(block.attention.wo, output_layouts=stream),
        }
        # A MoE layer is not tensor-parallel: it routes the stream's local tokens (see
        # loom.parallel.expert); a dense MLP is column- then row-parallel.
        if not isinstance(block.feed_forward, MoE):
            plan.update({
                "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": _column(block.feed_forward.w1),
                "feed_forward.w2": _row(block.feed_forward.w2, output_layouts=stream),
            })
            if block.feed_forward.w3 is not None:
                plan["feed_forward.w3"] = _column(block.feed_forward.w3)
        if sequence_parallel:
            # Local tensors out: the residual additions (before or after the norms) stay plain.
            plan["attention_norm"] = SequenceParallel(use_local_output=True)
            plan["ffn_norm"] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
