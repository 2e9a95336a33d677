"""parallel.zero, the two sharding modes of FSDP (loom.parallel.fsdp), as the facts the config
checks, the planner, the dry run and the step engine read: what stays gathered and what stays
unsharded through a step's micro-batches. (No torch.distributed here: the config and the planner
read it without loading FSDP.)"""
from __future__ import annotations

ZERO_MODES = (3, 1)


def keeps_units_gathered(zero: int, pp: int) -> bool:
    """Whether every FSDP unit stays gathered through a step's micro-batches."""
    return zero == 1 or pp > 1


def accumulates_unsharded_grads(zero: int, pp: int, pp_schedule: str) -> bool:
    """Whether gradients accumulate unsharded (fp32) over a step's micro-batches, reduced once."""
    return zero == 1 or (pp > 1 and pp_schedule == "zero-bubble")
