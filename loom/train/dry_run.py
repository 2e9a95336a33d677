"""`loom train --dry-run`: a layout's memory per rank, from the real layout, on a laptop.

For a few representative ranks of the job (the first, a middle and the last pipeline stage),
this process joins torch's fake process group as that rank of the full world (Layout.fake) and
builds the model with the builder every run uses (loom.parallel.build: converters, then pipeline
split, CP, TP, EP, recompute, FSDP units), then allocates its shards as fake tensors (nothing is
allocated) and reads off, per rank:
- parameters, gradients and AdamW states: the bytes of this rank's shards (fp32), plus the
  unsharded fp32 gradients that parallel.zero=1 (and zero-bubble schedules) accumulate;
- FSDP's gathered parameters: the units gathered at once (all of them under zero=1 or a
  pipeline, else the last unit kept plus the current and the prefetched one);
- activations: one micro-batch traced forward and backward under fake tensors, its saved
  tensors counted op by op (LiveTensorBytes), times the micro-batches the real pipeline
  schedule (its own action list) keeps in flight on this rank; and the backward's working
  memory beyond them.
No data, checkpoint or accelerator is needed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from loom.metrics.memory import LiveTensorBytes
from loom.parallel.build import build_parallel_model
from loom.parallel.dims import ParallelDims
from loom.parallel.fsdp import fsdp_units
from loom.parallel.zero import accumulates_unsharded_grads, keeps_units_gathered
from loom.parallel.init import local_shard, local_shard_bytes
from loom.parallel.layout import Layout
from loom.settings import DTYPES

FSDP_AXES = ("dp_shard_cp", "dp_replicate", "expert_fsdp")  # the mesh axes FSDP shards over


@dataclass
class RankMemory:
    """Bytes on one rank. activations = per stage traced bytes x micro-batches in flight."""

    kind: str
    rank: int
    stages: list[int]
    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int | None = None
    activations_per_micro_batch: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    backward_working: int | None = None
    note: str = ""

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.gathered
                + (self.activations or 0) + (self.backward_working or 0))

    def rows(self) -> list[tuple[str, int | None]]:
        return [("parameters (fp32 shards)", self.parameters), ("gradients (fp32)", self.gradients),
                ("optimizer states (AdamW)", self.optimizer), ("FSDP gathered parameters", self.gathered),
                ("activations (in flight)", self.activations), ("backward working memory", self.backward_working),
                ("total", self.total)]


def representative_ranks(dims: ParallelDims) -> list[tuple[str, int]]:
    """(kind, global rank) of the first, a middle and the last pipeline stage (pp is the
    outermost mesh axis, so pp rank r starts at global rank r x world / pp)."""
    if dims.pp == 1:
        return [("every rank", 0)]
    per_stage = dims.world_size // dims.pp
    kinds = [("first stage", 0)]
    if dims.pp > 2:
        kinds.append(("middle stage", dims.pp // 2))
    kinds.append(("last stage", dims.pp - 1))
    return [(kind, r * per_stage) for kind, r in kinds]


def _is_fsdp_sharded(p: torch.Tensor) -> bool:
    names = getattr(getattr(p, "device_mesh", None), "mesh_dim_names", None) or ()
    return any(axis in names for axis in FSDP_AXES)


def _gathered_numel(p: torch.Tensor) -> int:
    """Elements of the parameter as FSDP gathers it: whole, or its tensor-parallel slice, or
    (experts) its expert-parallel share."""
    n = p.numel()
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return n
    for name, placement, size in zip(mesh.mesh_dim_names or (), p.placements, mesh.shape):
        if name in ("tp", "ep") and placement.is_shard():
            n //= size
    return n


def _unit_params(unit) -> list[nn.Parameter]:
    modules = unit if isinstance(unit, list) else [unit]
    return [p for m in modules for p in m.parameters()]


def gathered_bytes(modules: list[nn.Module], dims: ParallelDims, zero: int, compute: torch.dtype) -> int:
    """Bytes of FSDP-gathered parameters alive at once on this rank."""
    if dims.dp * dims.cp == 1:
        return 0
    sizes = []
    for module in modules:
        for unit in fsdp_units(module):
            fp32 = isinstance(unit, list) and module.tok_embeddings in unit  # gathered in fp32 (loom.parallel.fsdp)
            item = 4 if fp32 else torch.empty((), dtype=compute).element_size()
            sizes.append(sum(_gathered_numel(p) for p in _unit_params(unit)) * item)
    if keeps_units_gathered(zero, dims.pp):
        return sum(sizes)
    *others, last = sizes
    return last + 2 * max(others, default=0)


def state_bytes(modules: list[nn.Module], dims: ParallelDims, parallel) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) of this rank, in bytes."""
    params = local_shard_bytes(modules)
    # Gradients and AdamW moments exist for trainable parameters only (LoRA: the adapters).
    trained = sum(4 * local_shard(p).numel() for m in modules for p in m.parameters() if p.requires_grad)
    grads = trained
    if dims.dp * dims.cp > 1 and accumulates_unsharded_grads(parallel.zero, dims.pp, parallel.pp_schedule):
        grads += sum(4 * _gathered_numel(p) for m in modules for p in m.parameters() if p.requires_grad)
    return params, grads, 2 * trained


