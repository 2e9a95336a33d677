"""The [parallel] section's checks, before anything starts: each names the setting, its value and
what is allowed. The allowed values live with the code that implements them (schedules in
pipeline.py, CP comm variants in context/, ZeRO modes in zero.py)."""
from __future__ import annotations

from loom.models.transformer import ModelConfig
from loom.parallel.context import COMMS
from loom.parallel.context.sharding import chunk_count
from loom.parallel.dims import ParallelDims
from loom.parallel.zero import ZERO_MODES
from loom.parallel.pipeline import MULTI_STAGE, SCHEDULES
from loom.settings import need, one_of


def check_parallel(p, model: ModelConfig, t, world_size: int | None) -> ParallelDims:
    """p: the [parallel] section; t: [train] (batch sizes and sequence length meet the layout).
    Returns the resolved degrees."""
    for key in ("dp_replicate", "tp", "cp", "pp", "pp_virtual_stages", "ep"):
        v = getattr(p, key)
        need(v >= 1, f"parallel.{key}={v} must be a positive integer")
    need(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard={p.dp_shard} must be -1 (fill) or a positive integer")
    one_of("parallel.pp_schedule", p.pp_schedule, tuple(SCHEDULES))
    one_of("parallel.cp_comm", p.cp_comm, tuple(COMMS))
    one_of("parallel.zero", p.zero, ZERO_MODES)
    dims = ParallelDims.from_section(p, world_size)
    _check_model_split(p, model)
    _check_batch(p, t, dims)
    _check_sequence(p, model, t)
    return dims


def _check_model_split(p, model: ModelConfig) -> None:
    if p.ep > 1:
        need(model.moe_experts > 0, f"parallel.ep={p.ep} needs a mixture-of-experts model (moe.n_experts > 0); "
                                    f"model {model.family!r} is dense: allowed parallel.ep=1")
        need(model.moe_experts % p.ep == 0,
             f"parallel.ep={p.ep} does not divide moe.n_experts={model.moe_experts} (each expert-parallel rank "
             f"holds n_experts / ep experts)")
    need(model.n_kv_heads % p.tp == 0, f"parallel.tp={p.tp} does not divide model.n_kv_heads={model.n_kv_heads}")
    if p.tp > 1:
        for key in ("vocab_size", "ffn_dim"):
            v = getattr(model, key)
            need(v % p.tp == 0, f"parallel.tp={p.tp} does not divide model.{key}={v}")
    need(model.n_layers >= p.pp * p.pp_virtual_stages,
         f"parallel.pp={p.pp} x parallel.pp_virtual_stages={p.pp_virtual_stages} stages exceed "
         f"model.n_layers={model.n_layers}")
    if p.pp_virtual_stages > 1:
        need(p.pp_schedule in MULTI_STAGE,
             f"parallel.pp_virtual_stages={p.pp_virtual_stages} needs parallel.pp_schedule "
             f"{' or '.join(map(repr, MULTI_STAGE))}, not {p.pp_schedule!r}")


def _check_batch(p, t, dims: ParallelDims) -> None:
    need(t.global_batch % (t.micro_batch * dims.dp) == 0,
         f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}"
         + (f" x data-parallel degree {dims.dp}" if dims.dp > 1 else ""))
    if p.pp == 1:
        return
    n_micro = t.global_batch // (t.micro_batch * dims.dp)
    need(n_micro >= p.pp,
         f"parallel.pp={p.pp} needs at least {p.pp} micro-batches per step, but train.global_batch="
         f"{t.global_batch} / (train.micro_batch={t.micro_batch} x data-parallel degree {dims.dp}) gives {n_micro}")
    if p.pp_schedule in MULTI_STAGE:
        need(n_micro % p.pp == 0, f"parallel.pp_schedule={p.pp_schedule!r} needs micro-batches per step "
                                  f"({n_micro}) divisible by parallel.pp={p.pp}")


def _check_sequence(p, model: ModelConfig, t) -> None:
    """Context parallelism cuts the sequence into chunks (two per rank when load-balanced), and
    sequence parallelism then cuts each rank's share over tp."""
    chunks = chunk_count(p.cp, p.cp_load_balance)
    sp = p.tp if p.tp > 1 and p.sequence_parallel else 1
    parts = [f"{'2 x ' if chunks == 2 * p.cp else ''}parallel.cp={p.cp}"] if p.cp > 1 else []
    parts += [f"parallel.tp={p.tp} (sequence parallelism)"] if sp > 1 else []
    need(t.seq_len % (chunks * sp) == 0,
         f"train.seq_len={t.seq_len} is not divisible by {' x '.join(parts)} = {chunks * sp}")
    if p.cp > 1 and p.cp_comm == "a2a":
        for key in ("n_heads", "n_kv_heads"):
            v = getattr(model, key)
            need(v % (p.tp * p.cp) == 0,
                 f"parallel.cp_comm='a2a' needs model.{key}={v} divisible by parallel.tp x parallel.cp "
                 f"= {p.tp * p.cp} (Ulysses shards heads over cp); allowed: cp_comm 'p2p' or 'allgather'")
