"""torchrun worker: context-parallel attention (every variant) against single-device attention on
the same random inputs, forward and backward, causal, grouped-query, with and without packed
documents. Rank 0 writes {case: max relative error of out, dq, dk, dv}."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from loom.models.attention import CoreAttention
from loom.parallel.context import ContextParallelAttention
from loom.parallel.context.group import CPGroup
from loom.parallel.context.sharding import shard_sequence


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def random_documents(batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """[B, S] document ids: sample 0 with many short documents, the others with a few long ones."""
    docs = torch.zeros(batch, seq_len, dtype=torch.int64)
    for b in range(batch):
        n_cuts = 9 if b == 0 else 2
        cuts = torch.randperm(seq_len - 1, generator=gen)[:n_cuts] + 1
        docs[b, cuts] = 1
    return docs.cumsum(1)


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    out_path = sys.argv[1]
    results = {}
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, seq_len, d = 2, 8, 4, 64, 16
    for cp_size in (2, 4):
        if world % cp_size:
            continue
        mesh = init_device_mesh("cpu", (world // cp_size, cp_size), mesh_dim_names=("rest", "cp"))
        cp = CPGroup.from_mesh(mesh["cp"])
        for packed in (False, True):
            q = torch.randn(b, hq, seq_len, d, generator=gen)
            k = torch.randn(b, hkv, seq_len, d, generator=gen)
            v = torch.randn(b, hkv, seq_len, d, generator=gen)
            dout = torch.randn(b, hq, seq_len, d, generator=gen)
            docs = random_documents(b, seq_len, gen) if packed else None
            ref = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out = CoreAttention()(*ref, docs)
            ref_out.backward(dout)
            for comm in ("p2p", "allgather", "a2a"):
                for lb in (True, False):
                    # Sequence dim is 2 here: move it to 1 for sharding and back.
                    def shard(t):
                        return shard_sequence(t.transpose(1, 2), cp.rank, cp_size, lb).transpose(1, 2)

                    mine = [shard(t).contiguous().requires_grad_() for t in (q, k, v)]
                    out = ContextParallelAttention(cp, comm, lb)(*mine, docs)
                    out.backward(shard(dout))
                    errs = [rel_err(out, shard(ref_out.detach()))]
                    errs += [rel_err(m.grad, shard(r.grad)) for m, r in zip(mine, ref)]
                    worst = torch.tensor(errs, dtype=torch.float64)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    results[f"cp{cp_size}_{comm}_{'lb' if lb else 'contiguous'}_{'packed' if packed else 'causal'}"] = worst.tolist()
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
