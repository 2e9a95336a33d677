"""Per-device memory of a training layout, term by term, for loom's implementation.

Conventions (what loom does, see README):
- fp32 master weights, fp32 gradients and two fp32 AdamW states: 16 bytes per parameter, sharded by
  FSDP over (dp_shard, cp), by tp for the block matrices, embedding and output layer (norm gains
  are replicated over tp), and by pipeline stage. Under parallel.zero=1 (and zero-bubble
  schedules, whose split backward defers the reduce to a stage's last backward), FSDP also
  accumulates each micro-batch's gradients unsharded in fp32: 4 more bytes per parameter of the
  stage.
- FSDP units are the embedding (gathered in fp32), each block and the final norm with the output
  layer (compute dtype). zero=3 without a pipeline holds the last unit (kept for backward) and two
  others (current + prefetched) gathered, plus one block's unsharded fp32 gradients waiting for
  their reduce-scatter; zero=1 or a pipeline holds every unit of the stage gathered (see
  loom.parallel.fsdp).
- Activations saved per layer and token of the local sequence shard (t = micro_batch * seq_len /
  cp tokens), e = bytes of the compute dtype, h = hidden, hk = kv heads x head dim, f = ffn, with
  sequence parallelism (sp = tp) the residual stream is sharded over tp:
      two fp32 residual inputs of the RMSNorms      8 h / sp
      the two normed matmul inputs (gathered)       2 e h
      q, k, v after RoPE                            e (h + 2 hk) / tp
      attention output (the out-projection input)   e h / tp   (+ fp32 log-sum-exp, 4 heads / tp)
      gate, up and SwiGLU outputs                   3 e f / tp
  `selective` recompute drops the normed inputs and the SwiGLU product; `full` keeps only each
  layer's input (4 h / sp) per micro-batch in flight, plus one layer's activations during its
  backward (once, not per micro-batch).
- Pipeline: the first stage holds the most micro-batches in flight: min(pp, micro-batches) for
  1F1B (x (1 + (pp - 1) / (pp v)) interleaved), all of them for GPipe; 1 without pipelining.
- Output layer and loss, fused and chunked in every layout (vocabulary-parallel under tp): one
  chunk of fp32 logits [c, V/tp] and its compute-dtype copy, plus what the fused loss computes in
  forward and holds until backward, per micro-batch in flight on the last stage: the output
  weight's fp32 gradient [V/tp, D] and the hidden states' fp32 gradient [t, D].
- A fixed reserve (CUDA context, NCCL/cuBLAS workspaces) and an allocator margin of 8% of the rest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loom.metrics.flops import param_counts
from loom.models.loss import chunk_tokens
from loom.models.transformer import ModelConfig
from loom.parallel.zero import accumulates_unsharded_grads, keeps_units_gathered
from loom.parallel.pipeline import stage_layers
from loom.plan.hardware import GIB, HardwareSpec

ALLOCATOR_MARGIN = 0.08  # fragmentation and caching-allocator slack, as a share of the counted bytes
# Bytes of the compute dtype: activations, gathered parameters, communication. An FP8 run
# ("fp8": train.fp8 on top of bf16) computes around its GEMMs in bf16 and keeps what backward
# needs in bf16 (torchao saves the high-precision inputs); only the FSDP gather of the block
# matrices moves float8 (WEIGHT_GATHER_BYTES).
DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "fp8": 2}
WEIGHT_GATHER_BYTES = {"fp8": 1}


@dataclass(frozen=True)
class Layout:
    """One training layout. dp is dp_shard (FSDP); the world is tp x cp x pp x dp; ep (MoE experts
    split over ep ranks) is borrowed from dp x cp."""

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
    zero: int = 3
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @classmethod
    def from_config(cls, cfg, dims) -> "Layout":
        """The layout of a loom config (its [parallel] and [train] sections) with resolved
        degrees `dims` (a ParallelDims; dp_replicate counts as more data-parallel ranks)."""
        p, t = cfg.parallel, cfg.train
        return cls(tp=dims.tp, cp=dims.cp, pp=dims.pp, dp=dims.dp, micro_batch=t.micro_batch, seq_len=t.seq_len,
                   global_batch=t.global_batch, recompute=t.recompute,
                   dtype="fp8" if t.fp8 != "none" else t.dtype, pp_schedule=p.pp_schedule,
                   pp_virtual_stages=p.pp_virtual_stages, sequence_parallel=p.sequence_parallel, zero=p.zero,
                   ep=dims.ep)

    @property
    def n_micro(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def local_tokens(self) -> int:
        """Tokens of one micro-batch on one device (before sequence parallelism)."""
        return self.micro_batch * self.seq_len // self.cp

    @property
    def sp(self) -> int:
        """The factor sequence parallelism divides a device's tokens by between the matmuls."""
        return self.tp if (self.tp > 1 and self.sequence_parallel) else 1


