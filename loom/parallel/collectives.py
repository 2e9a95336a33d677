"""Collectives with their gradients, for the parallel modules that call them from inside a
model's forward (torch's functional collectives have no variable-split all-to-all with autograd
that runs on gloo)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over a process group (each rank's gradient
    covers only its own tokens)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class AllToAll(torch.autograd.Function):
    """x [sum(send), ...] -> [sum(recv), ...]: rows send[0] go to rank 0 of the group, the next
    send[1] to rank 1, ...; rows from rank r arrive in the same order as block r. Backward sends
    the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out
