"""torchrun worker, two checks. Rank 0 writes {case: [errors]}.

1. Context-parallel attention (every variant) against single-device attention on the same random
   inputs, forward and backward, causal, grouped-query, with and without packed documents:
   max relative error of out, dq, dk, dv.
3. Activation memory: bytes a whole model saves for backward per rank, single process vs each
   cp variant at cp=2 and 4, for the same global sequences (key "saved_bytes", not an error).
2. Packed documents in a whole model: the logits of one document's tokens when the other
   documents of the pack change (content and lengths), under each cp variant and cp degree:
   relative change, and relative difference from the single-process logits.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from loom.models.attention import CoreAttention, document_positions, document_starts
from loom.models.transformer import ModelConfig, build_model
from loom.parallel.context import ContextParallelAttention, apply_context_parallel
from loom.parallel.context.group import CPGroup
from loom.parallel.context.sharding import shard_index, shard_sequence


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


def packs(seq_len: int, target: torch.Tensor, gen: torch.Generator, vocab: int):
    """Two packs [1, S] holding the same target document among different other documents:
    (tokens, documents, target's slice) for each."""
    out = []
    for before in (9, 23):
        after = seq_len - before - len(target)
        tokens = torch.cat([torch.randint(vocab, (before,), generator=gen), target,
                            torch.randint(vocab, (after,), generator=gen)])[None]
        docs = torch.tensor([0] * before + [1] * len(target) + [2] * after)[None]
        out.append((tokens, docs, slice(before, before + len(target))))
    return out


def packed_document_invariance(world: int) -> dict:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128, vocab_size=97)
    gen = torch.Generator().manual_seed(1)
    seq_len = 64
    target = torch.randint(cfg.vocab_size, (21,), generator=gen)
    (tok_a, doc_a, sl_a), (tok_b, doc_b, sl_b) = packs(seq_len, target, gen, cfg.vocab_size)

    def model():
        m = build_model(cfg, "cpu")
        m.init_weights(seed=0)
        return m

    single = model()
    with torch.no_grad():
        ref = single(tok_a, document_positions(doc_a), documents=doc_a)[0, sl_a]
        ref_b = single(tok_b, document_positions(doc_b), documents=doc_b)[0, sl_b]
        unpacked_b = single(tok_b)[0, sl_b]
    results = {"single_packed": [rel_err(ref_b, ref)],
               "single_unpacked_changes": [rel_err(unpacked_b, ref)]}  # must be large
    for cp_size in (2, 4):
        if world % cp_size:
            continue
        mesh = init_device_mesh("cpu", (world // cp_size, cp_size), mesh_dim_names=("rest", "cp"))
        r = mesh["cp"].get_local_rank()
        for comm in ("p2p", "allgather", "a2a"):
            m = model()
            apply_context_parallel(m, mesh["cp"], comm, load_balance=True)
            logits = []
            with torch.no_grad():
                for tokens, docs in ((tok_a, doc_a), (tok_b, doc_b)):
                    idx = shard_index(r, cp_size, seq_len, True)
                    local = m(tokens[:, idx], document_positions(docs)[:, idx], documents=docs)
                    parts = [torch.empty_like(local) for _ in range(cp_size)]
                    dist.all_gather(parts, local, group=mesh["cp"].get_group())
                    full = torch.empty(1, seq_len, cfg.vocab_size)
                    full[:, torch.cat([shard_index(j, cp_size, seq_len, True) for j in range(cp_size)])] = torch.cat(parts, 1)
                    logits.append(full[0])
            results[f"cp{cp_size}_{comm}_packed_model"] = [rel_err(logits[1][sl_b], logits[0][sl_a]),
                                                           rel_err(logits[0][sl_a], ref)]
    return results


def saved_activation_bytes(model, tokens, positions, labels) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward with loss,
    parameters excluded (they are memory of the model, not of the sequence)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, labels=labels)
    return sum(saved.values())


def saved_bytes_per_rank(world: int) -> dict:
    """{"single": bytes, "cp2_p2p": largest bytes on any rank, ...} for batch 2 x 512 tokens."""
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=192, vocab_size=97)
    gen = torch.Generator().manual_seed(2)
    seq_len = 512
    tokens = torch.randint(cfg.vocab_size, (2, seq_len + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(seq_len).expand(2, seq_len)

    def model():
        m = build_model(cfg, "cpu")
        m.init_weights(seed=0)
        return m

    out = {"single": saved_activation_bytes(model(), inputs, positions, labels)}
    for cp_size in (2, 4):
        if world % cp_size:
            continue
        mesh = init_device_mesh("cpu", (world // cp_size, cp_size), mesh_dim_names=("rest", "cp"))
        idx = shard_index(mesh["cp"].get_local_rank(), cp_size, seq_len, True)
        for comm in ("p2p", "allgather", "a2a"):
            m = model()
            apply_context_parallel(m, mesh["cp"], comm, load_balance=True)
            mine = torch.tensor([saved_activation_bytes(m, inputs[:, idx], positions[:, idx], labels[:, idx])])
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            out[f"cp{cp_size}_{comm}"] = int(mine.item())
    return out


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
            starts = document_starts(docs) if packed else None
            ref = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out = CoreAttention()(*ref, starts)
            ref_out.backward(dout)
            for comm in ("p2p", "allgather", "a2a"):
                for lb in (True, False):
                    # Sequence dim is 2 here: move it to 1 for sharding and back.
                    def shard(t):
                        return shard_sequence(t.transpose(1, 2), cp.rank, cp_size, lb).transpose(1, 2)

                    mine = [shard(t).contiguous().requires_grad_() for t in (q, k, v)]
                    out = ContextParallelAttention(cp, comm, lb)(*mine, starts)
                    out.backward(shard(dout))
                    errs = [rel_err(out, shard(ref_out.detach()))]
                    errs += [rel_err(m.grad, shard(r.grad)) for m, r in zip(mine, ref)]
                    worst = torch.tensor(errs, dtype=torch.float64)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    results[f"cp{cp_size}_{comm}_{'lb' if lb else 'contiguous'}_{'packed' if packed else 'causal'}"] = worst.tolist()
    results.update(packed_document_invariance(world))
    saved = saved_bytes_per_rank(world)
    if rank == 0:
        torch.save({"errors": results, "saved_bytes": saved}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from loom.train.worker_exit import leave

    leave(0)  # as loom's workers end: no interpreter teardown (see loom.train.worker_exit)