def block_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matrix parameters, other parameters: norms and biases) of one transformer block."""
    counts = param_counts(cfg)
    matrices = counts.block_matmuls // cfg.n_layers
    return matrices, counts.blocks // cfg.n_layers - matrices


def active_block_matrices(cfg: ModelConfig) -> int:
    """Matrix parameters of one block that a token runs through (top-k experts of a MoE)."""
    return param_counts(cfg).active_block_matmuls // cfg.n_layers


def expert_params(cfg: ModelConfig) -> int:
    """One block's MoE expert matrices (0 for a dense model): not tensor-parallel, split over ep."""
    return cfg.moe_experts * (3 if cfg.gated else 2) * cfg.dim * cfg.ffn_dim


def _block_params_per_device(cfg: ModelConfig, tp: int) -> float:
    """One block's parameters on one device of its tp group: matrices and the biases of the
    column-parallel projections (q, k, v, up, gate) sharded; row-parallel biases and norms whole;
    MoE experts (and their router, counted with the norms) whole, replicated over tp
    (loom.parallel.expert)."""
    matrices, others = block_params(cfg)
    replicated = expert_params(cfg)
    column_biases = ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
                     + (2 if cfg.gated else 1) * cfg.ffn_dim) if cfg.bias else 0
    return (matrices - replicated) / tp + replicated + column_biases / tp + (others - column_biases)


def _end_params_per_device(cfg: ModelConfig, tp: int, first: bool, last: bool) -> float:
    """The embeddings (first stage) and the final norm / masked-LM head and output layer (last
    stage) on one device: token table and output rows vocabulary-parallel, the rest whole. A tied
    output weight is the embedding's on a stage that holds both, else the last stage's copy."""
    counts = param_counts(cfg)
    table = cfg.vocab_size * cfg.dim
    p = 0.0
    if first:
        p += table / tp + (counts.embedding - table)
    if last:
        p += counts.final_norm
        p += (cfg.vocab_size / tp if cfg.mlm_head else 0)  # the output bias, vocabulary-parallel
        if not cfg.tie_embeddings or not first:
            p += table / tp
    return p


def stage_params(cfg: ModelConfig, layout: Layout) -> list[float]:
    """Parameters each pipeline stage holds on one device of its tp group (before FSDP)."""
    n_stages = layout.pp * layout.pp_virtual_stages
    per_layer = _block_params_per_device(cfg, layout.tp)
    out = []
    for s, layers in enumerate(stage_layers(cfg.n_layers, n_stages)):
        out.append(len(layers) * per_layer + _end_params_per_device(cfg, layout.tp, s == 0, s == n_stages - 1))
    # With virtual stages a device holds pp_virtual_stages of them (stages r, r + pp, ...).
    return [sum(out[r::layout.pp]) for r in range(layout.pp)]


def activation_bytes_per_token(cfg: ModelConfig, layout: Layout) -> float:
    """Bytes saved for backward per layer and local token (see the module docstring)."""
    e = DTYPE_BYTES[layout.dtype]
    tp = layout.tp
    sp = layout.sp
    h, f = cfg.dim, cfg.ffn_dim
    hq, hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # gated: both projections and their product. A MoE token does it in each of its top-k
    # experts, which are not tensor-parallel (a tp rank routes its sequence shard); its routed
    # copies add little (measured on the dry run's trace of Mixtral: k x 3 e f / sp in all).
    if cfg.moe_experts:
        mlp = cfg.moe_top_k * (3 if cfg.gated else 2) * e * f / sp
    else:
        mlp = (3 if cfg.gated else 2) * e * f / tp
    full = (8 * h / sp + 2 * e * h + e * (hq + 2 * hk) / tp + e * hq / tp + 4 * cfg.n_heads / tp + mlp)
    if layout.recompute == "selective" and not cfg.moe_experts:  # a MoE block recomputes no element-wise
        return full - 2 * e * h - e * f / tp                      # work (loom.parallel.recompute)
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


def loss_chunk_tokens(tokens: int, vocab_local: int, spec: HardwareSpec) -> int:
    """Tokens per chunk of the fused loss: loom.models.loss.chunk_tokens on this device kind."""
    return chunk_tokens(tokens, vocab_local, torch.device("cpu" if spec.cores is not None else "cuda"))