def _stage_inputs(module: nn.Module, model_cfg, cfg, dims: ParallelDims) -> tuple[torch.Tensor, dict]:
    """Fake inputs of one micro-batch for a stage: tokens, or the hidden states it receives."""
    t = cfg.train
    local = t.seq_len // dims.cp
    kwargs = {"labels": torch.zeros(t.micro_batch, local, dtype=torch.long)}
    if dims.cp > 1:
        kwargs["positions"] = torch.zeros(t.micro_batch, local, dtype=torch.long)
    if module.first_stage:
        return torch.zeros(t.micro_batch, local, dtype=torch.long), kwargs
    sp = dims.tp if dims.tp > 1 and cfg.parallel.sequence_parallel else 1
    return torch.zeros(t.micro_batch, local // sp, model_cfg.dim, requires_grad=True), kwargs


def _gathered_ids(module: nn.Module) -> set[int]:
    """ids of the parameters FSDP holds gathered now (it registers the gathered tensors in
    place of the shards while a unit is unsharded)."""
    return {id(p) for p in module.parameters() if not _is_fsdp_sharded(p)}


def _newly_gathered(module: nn.Module, before: set[int], compute: torch.dtype, mem: LiveTensorBytes) -> int:
    """Bytes of parameters gathered now that were not when `before` was taken, in storages that
    `mem` counts (FSDP gathers DTensor parameters, the experts, into storages it kept)."""
    item = torch.empty((), dtype=compute).element_size()
    return sum(item * _gathered_numel(p) for p in module.parameters()
               if not _is_fsdp_sharded(p) and id(p) not in before and mem.counts(p))


def trace_micro_batch(module: nn.Module, model_cfg, cfg, dims: ParallelDims, compute: torch.dtype) -> tuple[int, int]:
    """(activations saved by one micro-batch's forward, extra bytes its backward needs on top),
    the second of two micro-batches (the first allocates the persistent gradients)."""
    fsdp = dims.dp * dims.cp > 1
    p = cfg.parallel
    if fsdp and keeps_units_gathered(p.zero, dims.pp):  # what zero=1 / the pipeline stage set
        module.set_requires_gradient_sync(not accumulates_unsharded_grads(p.zero, dims.pp, p.pp_schedule))
        module.set_reshard_after_backward(False)
    autocast = torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32)
    saved = 0
    for warm_up in (True, False):
        x, kwargs = _stage_inputs(module, model_cfg, cfg, dims)
        gathered = _gathered_ids(module) if fsdp else set()
        with LiveTensorBytes() as mem:
            with autocast:
                out = module(x, **kwargs)
            saved = mem.current - (_newly_gathered(module, gathered, compute, mem) if fsdp else 0)
            after_forward = mem.current
            out.backward() if out.dim() == 0 else out.backward(torch.ones_like(out))
            del out
        if not warm_up:
            return saved, mem.peak - after_forward
    raise AssertionError("unreachable")


