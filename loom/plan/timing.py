"""Step time of a training layout on one device, term by term.

Work per micro-batch and pipeline stage, with t = micro_batch * seq_len / cp local tokens:
- matmuls: 2 t (block matrices / tp) FLOPs forward, x3 with backward (x4 with full recompute),
  plus the output layer on the last stage; at `matmul` efficiency of the peak.
- attention: causal flash attention skips masked blocks, so each query sees seq_len / 2 keys on
  average (load-balanced under cp): 2 t seq_len dim / tp FLOPs forward; backward 2.5x forward
  (it recomputes the scores); at `attention` efficiency.
- element-wise work (norms, RoPE, SwiGLU, residual additions) as memory traffic at the device's
  memory bandwidth, plus a fixed overhead per layer and pass (kernel launches, Python).
- tp (sequence parallel): per layer 4 all-gathers / reduce-scatters of [t, dim] forward and 4
  backward, each moving (tp - 1) / tp of it in tp - 1 ring steps; not overlapped.
- cp (ring): per layer (cp - 1) KV blocks forward, (cp - 1) KV blocks + cp fp32 dKV backward;
  the `cp_overlap` share of min(transfer, attention) is hidden.
- pp: one activation forward and one gradient backward per micro-batch and boundary; bubble:
  (pp - 1) / v extra micro-batch slots for 1F1B, GPipe and interleaved (v virtual stages), a third
  of that for zero-bubble.
- FSDP over (dp_shard, cp): under parallel.zero=3 without a pipeline each micro-batch all-gathers
  every parameter twice (forward, and again for backward) in the compute dtype; under zero=1 or a
  pipeline once per step. Gradients are reduce-scattered in fp32 after every micro-batch under
  zero=3, once per step under zero=1 (and zero-bubble schedules). The `dp_overlap` share of min(transfer, compute) is
  hidden.
  Expert-parallel experts are gathered over dp_shard x cp / ep ranks only, E / ep of them.
- MoE: a token's top-k experts are matmuls like the others, but not tensor-parallel (a tp rank
  routes its sequence shard; without sequence parallelism every tp rank computes them all).
  Under ep, per layer and micro-batch, the routed copies of the local tokens (t / sp x k rows)
  go out and come back by all-to-all, forward and backward (and again when recomputed), moving
  (ep - 1) / ep of them over the ep group (ep x tp consecutive devices); not overlapped.
- AdamW (and gradient clipping): memory-bound passes over the local fp32 states.
Links: tp is innermost, so it is in a node when tp <= GPUs per node; cp when tp cp fits; FSDP
when tp cp dp fits; pp when the whole world fits. Otherwise the inter-node bandwidth applies.
On CPU, ranks beyond the core count share cores: compute and overheads slow by world / cores.
"""
from __future__ import annotations

from dataclasses import dataclass

from loom.metrics.flops import flops_per_token
from loom.models.transformer import ModelConfig
from loom.parallel.zero import accumulates_unsharded_grads, keeps_units_gathered
from loom.plan.hardware import HardwareSpec
from loom.plan.memory import (DTYPE_BYTES, WEIGHT_GATHER_BYTES, Layout, active_block_matrices, device_layers,
                              expert_params, stage_params)

OPTIMIZER_BYTES_PER_PARAM = 40  # fused AdamW reads param, grad, m, v and writes param, m, v; clipping reads grads


@dataclass(frozen=True)
class TimeBreakdown:
    """Seconds per optimizer step on the slowest device."""

    matmul: float
    attention: float
    overhead: float
    tp_comm: float
    cp_comm: float  # exposed (after overlap)
    pp_comm: float
    bubble: float
    dp_comm: float  # exposed
    optimizer: float
    ep_comm: float = 0.0

    @property
    def total(self) -> float:
        return (self.matmul + self.attention + self.overhead + self.tp_comm + self.cp_comm + self.pp_comm
                + self.bubble + self.dp_comm + self.optimizer + self.ep_comm)

    def rows(self) -> list[tuple[str, float]]:
        return [("matmuls", self.matmul), ("attention", self.attention), ("element-wise + per-layer overhead", self.overhead),
                ("tp collectives", self.tp_comm), ("cp ring (exposed)", self.cp_comm),
                ("pp transfers", self.pp_comm), ("pipeline bubble", self.bubble),
                ("FSDP collectives (exposed)", self.dp_comm), ("ep all-to-all", self.ep_comm),
                ("optimizer step", self.optimizer),
                ("total", self.total)]


def _link_gbps(spec: HardwareSpec, span: int) -> float:
    """Bandwidth of a group whose members lie within `span` consecutive devices."""
    return spec.intra_node_gbps if span <= spec.gpus_per_node else spec.inter_node_gbps


def _transfer_s(spec: HardwareSpec, nbytes: float, span: int, count: int = 1) -> float:
    bw = _link_gbps(spec, span) * 1e9 * spec.efficiency.link
    return nbytes / bw + count * spec.efficiency.collective_latency_s


