"""Collectives with their gradients, for the parallel modules that call them from inside a
model's forward (torch's functional collectives have no variable-split all-to-all with autograd
that runs on gloo); and the measurement of a gloo link, for the planner's CPU calibration."""
from __future__ import annotations

import json
import time
from pathlib import Path

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


def gloo_link_worker(rank: int, port: int, out: str) -> None:
    """One of two local processes measuring a gloo link (the planner's CPU calibration): writes
    {"gbps", "latency_s"} of send/recv between them to `out`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    big, small = torch.zeros(4 * 1024 * 1024), torch.zeros(1)  # 16 MB, 4 B

    def exchange(t: torch.Tensor) -> None:
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        else:
            dist.recv(t, 0)
            dist.send(t, 0)

    for _ in range(3):
        exchange(big)
        exchange(small)
    t0 = time.perf_counter()
    for _ in range(200):
        exchange(small)
    latency = (time.perf_counter() - t0) / 400
    t0 = time.perf_counter()
    for _ in range(8):
        exchange(big)
    per_transfer = (time.perf_counter() - t0) / 16
    if rank == 0:
        Path(out).write_text(json.dumps({"gbps": big.numel() * 4 / max(per_transfer - latency, 1e-9) / 1e9,
                                         "latency_s": latency}))
    dist.destroy_process_group()
