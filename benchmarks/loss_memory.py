"""Peak memory of the output layer + loss per rank, before and after the fused loss reached every
layout: tensor parallelism (tp=2, vocabulary-parallel) and the last pipeline stage (pp=2).

    python benchmarks/loss_memory.py [--seq 32768] [--vocab 128256] [--dim 4096]

before: what loom ran until this change. Under tp, the output layer was column-parallel over the
    vocabulary (torch's ColwiseParallel) and the loss torch's `loss_parallel` cross-entropy over
    the [N, V/tp] logits; on the last pipeline stage the stage returned [N, V] logits and the
    schedule's loss function took their cross-entropy.
after: loom's fused, chunked loss (vocabulary-parallel under tp: loom.parallel.vocab_parallel).
Measured as the most bytes of tensors alive at once during the loss's forward and backward
(LiveTensorBytes: the logits, their softmax, the gradients of h and of the weight), with the
hidden states and the weight already in memory. At 32K tokens x 128K vocabulary the fp32 logits
alone are 16 GiB, beyond this machine for two ranks, so the rank is simulated: rank 0 of a fake
process group, on fake tensors (nothing allocated). The last lines check the method: the same
measurement on real and on fake tensors at a size that fits (torch's loss_parallel allocates one
more [N, V/tp] buffer on real tensors than its fake-tensor kernels account for).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loom.metrics.memory import LiveTensorBytes  # noqa: E402
from loom.train.dry_run import in_child_process  # noqa: E402


def _loss_peak(run, grad=None) -> int:
    with LiveTensorBytes() as mem:
        loss = run()
        loss.backward(grad)
        del loss
    return mem.peak


def single_device(seq: int, vocab: int, dim: int, fused: bool, fake: bool) -> int:
    """The last pipeline stage's output layer + loss (no tensor parallelism)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from loom.models.loss import linear_cross_entropy

    with FakeTensorMode() if fake else contextlib.nullcontext():
        h = torch.randn(1, seq, dim, requires_grad=True)
        w = torch.randn(vocab, dim, requires_grad=True)
        labels = torch.randint(0, vocab, (1, seq))
        if fused:
            return _loss_peak(lambda: linear_cross_entropy(h, w, labels))
        return _loss_peak(lambda: torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(h, w).flatten(0, 1).float(), labels.flatten()))


def tensor_parallel(seq: int, vocab: int, dim: int, fused: bool, fake: bool = True) -> int:
    """Rank 0 of tp=2 with sequence parallelism: h arrives sequence-sharded [1, seq/2, dim]."""
    import contextlib

    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from loom.models.transformer import OutputLayer
    from loom.parallel.vocab_parallel import apply_vocab_parallel_output

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    holder = torch.nn.Module()
    with torch.device("meta"):
        holder.output = OutputLayer(dim, vocab)
    if fused:
        apply_vocab_parallel_output(holder, mesh)
    else:
        parallelize_module(holder.output, mesh, ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                                                use_local_output=False))
    labels = torch.zeros(1, seq, dtype=torch.long)  # real: loss_parallel's backward refuses fake targets
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        holder.to_empty(device="cpu")
        local = torch.randn(1, seq // 2, dim, requires_grad=True)
        h = DTensor.from_local(local, mesh, [Shard(1)], run_check=False)
        if fused:
            return _loss_peak(lambda: holder.output(h, labels))

        def before():
            logits = holder.output(h)  # [1, seq, V/tp], sharded over the vocabulary
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

        with loss_parallel():  # forward and backward inside it (it must not be nested); the
            # upstream gradient as a DTensor (on fake tensors autograd's implicit one is plain)
            return _loss_peak(before, DTensor.from_local(torch.ones(()), mesh, [Replicate()], run_check=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dim", type=int, default=4096)
    args = ap.parse_args()
    gib = 2**30
    n, v, d = args.seq, args.vocab, args.dim
    print(f"seq {n:,} tokens x vocabulary {v:,}, hidden {d}, fp32; peak bytes of the output layer + loss "
          f"per rank (forward and backward), counted on fake tensors\n")
    print("| layout | before | after | after / before |")
    print("|---|---:|---:|---:|")
    runs = {"pp=2 (last stage)": lambda fused, fake, *size: single_device(*size, fused, fake),
            "tp=2 (rank 0, vocabulary-parallel)": lambda fused, fake, *size: tensor_parallel(*size, fused, fake)}
    for name, run in runs.items():
        before, after = (in_child_process(run, fused, True, n, v, d) for fused in (False, True))
        print(f"| {name} | {before / gib:.2f} GiB | {after / gib:.3f} GiB | {after / before:.3f} |")
    small = (8192, 32768, 1024)
    print(f"\nmethod check, real against fake tensors at seq {small[0]:,}, vocabulary {small[1]:,}, hidden "
          f"{small[2]} (bytes):")
    for name, run in runs.items():
        for fused in (False, True):
            real, fake = (in_child_process(run, fused, f, *small) for f in (False, True))
            print(f"- {name}, {'after' if fused else 'before'}: real {real:,}, fake {fake:,} ({real / fake:.2f}x)")


if __name__ == "__main__":
    main()