def elementwise_bytes_per_token(cfg: ModelConfig, layout: Layout) -> float:
    """Memory traffic of one layer's element-wise work per local token, forward + backward: the
    two RMSNorms (fp32 in, compute dtype out), RoPE on q and k, SwiGLU, and the two fp32 residual
    additions; backward moves about twice the forward's bytes; recomputation repeats the forward
    (`selective` repeats all but the residual additions)."""
    e = DTYPE_BYTES[layout.dtype]
    tp = layout.tp
    sp = layout.sp
    h, f, hk = cfg.dim, cfg.ffn_dim, cfg.n_kv_heads * cfg.head_dim
    norms = 2 * (4 + e) * h / sp
    rope = 2 * e * (h + hk) / tp
    swiglu = (3 if cfg.gated else 2) * e * f / tp  # SwiGLU reads two inputs; GeLU, squared-ReLU one
    residual = 2 * 12 * h / sp
    forward = norms + rope + swiglu + residual
    total = 3 * forward
    if layout.recompute == "full":
        total += forward
    elif layout.recompute == "selective":
        total += forward - residual
    return total


def fp8_cast_bytes_per_token(cfg: ModelConfig, layout: Layout) -> float:
    """Memory traffic of one layer's FP8 casts per local token (torchao, dynamic scales): each
    linear casts its own input forward (q, k, v and gate, up each cast the same normed input) and
    its output's gradient backward, reading the bf16 tensor and writing float8, and the weight
    gradient's GEMM reads both again transposed (a float8 read and write). Amax reductions are
    counted as one more read of each tensor; full recompute casts the inputs again. The weights'
    own casts (once per gather) are not per token and are left out."""
    if layout.dtype != "fp8":
        return 0.0
    e = DTYPE_BYTES[layout.dtype]
    h, f, hk = cfg.dim, cfg.ffn_dim, cfg.n_kv_heads * cfg.head_dim
    gates = 2 if cfg.gated else 1
    inputs = 3 * h + h + gates * h + f  # q k v, out, gate (up), down
    grads = (h + 2 * hk) + h + gates * f + h
    total = (2 * e + 1 + 2) * (inputs + grads)
    if layout.recompute == "full":
        total += (2 * e + 1) * inputs
    return total / layout.tp


def _rates(layout: Layout, spec: HardwareSpec) -> tuple[float, float, float]:
    """FLOP/s of (the blocks' GEMMs, the output layer's GEMMs, attention). Under FP8 the blocks'
    GEMMs run at the FP8 peak and its own efficiency; the output layer (kept in bf16) and
    attention (bf16 flash attention, as in NeMo's and torchtitan's FP8 recipes) at bf16's."""
    eff = spec.efficiency
    if layout.dtype == "fp8":
        bf16 = spec.peak_flops("bfloat16")
        return spec.peak_flops("fp8") * eff.fp8_matmul, bf16 * eff.matmul, bf16 * eff.attention
    peak = spec.peak_flops(layout.dtype)
    return peak * eff.matmul, peak * eff.matmul, peak * eff.attention


def step_time(cfg: ModelConfig, layout: Layout, spec: HardwareSpec) -> TimeBreakdown:
    """One optimizer step's time, by part, on the pipeline rank that paces it."""
    pp = layout.pp
    layers = device_layers(cfg, layout)
    # (matmul, attention, overhead, tp, cp, ep) seconds per micro-batch on each pp rank
    per_stage = [_stage_time(cfg, layout, spec, r, len(layers[r])) for r in range(pp)]
    pp_s = 0.0
    if pp > 1:
        pp_s = _transfer_s(spec, 2 * layout.local_tokens * cfg.dim * DTYPE_BYTES[layout.dtype] / layout.sp,
                           layout.world, count=2)
    slot = max(sum(x) for x in per_stage) + pp_s  # the slowest stage paces the pipeline
    slowest = max(range(pp), key=lambda r: sum(per_stage[r]))
    mm_s, attn_s, over_s, tp_s, cp_s, ep_s = (x * layout.n_micro for x in per_stage[slowest])
    bubble = 0.0
    if pp > 1:
        extra = (pp - 1) / layout.pp_virtual_stages
        if layout.pp_schedule == "zero-bubble":
            extra /= 3
        bubble = extra * slot
    params = stage_params(cfg, layout)[slowest]  # on one device of the tp group, before FSDP
    dp_s = _data_parallel_time(cfg, layout, spec, params, len(layers[slowest]), mm_s + attn_s + over_s)
    share = _core_share(layout, spec)
    optimizer_s = params / (layout.dp * layout.cp) * OPTIMIZER_BYTES_PER_PARAM / (spec.memory_gbps * 1e9 * share)
    return TimeBreakdown(mm_s, attn_s, over_s, tp_s, cp_s, pp_s * layout.n_micro, bubble, dp_s, optimizer_s, ep_s)


def _core_share(layout: Layout, spec: HardwareSpec) -> float:
    """The share of a device one rank has: 1 on GPUs, the CPU cores per rank on a CPU."""
    return 1.0 if spec.cores is None else min(1.0, spec.cores / layout.world)


