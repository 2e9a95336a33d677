"""Per-device memory of a training layout, term by term, for loom's implementation.

Conventions (what loom does, see README):
- fp32 master weights, fp32 gradients and two fp32 AdamW states: 16 bytes per parameter, sharded by
  FSDP over (dp_shard, cp), by tp for the block matrices, embedding and output layer (norm gains
  are replicated over tp), and by pipeline stage.
- Under FSDP each block's parameters are gathered for its forward and backward in the compute
  dtype (bf16: 2 bytes), the next block is prefetched, the last block stays gathered, and one
  block's unsharded fp32 gradients wait for their reduce-scatter.
- Activations saved per layer and token of the local sequence shard (t = micro_batch * seq_len /
  cp tokens), e = bytes of the compute dtype, h = hidden, hk = kv heads x head dim, f = ffn, with
  sequence parallelism (sp = tp) the residual stream is sharded over tp:
      two fp32 residual inputs of the RMSNorms      8 h / sp
      the two normed matmul inputs (gathered)       2 e h
      q, k, v after RoPE                            e (h + 2 hk) / tp
      attention output (the out-projection input)   e h / tp   (+ fp32 log-sum-exp, 4 heads / tp)
      gate, up and SwiGLU outputs                   3 e f / tp
  `selective` recompute drops the normed inputs and the SwiGLU product; `full` keeps only each
  layer's input (4 h / sp) plus one layer's activations during its backward.
- Pipeline: the first stage holds the most micro-batches in flight: min(pp, micro-batches) for
  1F1B (x (1 + (pp - 1) / (pp v)) interleaved), all of them for GPipe; 1 without pipelining.
- Output layer: loom's loss is fused and chunked (no full logits) without tp; under tp the
  vocabulary-sharded logits are kept in fp32 (4 V / tp per token) plus the compute-dtype copy.
- A fixed reserve (CUDA context, NCCL/cuBLAS workspaces) and an allocator margin of 8% of the rest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from loom.models.llama import LlamaConfig
from loom.parallel.pipeline import stage_layers
from loom.plan.hardware import GIB, HardwareSpec

ALLOCATOR_MARGIN = 0.08  # fragmentation and caching-allocator slack, as a share of the counted bytes
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class Layout:
    """One training layout. dp is dp_shard (FSDP); the world is tp x cp x pp x dp."""

    tp: int
    cp: int
    pp: int
    dp: int
    micro_batch: int
    seq_len: int
    global_batch: int  # sequences per step
    recompute: str = "none"
    dtype: str = "bfloat16"
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    sequence_parallel: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def n_micro(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def local_tokens(self) -> int:
        """Tokens of one micro-batch on one device (before sequence parallelism)."""
        return self.micro_batch * self.seq_len // self.cp


def block_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(matrix parameters, norm parameters) of one transformer block."""
    e = cfg.head_dim
    matrices = 2 * cfg.dim * cfg.n_heads * e + 2 * cfg.dim * cfg.n_kv_heads * e + 3 * cfg.dim * cfg.ffn_dim
    return matrices, 2 * cfg.dim


def stage_params(cfg: LlamaConfig, layout: Layout) -> list[float]:
    """Parameters each pipeline stage holds on one device of its tp group (before FSDP)."""
    n_stages = layout.pp * layout.pp_virtual_stages
    matrices, norms = block_params(cfg)
    per_layer = matrices / layout.tp + norms
    out = []
    for s, layers in enumerate(stage_layers(cfg.n_layers, n_stages)):
        p = len(layers) * per_layer
        if s == 0:
            p += cfg.vocab_size * cfg.dim / layout.tp
        if s == n_stages - 1:
            p += cfg.vocab_size * cfg.dim / layout.tp + cfg.dim
        out.append(p)
    # With virtual stages a device holds pp_virtual_stages of them (stages r, r + pp, ...).
    return [sum(out[r::layout.pp]) for r in range(layout.pp)]


def activation_bytes_per_token(cfg: LlamaConfig, layout: Layout) -> float:
    """Bytes saved for backward per layer and local token (see the module docstring)."""
    e = DTYPE_BYTES[layout.dtype]
    tp = layout.tp
    sp = tp if (tp > 1 and layout.sequence_parallel) else 1
    h, f = cfg.dim, cfg.ffn_dim
    hk = cfg.n_kv_heads * cfg.head_dim
    full = (8 * h / sp + 2 * e * h + e * (h + 2 * hk) / tp + e * h / tp + 4 * cfg.n_heads / tp
            + 3 * e * f / tp)
    if layout.recompute == "selective":
        return full - 2 * e * h - e * f / tp
    return full


