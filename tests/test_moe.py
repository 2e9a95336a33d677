"""The mixture-of-experts layer (loom/models/moe.py) against a reference written token by token,
its capacity, auxiliary losses and their gradients, and tiny-moe in the trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close
from loom.models.moe import MoE
from loom.models.registry import MODELS, PUBLISHED_PARAMS


def _moe(capacity=None, aux=0.0, z=0.0, n_experts=4, top_k=2, dim=16, hidden=24, seed=0):
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, n_experts, top_k, capacity, aux, z)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def reference(moe: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """Token by token: softmax over the chosen k router logits, each chosen expert's SwiGLU."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ moe.router.gate.weight.t()
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        top, experts = logits[n].topk(moe.top_k)
        weights = top.softmax(-1)
        for slot, (e, w) in enumerate(zip(experts.tolist(), weights)):
            if keep is not None and not keep[n * moe.top_k + slot]:
                continue
            w1, w3, w2 = moe.experts.w1[e], moe.experts.w3[e], moe.experts.w2[e]
            out[n] += w * (w2 @ (F.silu(w1 @ flat[n]) * (w3 @ flat[n])))
    return out.view_as(x)


@pytest.mark.parametrize("grouped", [True, False])
def test_dropless_moe_matches_the_token_by_token_reference(grouped):
    moe = _moe()
    moe.experts.grouped = grouped
    x = torch.randn(2, 13, 16, requires_grad=True)
    g = torch.randn(2, 13, 16)
    y = moe(x)
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    xg = x.grad.clone()
    for p in moe.parameters():
        p.grad = None
    x.grad = None
    want = reference(moe, x)
    want.backward(g)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert_rel_close(xg, x.grad, 1e-5)
    for n, p in moe.named_parameters():
        assert_rel_close(grads[n], p.grad, 1e-5)


def test_capacity_keeps_each_experts_most_probable_assignments():
    """capacity_factor 0.5 of 4 experts, top-2, 20 tokens: each expert keeps at most 5 of its
    assignments, those with the highest router probability; the rest add nothing."""
    moe = _moe(capacity=0.5)
    x = torch.randn(1, 20, 16)
    flat = x.reshape(-1, 16)
    logits = flat @ moe.router.gate.weight.t()
    probs = logits.softmax(-1)
    experts = logits.topk(2, dim=-1).indices.reshape(-1)
    prob = probs[torch.arange(20).repeat_interleave(2), experts]
    capacity = math.ceil(0.5 * 20 * 2 / 4)
    keep = torch.zeros(40, dtype=torch.bool)
    for e in range(4):
        mine = (experts == e).nonzero().flatten()
        best = mine[prob[mine].argsort(descending=True, stable=True)[:capacity]]
        keep[best] = True
    assert (~keep).any()  # something is dropped
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(moe, x, keep), rtol=1e-5, atol=1e-6)
    assert int(moe.last_counts.max()) <= capacity


def test_aux_losses_and_their_gradients():
    """The load-balancing loss (Megatron's normalization: 1 for uniform routing) and the z-loss
    reach the router's gradient exactly as if added to the loss, scaled by aux_grad_scale."""
    moe = _moe(aux=0.01, z=0.001)
    moe.aux_grad_scale = 0.25
    x = torch.randn(2, 9, 16)
    y = moe(x)
    (y * 0.5).sum().backward()
    got = moe.router.gate.weight.grad.clone()
    balance, z = moe.last_aux
    flat = x.reshape(-1, 16)
    logits = flat @ moe.router.gate.weight.t()
    probs = logits.softmax(-1)
    counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=4).float()
    n = flat.shape[0]
    want_balance = (counts * probs.sum(0)).sum() * 4 / (2 * n * n)
    want_z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(balance, want_balance.detach())
    torch.testing.assert_close(z, want_z.detach())
    moe.router.gate.weight.grad = None
    moe.aux_loss_coeff = moe.z_loss_coeff = 0.0  # the reference adds them by hand
    main = (moe(x) * 0.5).sum()
    ((main + 0.25 * (0.01 * want_balance + 0.001 * want_z))).backward()
    assert_rel_close(got, moe.router.gate.weight.grad, 1e-5)