def _stage_time(cfg: ModelConfig, layout: Layout, spec: HardwareSpec, r: int, n: int) -> tuple[float, ...]:
    """(matmul, attention, overhead, tp, cp, ep) seconds of one micro-batch on pp rank r, which
    holds n layers."""
    eff, e, share = spec.efficiency, DTYPE_BYTES[layout.dtype], _core_share(layout, spec)
    block_rate, output_rate, attention_rate = _rates(layout, spec)
    t, tp, cp = layout.local_tokens, layout.tp, layout.cp
    matrices = active_block_matrices(cfg)  # FLOPs: a token's experts only
    routed = cfg.moe_top_k * expert_params(cfg) // max(1, cfg.moe_experts)  # of which not tensor-parallel
    passes = 4 if layout.recompute == "full" else 3  # forward, backward (2x), recompute
    mm_s = n * 2 * t * ((matrices - routed) / tp + routed / layout.sp) * passes / (block_rate * share)
    if r == (layout.pp * layout.pp_virtual_stages - 1) % layout.pp:  # holds the last stage: the output layer
        mm_s += 6 * t * cfg.vocab_size * cfg.dim / tp / (output_rate * share)
    # Causal flash attention does half of QK^T and AV; bidirectional (BERT) all of it.
    attn_fwd = (2 if cfg.causal else 4) * t * layout.seq_len * cfg.n_heads * cfg.head_dim / tp
    attn_s = n * attn_fwd * (3.5 + (1.0 if layout.recompute == "full" else 0.0)) / (attention_rate * share)
    over_s = n * (passes - 1) * eff.layer_overhead_s / share  # forward, backward (, recompute)
    traffic = elementwise_bytes_per_token(cfg, layout) + fp8_cast_bytes_per_token(cfg, layout)
    over_s += n * t * traffic / (spec.memory_gbps * 1e9 * eff.memory * share)
    tp_s = 0.0
    if tp > 1:
        nbytes = 8 * (tp - 1) / tp * t * cfg.dim * e
        tp_s = n * (_transfer_s(spec, nbytes, tp, count=8 * (tp - 1)) + (passes - 1) * eff.tp_layer_overhead_s / share)
    cp_s = 0.0
    if cp > 1:
        kv = t * 2 * cfg.n_kv_heads * cfg.head_dim / tp
        nbytes = (cp - 1) * kv * e * 2 + cp * kv * 4
        comm = n * _transfer_s(spec, nbytes, tp * cp, count=3 * cp - 2)
        cp_s = comm - eff.cp_overlap * min(comm, attn_s) + n * (passes - 1) * (cp - 1) * eff.cp_step_overhead_s / share
    ep_s = 0.0
    if layout.ep > 1:
        ep, exchanges = layout.ep, 6 if layout.recompute == "full" else 4
        nbytes = exchanges * (ep - 1) / ep * t / layout.sp * cfg.moe_top_k * cfg.dim * e
        ep_s = n * _transfer_s(spec, nbytes, tp * ep, count=exchanges * (ep - 1))
    return mm_s, attn_s, over_s, tp_s, cp_s, ep_s


def _data_parallel_time(cfg: ModelConfig, layout: Layout, spec: HardwareSpec, params: float, n: int,
                        compute_s: float) -> float:
    """FSDP's gathers and reduce-scatters of a step on the pacing rank (params of its stage, n
    layers), less what overlaps with compute_s."""
    shard, pp = layout.dp * layout.cp, layout.pp
    if shard == 1:
        return 0.0
    eff, e = spec.efficiency, DTYPE_BYTES[layout.dtype]
    gathers = 1 if keeps_units_gathered(layout.zero, pp) else 2 * layout.n_micro
    reduces = 1 if accumulates_unsharded_grads(layout.zero, pp, layout.pp_schedule) else layout.n_micro
    # Experts travel over their own FSDP group: E / ep of them, over shard / ep ranks.
    experts = n * expert_params(cfg)
    moved = (params - experts) * (shard - 1) / shard + experts / layout.ep * (1 - layout.ep / shard)
    gather = gathers * moved * WEIGHT_GATHER_BYTES.get(layout.dtype, e)  # FP8: block matrices as float8
    reduce = reduces * moved * 4
    ops = (gathers + reduces) * (n + 2)  # per unit: blocks, embedding, norm + output
    comm = _transfer_s(spec, gather + reduce, layout.tp * layout.cp * layout.dp, count=ops * (shard - 1))
    return comm - eff.dp_overlap * min(comm, compute_s) + ops * eff.fsdp_block_overhead_s / _core_share(layout, spec)


@dataclass(frozen=True)
class Throughput:
    step_time_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float  # model FLOPs, megatron convention
    mfu: float


def throughput(cfg: ModelConfig, layout: Layout, spec: HardwareSpec, time: TimeBreakdown) -> Throughput:
    tokens = layout.global_batch * layout.seq_len / layout.world
    tps = tokens / time.total
    tflops = tps * flops_per_token(cfg, layout.seq_len, "megatron") / 1e12
    return Throughput(time.total, tps, tflops, tflops * 1e12 / spec.peak_flops(layout.dtype))