def in_flight_per_stage(modules, stage_ids, dims: ParallelDims, cfg, pp_group) -> list[int]:
    """Micro-batches whose activations each of this rank's stages holds at the peak of the
    real schedule (read off its action list); 1 without pipelining."""
    if dims.pp == 1:
        return [1]
    from loom.parallel.pipeline import build_schedule

    t = cfg.train
    n_micro = t.global_batch // dims.dp // t.micro_batch
    n_stages = dims.pp * cfg.parallel.pp_virtual_stages
    schedule = build_schedule(modules, stage_ids, n_stages, pp_group, torch.device("cpu"),
                              cfg.parallel.pp_schedule, n_micro, lambda out, target: out)
    pp_rank = stage_ids[0]
    return peak_live_micro_batches(schedule.pipeline_order[pp_rank], stage_ids)


def peak_live_micro_batches(actions, stage_ids: list[int]) -> list[int]:
    """For each stage, the most micro-batches alive at once: a forward adds one; a full
    backward, or the weight half of a split one, frees it."""
    live = {s: 0 for s in stage_ids}
    peak = dict(live)
    split = {(a.stage_index, a.microbatch_index) for a in _flatten(actions) if a.computation_type.value == "W"}
    for a in _flatten(actions):
        kind, key = a.computation_type.value, (a.stage_index, a.microbatch_index)
        if kind == "F":
            live[a.stage_index] += 1
            peak[a.stage_index] = max(peak[a.stage_index], live[a.stage_index])
        elif kind == "W" or (kind in ("B", "I") and key not in split):
            live[a.stage_index] -= 1
    return [peak[s] for s in stage_ids]


def _flatten(actions):
    for a in actions:
        if a is None:
            continue
        if a.sub_actions:
            yield from _flatten(a.sub_actions)
        else:
            yield a


def measure_rank(cfg, model_cfg, dims: ParallelDims, kind: str, rank: int, trace: bool = True) -> RankMemory:
    """The memory of global rank `rank`, built for real on the fake process group (trace=False:
    without the activations, which take most of the time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    compute = DTYPES[cfg.train.dtype]
    with Layout.fake(dims, rank) as layout:
        # The same builder as a run (converters included), stopped before it allocates.
        built = build_parallel_model(cfg, layout, torch.device("cpu"), materialize=False)
        modules, stage_ids = built.parts, built.stage_ids
        with FakeTensorMode(allow_non_fake_inputs=True):
            for module in modules:
                module.to_empty(device="cpu")
            params, grads, optim = state_bytes(modules, dims, cfg.parallel)
            row = RankMemory(kind, rank, stage_ids, params, grads, optim,
                             gathered_bytes(modules, dims, cfg.parallel.zero, compute))
            row.in_flight = in_flight_per_stage(modules, stage_ids, dims, cfg, layout.group("pp"))
            if not trace:
                return row
            try:
                with warnings.catch_warnings():  # FSDP2 warns of the embedding's view output under fake tensors only
                    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
                    traced = [trace_micro_batch(m, model_cfg, cfg, dims, compute) for m in modules]
            except Exception as e:  # noqa: BLE001 - reported, not raised: the rest stands
                row.note = f"activations not traced under fake tensors: {type(e).__name__}: {str(e).splitlines()[0]}"
                return row
    row.activations_per_micro_batch = [a for a, _ in traced]
    row.activations = sum(a * k for (a, _), k in zip(traced, row.in_flight))
    row.backward_working = max(b for _, b in traced)
    return row


def _child(queue, fn, args) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - handed to the parent as one line
        queue.put(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def in_child_process(fn, *args):
    """fn(*args) in a forked child (each rank needs a process group of its own, and torch keeps
    meshes and group names of a destroyed one in process-wide caches); returns its result."""
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, fn, args))
    child.start()
    try:
        status, value = queue.get()
    finally:
        child.join()
    if status == "error":
        raise RuntimeError(value)
    return value


@dataclass
class DryRun:
    dims: ParallelDims
    rows: list[RankMemory]
    notes: list[str]


def dry_run(cfg, model_cfg, world: int | None, trace: bool = True) -> DryRun:
    """Measure the representative ranks of the config's layout at `world` ranks (None: the
    layout's own size, dp_shard=-1 counting as 1)."""
    dims = ParallelDims.from_section(cfg.parallel, world)
    rows = [in_child_process(measure_rank, cfg, model_cfg, dims, kind, rank, trace)
            for kind, rank in representative_ranks(dims)]
    notes = ["activations: one micro-batch traced on fake tensors through PyTorch's ops, as on GPUs (loom's "
             "CPU kernels need real memory), with this machine's loss chunk (GPUs take larger chunks of logits)"]
    if cfg.data.pack_documents:
        notes.append("data.pack_documents: traced as one document per sequence (no data is read)")
    return DryRun(dims, rows, notes)