def rank_memory(cfg: ModelConfig, layout: Layout, spec: HardwareSpec, r: int) -> MemoryBreakdown:
    """Per-device memory of pp rank r (all its virtual stages)."""
    e = DTYPE_BYTES[layout.dtype]
    shard = layout.dp * layout.cp  # FSDP's group
    stage = stage_params(cfg, layout)[r]
    n_layers = len(device_layers(cfg, layout)[r])
    block = _block_params_per_device(cfg, layout.tp)
    t = layout.local_tokens
    sp = layout.sp
    n_stages = layout.pp * layout.pp_virtual_stages
    holds_first, holds_last = r == 0, r == (n_stages - 1) % layout.pp
    embedding = _end_params_per_device(cfg, layout.tp, True, False) if holds_first else 0.0
    # FSDP gathers a block with only this rank's E / ep experts.
    not_gathered = expert_params(cfg) * (1 - 1 / layout.ep)

    params = stage / shard
    gradients = 4 * params
    if shard > 1 and accumulates_unsharded_grads(layout.zero, layout.pp, layout.pp_schedule):
        gradients += 4 * stage
    fsdp = 0.0
    w = WEIGHT_GATHER_BYTES.get(layout.dtype, e)  # a gathered block's bytes per parameter
    if shard > 1 and keeps_units_gathered(layout.zero, layout.pp):
        ends = stage - n_layers * block - embedding  # final norm and output layer
        fsdp = w * n_layers * (block - not_gathered) + e * ends + 4 * embedding
    elif shard > 1:
        block -= not_gathered
        last_unit = e * _end_params_per_device(cfg, layout.tp, False, True) if holds_last else w * block
        others = [block] * (n_layers - (0 if holds_last else 1))
        fsdp = last_unit + 2 * max([w * x for x in others] + [4 * embedding]) + 4 * block

    # Stage r of 1F1B keeps pp - r micro-batches in flight.
    in_flight = in_flight_micro_batches(layout) if layout.pp == 1 else max(
        1.0, in_flight_micro_batches(layout) * (layout.pp - r) / layout.pp)
    if layout.recompute == "full":  # each layer's input per micro-batch in flight, plus the one
        # layer being recomputed (once: it exists only during that layer's backward)
        acts = n_layers * t * 4 * cfg.dim / sp * in_flight + t * activation_bytes_per_token(
            cfg, dataclasses.replace(layout, recompute="none"))
    else:
        acts = n_layers * t * activation_bytes_per_token(cfg, layout) * in_flight
    logits = 0.0
    if holds_last:
        vocab_local = cfg.vocab_size / layout.tp
        chunk = loss_chunk_tokens(t, int(vocab_local), spec)
        held = 4 * (vocab_local * cfg.dim + t * cfg.dim)  # grad of the output weight and of h
        # The last stage runs each micro-batch's backward right after its forward, but GPipe.
        last_in_flight = layout.n_micro if layout.pp > 1 and layout.pp_schedule == "gpipe" else 1
        logits = chunk * vocab_local * (4 + e) + held * last_in_flight
    comm = 0.0
    if layout.cp > 1:  # two KV blocks in flight (current and next) + the fp32 dKV accumulator
        hk = cfg.n_kv_heads * cfg.head_dim / layout.tp
        comm += t * 2 * hk * (2 * e + 4)
    if layout.tp > 1:  # the gathered sequence of one matmul input
        comm += layout.micro_batch * layout.seq_len / layout.cp * cfg.dim * e
    if layout.ep > 1:  # one layer's tokens in transit: sent and received, in and out
        comm += 2 * t / sp * cfg.moe_top_k * cfg.dim * e
    optimizer = 8 * params
    counted = 4 * params + gradients + optimizer + fsdp + acts + logits + comm
    return MemoryBreakdown(parameters=4 * params, gradients=gradients, optimizer=optimizer, fsdp_buffers=fsdp,
                           activations=acts, logits=logits, comm_buffers=comm, reserved=spec.reserved_gb * GIB,
                           margin=ALLOCATOR_MARGIN * counted)


def memory_breakdown(cfg: ModelConfig, layout: Layout, spec: HardwareSpec) -> MemoryBreakdown:
    """Per-device memory of the most loaded device."""
    return max((rank_memory(cfg, layout, spec, r) for r in range(layout.pp)), key=lambda m: m.total)


def device_layers(cfg: ModelConfig, layout: Layout) -> list[list[int]]:
    n_stages = layout.pp * layout.pp_virtual_stages
    stages = stage_layers(cfg.n_layers, n_stages)
    return [sum(stages[r::layout.pp], []) for r in range(layout.pp)]


def capacity_bytes(spec: HardwareSpec, world: int) -> float:
    """Memory one device may use; on CPU the ranks of a job share the machine's memory."""
    if spec.cores is not None:
        return spec.memory_gb * GIB / world
    return spec.memory_gb * GIB