def in_flight_micro_batches(layout: Layout) -> float:
    if layout.pp == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return layout.n_micro
    base = min(layout.pp, layout.n_micro)
    if layout.pp_virtual_stages > 1:
        base *= 1 + (layout.pp - 1) / (layout.pp * layout.pp_virtual_stages)
    return base


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device; `total` includes the reserve and the allocator margin."""

    parameters: float
    gradients: float
    optimizer: float
    fsdp_buffers: float
    activations: float
    logits: float
    comm_buffers: float
    reserved: float
    margin: float

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.fsdp_buffers + self.activations
                + self.logits + self.comm_buffers + self.reserved + self.margin)

    def rows(self) -> list[tuple[str, float]]:
        return [("parameters (fp32)", self.parameters), ("gradients (fp32)", self.gradients),
                ("optimizer states (AdamW, fp32)", self.optimizer), ("FSDP gathered blocks", self.fsdp_buffers),
                ("activations", self.activations), ("logits (loss)", self.logits),
                ("communication buffers", self.comm_buffers), ("reserved (context, workspaces)", self.reserved),
                (f"allocator margin ({100 * ALLOCATOR_MARGIN:.0f}%)", self.margin), ("total", self.total)]


def memory_breakdown(cfg: LlamaConfig, layout: Layout, spec: HardwareSpec) -> MemoryBreakdown:
    """Per-device memory of the most loaded device (the first pipeline stage, or the last when
    the output layer outweighs the first stage's in-flight activations)."""
    e = DTYPE_BYTES[layout.dtype]
    shard = layout.dp * layout.cp  # FSDP's group
    per_stage = stage_params(cfg, layout)
    n_layers_stage = [len(x) for x in device_layers(cfg, layout)]
    matrices, norms = block_params(cfg)
    block = matrices / layout.tp + norms
    t = layout.local_tokens
    sp = layout.tp if (layout.tp > 1 and layout.sequence_parallel) else 1

    candidates = []
    for r in range(layout.pp):
        params = per_stage[r] / shard
        fsdp = 0.0
        if shard > 1:
            root = per_stage[r] - n_layers_stage[r] * block
            fsdp = (3 * e + 4) * block + (e + 4) * root
        if layout.recompute == "full":
            acts = n_layers_stage[r] * t * 4 * cfg.dim / sp + t * activation_bytes_per_token(
                cfg, dataclasses.replace(layout, recompute="none"))
        else:
            acts = n_layers_stage[r] * t * activation_bytes_per_token(cfg, layout)
        # Stage r of 1F1B keeps pp - r micro-batches in flight.
        in_flight = in_flight_micro_batches(layout) if layout.pp == 1 else max(
            1.0, in_flight_micro_batches(layout) * (layout.pp - r) / layout.pp)
        acts *= in_flight
        logits = 0.0
        if r == layout.pp - 1 and layout.tp > 1:
            logits = t * (4 + e) * cfg.vocab_size / layout.tp
        elif r == layout.pp - 1:  # one chunk's fp32 logits and their gradient
            chunk_bytes = 8 * 2**20 if spec.cores is not None else GIB
            logits = min(t, max(64, chunk_bytes // (4 * cfg.vocab_size))) * 4 * cfg.vocab_size * 2
        comm = 0.0
        if layout.cp > 1:  # two KV blocks in flight (current and next) + the fp32 dKV accumulator
            hk = cfg.n_kv_heads * cfg.head_dim / layout.tp
            comm += t * 2 * hk * (2 * e + 4)
        if layout.tp > 1:  # the gathered sequence of one matmul input
            comm += layout.micro_batch * layout.seq_len / layout.cp * cfg.dim * e
        counted = 4 * params + 4 * params + 8 * params + fsdp + acts + logits + comm
        candidates.append(MemoryBreakdown(
            parameters=4 * params, gradients=4 * params, optimizer=8 * params, fsdp_buffers=fsdp,
            activations=acts, logits=logits, comm_buffers=comm, reserved=spec.reserved_gb * GIB,
            margin=ALLOCATOR_MARGIN * counted))
    return max(candidates, key=lambda m: m.total)


def device_layers(cfg: LlamaConfig, layout: Layout) -> list[list[int]]:
    n_stages = layout.pp * layout.pp_virtual_stages
    stages = stage_layers(cfg.n_layers, n_stages)
    return [sum(stages[r::layout.pp], []) for r in range(layout.pp)]


def capacity_bytes(spec: HardwareSpec, world: int) -> float:
    """Memory one device may use; on CPU the ranks of a job share the machine's memory."""
    if spec.cores is not None:
        return spec.memory_gb * GIB / world
    return spec.memory_gb * GIB