def format_dry_run(report: DryRun, cfg, model_cfg) -> str:
    """The per-rank table `loom train --dry-run` prints."""
    from loom.metrics.flops import param_counts
    from loom.train.report import format_bytes, format_count

    d, t, p = report.dims, cfg.train, cfg.parallel
    layout = " x ".join(f"{k}={v}" for k, v in d.degrees().items() if v > 1) or "one rank"
    n_micro = t.global_batch // d.dp // t.micro_batch
    schedule = f", schedule {p.pp_schedule}" + (f" ({p.pp_virtual_stages} virtual stages)"
                                                 if p.pp_virtual_stages > 1 else "") if d.pp > 1 else ""
    head = [f"loom train --dry-run: {cfg.model.name} ({format_count(param_counts(model_cfg).total)} parameters) "
            f"on {d.world_size} ranks: {layout}",
            f"{t.dtype}, recompute {t.recompute}, parallel.zero={p.zero}, seq {t.seq_len:,}, micro-batch "
            f"{t.micro_batch}, {n_micro} micro-batches per step{schedule}", ""]
    columns = [f"{r.kind} (rank {r.rank})" for r in report.rows]
    table = [("pipeline stages held", [",".join(map(str, r.stages)) for r in report.rows])]
    for i, (label, _) in enumerate(report.rows[0].rows()):
        table.append((label, [format_bytes(v) if (v := r.rows()[i][1]) is not None else "not traced"
                              for r in report.rows]))
    table.append(("activations of one micro-batch, per stage",
                  ["/".join(f"{a / 2**20:.0f}" for a in r.activations_per_micro_batch) + " MiB"
                   if r.activations_per_micro_batch else "-" for r in report.rows]))
    table.append(("micro-batches in flight, per stage", ["/".join(map(str, r.in_flight)) for r in report.rows]))
    width = [max(len(x) for x in [c] + [cells[j] for _, cells in table]) for j, c in enumerate(columns)]
    label_w = max(len(label) for label, _ in table)
    lines = ["| " + "per rank".ljust(label_w) + " | " + " | ".join(c.ljust(w) for c, w in zip(columns, width)) + " |",
             "|" + "-" * (label_w + 2) + "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    for label, cells in table:
        lines.append("| " + label.ljust(label_w) + " | " + " | ".join(c.rjust(w) for c, w in zip(cells, width)) + " |")
    notes = report.notes + [r.note for r in report.rows if r.note]
    return "\n".join(head + lines + [""] + [f"note: {n}" for n in notes])
