"""AdamW over a laid-out model, and gradient clipping by the global norm over every layout."""
from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, train) -> torch.optim.AdamW:
    """AdamW (train: the config's [train] section); weight decay on matrices only (norm gains and
    biases are vectors and are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW takes a group's tensors in one call, which cannot mix DTensors with plain
    # tensors (tensor parallelism without sequence parallelism leaves norms plain beside sharded
    # biases): one group per (decay, kind).
    groups = []
    for decay, matrices in ((train.weight_decay, True), (0.0, False)):
        for distributed in (True, False):
            members = [p for p in params if (p.ndim >= 2) == matrices and hasattr(p, "device_mesh") == distributed]
            if members:
                groups.append({"params": members, "weight_decay": decay})
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8, fused=True)


def clip_grad_norm(params, max_norm: float, sum_over_stages=None, also_scale=()) -> float:
    """Scale gradients so that their global 2-norm is at most max_norm; returns the norm before.

    Gradients may be plain tensors and DTensors on different meshes at once (norm gains left
    unsharded beside tensor-parallel matrices, FSDP's 1-D and 2-D shards): torch's clip_grad_norm_
    refuses such a mix, so the norm is taken per mesh, gathered, and combined here.
    sum_over_stages(tensor): an in-place sum over the pipeline ranks, which hold different
    parameters (None without pipelining). also_scale: parameters left out of the norm (copies of
    one counted elsewhere) but clipped with the rest.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(id(getattr(p.grad, "device_mesh", None)), []).append(p.grad)
    squares = torch.zeros((), dtype=torch.float64)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares = squares + norm.double().cpu() ** 2
    if sum_over_stages is not None:
        device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
        squares = sum_over_stages(squares.to(device))
    total = squares.sqrt().item()
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
        for p in also_scale:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