def test_grouped_experts_equal_the_loop_and_counts_allow_empty_experts():
    moe = _moe(n_experts=8, top_k=1)
    x = torch.randn(300, 16)
    counts = torch.tensor([0, 100, 0, 50, 50, 0, 100, 0])
    outs = []
    for grouped in (True, False):
        moe.experts.grouped = grouped
        outs.append(moe.experts(x, counts))
    assert torch.equal(outs[0], outs[1])


def test_mixtral_counts_and_flops_count_active_experts():
    from loom.metrics.flops import flops_per_token, param_counts

    cfg = MODELS["mixtral-8x7b"]
    counts = param_counts(cfg)
    assert counts.total == PUBLISHED_PARAMS["mixtral-8x7b"][0]
    assert counts.active == 12_879_925_248  # 2 of 8 experts
    # NeMo's mixtral formula per token: L h^2 (12 + 12 g/a + 18 k f/h + 12 s/h + 6 V/(L h)).
    L, h, f, s, V = 32, 4096, 14336, 4096, 32000
    want = L * h * h * (12 + 12 * 8 / 32 + 18 * 2 * f / h + 12 * s / h + 6 * V / (L * h))
    assert flops_per_token(cfg, s) == pytest.approx(want, rel=1e-12)


def test_moe_bad_settings_are_one_line():
    from loom.config import ConfigError, load_config, validate

    for args, message in (
        (["--moe.top_k=9"], "moe.top_k=9 must be between 1 and moe.n_experts=8"),
        (["--moe.capacity_factor=0"], "moe.capacity_factor=0.0 must be positive"),
        (["--moe.capacity_factor=-1"], "moe.capacity_factor=-1.0 must be positive"),
        (["--parallel.dp_shard=2", "--parallel.ep=4"],
         "parallel.ep=4 does not divide parallel.dp_shard x cp = 2 x 1 = 2"),
        (["--parallel.dp_shard=3", "--parallel.ep=3"], "parallel.ep=3 does not divide moe.n_experts=8"),
        (["--parallel.dp_shard=2", "--parallel.ep=0"], "parallel.ep=0 must be a positive integer"),
        (["--model.name=tiny", "--parallel.dp_shard=2", "--parallel.ep=2"],
         "parallel.ep=2 needs a mixture-of-experts model"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate(load_config(None, ["--model.name=tiny-moe", "--parallel.dp_shard=1", "--parallel.pp=1", *args]),
                     check_files=False)


def test_bad_expert_layout_is_refused_before_any_worker_starts(tmp_path):
    """`loom train --nproc 4` with ep=3: one line, exit status 2, and no torchrun started."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "loom", "train", "--nproc", "4", "--model.name=tiny-moe",
                        "--parallel.pp=1", "--parallel.dp_shard=2", "--parallel.cp=2", "--parallel.ep=8"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.ep=8 does not divide parallel.dp_shard x cp = 2 x 2 = 4" in lines[0], r.stderr
    assert "torch.distributed" not in r.stderr and r.stdout == ""


def test_tiny_moe_trains_and_logs_routing(dataset, tmp_path):
    import json

    from loom.config import load_config, validate
    from loom.train.trainer import Trainer

    cfg = load_config(None, ["--model.name=tiny-moe", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
                             "--model.n_kv_heads=2", "--model.ffn_dim=96", "--model.vocab_size=300",
                             "--parallel.dp_shard=1", "--parallel.pp=1", f"--data.path={dataset}",
                             "--train.seq_len=32", "--train.steps=20", "--train.eval_every=0", "--metrics.log_every=5",
                             f"--metrics.jsonl={tmp_path}/m.jsonl", "--metrics.plot=", "--train.lr=3e-3"])
    trainer = Trainer(cfg, validate(cfg), progress=False)
    summary = trainer.train()
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    share = rows[-1]["moe_expert_share"]
    assert share["mean"] == pytest.approx(1 / 8) and share["min"] <= share["mean"] <= share["max"]
    assert rows[-1]["moe_aux_loss"] > 0.9  # ~1 when balanced, more when not
