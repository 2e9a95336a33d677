import dataclasses
import os
import math

import pytest
import torch

from conftest import assert_rel_close
from loom.metrics.flops import param_counts
from loom.kernels.attention import attention_backward, attention_forward
from loom.models.attention import CoreAttention
from loom.models.kernel_parts import LoomRotary
from loom.models.converters import convert_model, install_cpu_kernels
from loom.models.transformer import ModelConfig, RopeScaling, Rotary, build_model, rope_cos_sin, rope_inv_freq

apply_rope = Rotary().rotate  # PyTorch's rotation of all of x [B, L, H, R] by (cos, sin [(B,) L, R/2])
from loom.models.hf import hf_param_name
from loom.models.registry import MODELS, PUBLISHED_PARAMS
from loom.parallel.recompute import apply_recompute
from loom.models.loss import IGNORE_INDEX, linear_cross_entropy
from loom.models.transformer import init_model

@pytest.mark.parametrize("name", ["tiny", "small"])
def test_cpu_models_counted_from_modules(name):
    cfg = MODELS[name]
    model = build_model(cfg, "meta")
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total
    assert 1e6 < param_counts(cfg).total < 1e8


def test_rope_matches_reference_formula():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_size=10, rope_theta=500.0)
    e = cfg.head_dim
    x = torch.randn(1, 8, 2, e, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 5, 11, 100, 4097, 1_048_575])
    cos, sin = rope_cos_sin(cfg, positions)
    got = apply_rope(x.float(), cos, sin).double()
    want = torch.empty_like(x)
    for j, m in enumerate(positions.tolist()):
        for i in range(e // 2):
            theta = m * 500.0 ** (-2 * i / e)
            a, b = x[0, j, :, i], x[0, j, :, i + e // 2]
            want[0, j, :, i] = a * math.cos(theta) - b * math.sin(theta)
            want[0, j, :, i + e // 2] = b * math.cos(theta) + a * math.sin(theta)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # A rotation keeps each pair's length and makes q.k depend only on the offset.
    q, k = torch.randn(1, 1, 1, e), torch.randn(1, 1, 1, e)
    def dot(mq, mk):
        cq, sq = rope_cos_sin(cfg, torch.tensor([mq]))
        ck, sk = rope_cos_sin(cfg, torch.tensor([mk]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(dot(10, 3), dot(107, 100), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("e, batched", [(16, False), (64, True)])
def test_rope_fp32_kernel_matches_formula_and_gradient(e, batched):
    """RoPE through loom's CPU kernel (where available) equals the torch formula, forward and
    backward (the rotation by minus the angle), with per-sample angles (packed documents)."""
    cfg = ModelConfig(dim=4 * e, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64, vocab_size=10)
    positions = torch.randint(0, 5000, (2, 24) if batched else (24,))
    cos, sin = rope_cos_sin(cfg, positions)
    x = torch.randn(2, 24, 3, e, requires_grad=True)
    g = torch.randn(2, 24, 3, e)
    rotary = LoomRotary()
    rotary(x, cos, sin).backward(g)
    xd = x.detach().double().requires_grad_()
    c, s_ = cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
    x1, x2 = xd[..., : e // 2], xd[..., e // 2:]
    want = torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1)
    want.backward(g.double())
    torch.testing.assert_close(rotary(x.detach(), cos, sin).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-6, atol=1e-6)


def test_llama31_rope_scaling_matches_published_rule():
    cfg = MODELS["llama3.1-8b"]
    s: RopeScaling = cfg.rope_scaling
    got = rope_inv_freq(cfg).double()
    e = cfg.head_dim
    for i in range(e // 2):
        f = 1.0 / cfg.rope_theta ** (2 * i / e)
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_seq_len / s.high_freq_factor:
            want = f
        elif wavelen > s.original_max_seq_len / s.low_freq_factor:
            want = f / s.factor
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            want = (1 - smooth) * f / s.factor + smooth * f
        assert got[i].item() == pytest.approx(want, rel=1e-6)
    assert got[0] == pytest.approx(1.0) and got[-1] < 1.0 / cfg.rope_theta ** ((e - 2) / e)


def _reference_attention(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


def test_attention_kernel_forward_backward_with_gqa():
    q = torch.randn(2, 8, 96, 16, requires_grad=True)
    k = torch.randn(2, 2, 96, 16, requires_grad=True)
    v = torch.randn(2, 2, 96, 16, requires_grad=True)
    out = CoreAttention()(q, k, v)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference_attention(*ref_inputs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for got, want in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
    # The log-sum-exp the interface exposes is that of the masked scores.
    _, lse = attention_forward(q.detach(), k.detach(), v.detach(), True, 16**-0.5)
    s = (q.detach() @ k.detach().repeat_interleave(4, 1).transpose(-1, -2)) * 16**-0.5
    s = s.masked_fill(~torch.ones(96, 96, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    dq, dk, dv = attention_backward(g, q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 16**-0.5)
    assert dk.shape == k.shape and dv.shape == v.shape


def test_init_is_deterministic_and_device_rng_untouched(micro_cfg):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = init_model(micro_cfg, torch.device("cpu"), seed=5)
    after = torch.rand(1)
    b = init_model(micro_cfg, torch.device("cpu"), seed=5)
    assert torch.equal(before, after)  # init does not consume the caller's random stream
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert all(torch.isfinite(p).all() for p in a.parameters())


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_identical_gradients(micro_cfg, mode):
    tokens = torch.randint(0, micro_cfg.vocab_size, (2, 33))
    grads = {}
    for m in ("none", mode):
        model = init_model(micro_cfg, torch.device("cpu"), seed=1)
        apply_recompute(list(model.layers.values()), m)
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        grads[m] = {n: p.grad.clone() for n, p in model.named_parameters()}
        names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in init_model(micro_cfg, torch.device("cpu"), 1).named_parameters()]
    for n in grads["none"]:
        torch.testing.assert_close(grads[mode][n], grads["none"][n], rtol=1e-6, atol=1e-7)


def test_matches_transformers_llama(micro_cfg):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97,
                      rope_theta=500000.0, rope_scaling=MODELS["llama3.1-8b"].rope_scaling, norm_eps=1e-5)
    ours = init_model(cfg, torch.device("cpu"), seed=3)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            hf_params[hf_param_name(n, cfg)].copy_(p)
    assert len(hf_params) == len(list(ours.parameters()))
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loom_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_equals_cross_entropy_of_logits(dtype, loom_kernel, monkeypatch):
    """Both softmax paths (loom's CPU kernel where available, PyTorch ops) give the loss and
    gradients of cross-entropy over materialized logits, also for an upstream gradient != 1."""
    from loom.models.kernel_parts import loom_softmax_cross_entropy_

    kernel = loom_softmax_cross_entropy_ if loom_kernel else None
    upstream = 1.0 if loom_kernel else 0.5
    # vocabulary 40000 makes the CPU chunk 64 tokens, so 300 tokens take 5 chunks.
    h = torch.randn(3, 100, 32, requires_grad=True)
    w = (0.1 * torch.randn(40000, 32)).requires_grad_()
    labels = torch.randint(0, 40000, (3, 100))
    labels[0, :9] = IGNORE_INDEX
    grads = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if fused:
                loss = linear_cross_entropy(h, w, labels, softmax_ce=kernel)
            else:
                loss = torch.nn.functional.cross_entropy(
                    torch.nn.functional.linear(h, w).float().flatten(0, 1), labels.flatten())
        (loss * upstream).backward()
        grads.append((loss.detach(), h.grad, w.grad))
        h.grad = w.grad = None
    for got, want in zip(*grads):
        assert_rel_close(got, want, 1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:  # evaluation path: no gradient buffers, same value
        with torch.no_grad():
            assert_rel_close(linear_cross_entropy(h, w, labels), grads[1][0], 1e-6)


def test_model_loss_path_equals_logits_path(micro_cfg):
    model = init_model(micro_cfg, torch.device("cpu"), seed=2)
    tokens = torch.randint(0, micro_cfg.vocab_size, (2, 25))
    fused = model(tokens[:, :-1], labels=tokens[:, 1:])
    fused.backward()
    g_fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(tokens[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    ref.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    for a, p in zip(g_fused, model.parameters()):
        assert_rel_close(a, p.grad, 1e-5)


def test_rope_gradient_is_the_inverse_rotation():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32, vocab_size=10)
    cos, sin = rope_cos_sin(cfg, torch.arange(9) * 37)
    x = torch.randn(2, 9, 2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos.double(), sin.double()), (x,))


def test_rmsnorm_matches_formula_and_gradcheck():
    from loom.models.transformer import RMSNorm

    norm = RMSNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)
    assert torch.autograd.gradcheck(norm, (x,))
    # bf16 input: computed in fp32, returned in bf16.
    xb = x.detach().to(torch.bfloat16)
    out = RMSNorm(8, 1e-5)
    torch.nn.init.ones_(out.weight)
    assert out(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("dim", [40, 256])
def test_rmsnorm_fp32_kernel_matches_fp64(dim):
    """fp32 RMSNorm (loom's CPU kernel where available) against the fp64 formula: output and
    the gradients of input and weight (the weight's summed over 300 rows across threads)."""
    from loom.models.kernel_parts import LoomRMSNorm

    torch.manual_seed(0)
    norm = LoomRMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    x = torch.randn(3, 100, dim, requires_grad=True)
    g = torch.randn(3, 100, dim)
    y = norm(x)
    y.backward(g)
    xd, wd = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    want.backward(g.double())
    for got, ref in ((y, want), (x.grad, xd.grad), (norm.weight.grad, wd.grad)):
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_swiglu_fp32_kernel_matches_fp64():
    """silu(a) * b (loom's CPU kernel where available) against fp64, values and gradients; the
    length is not a multiple of the kernel's vector or chunk sizes."""
    from loom.models.kernel_parts import LoomSwiGLU

    swiglu = LoomSwiGLU()
    torch.manual_seed(0)
    a = (4 * torch.randn(3, 1000, 37)).requires_grad_()
    b = torch.randn(3, 1000, 37, requires_grad=True)
    g = torch.randn(3, 1000, 37)
    y = swiglu(a, b)
    y.backward(g)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = torch.nn.functional.silu(ad) * bd
    want.backward(g.double())
    for got, ref in ((y, want), (a.grad, ad.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


def test_bf16_linear_via_fp32_is_the_bf16_product():
    """The widened bf16 linear gives autocast's native bf16 results: inputs rounded to bf16,
    fp32 sums, outputs rounded to bf16; only the order of the fp32 additions differs, so all
    but a handful of elements are bit-identical and none is off by more than one bf16 step."""
    from loom.kernels.matmul import Linear, _Bf16LinearViaFp32, linear, matmul

    x = torch.randn(4, 64, 256, requires_grad=True)
    w = torch.randn(768, 256, requires_grad=True)
    g = torch.randn(4, 64, 768).bfloat16()
    results = []
    for fn in (torch.nn.functional.linear, _Bf16LinearViaFp32.apply):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w)
        y.backward(g)
        results.append((y, x.grad, w.grad))
        x.grad = w.grad = None
    for native, widened in zip(*results):
        assert native.dtype == widened.dtype
        assert _bits_differ(native, widened) < 1e-3
        torch.testing.assert_close(widened.float(), native.float(), rtol=2**-7, atol=1e-3)
    # The exact product of the rounded operands, rounded once: what both approximate.
    exact = (x.detach().bfloat16().double() @ w.detach().bfloat16().double().t()).bfloat16()
    assert _bits_differ(results[1][0], exact) < 1e-3
    # matmul: the same rule for a plain product; fp32 and no-autocast paths are F.linear itself.
    a, b = torch.randn(64, 256).bfloat16(), torch.randn(256, 96).bfloat16()
    assert _bits_differ(matmul(a, b), a @ b) < 1e-3
    layer = Linear(256, 768)
    assert isinstance(layer, torch.nn.Linear) and layer.bias is None
    assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("widen", [False, True])
def test_bf16_attention_kernel_matches_fp32_reference(monkeypatch, widen):
    """Both CPU bf16 attention kernels (PyTorch's bf16 flash op, and the fp32 op on widened
    inputs) agree with fp64 attention of the bf16 inputs within bf16 rounding."""
    import loom.kernels.attention as attention

    monkeypatch.setattr(attention, "bf16_via_fp32", lambda device: widen)
    q = torch.randn(1, 4, 128, 32).bfloat16()
    k = torch.randn(1, 2, 128, 32).bfloat16()
    v = torch.randn(1, 2, 128, 32).bfloat16()
    out, lse = attention.attention_forward(q, k, v, True, 32**-0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _reference_attention(*ref_inputs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    g = torch.randn_like(out)
    ref.backward(g.double())
    grads = attention.attention_backward(g, q, k, v, out, lse, True, 32**-0.5)
    for got, want in zip(grads, ref_inputs):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want.grad, rtol=2e-2, atol=2e-2)


def test_bf16_model_as_accurate_with_widened_kernels(monkeypatch, micro_cfg):
    """A bf16 training step through the widened kernels is at least as close to the fp32 step as
    through PyTorch's native bf16 kernels (the widened attention keeps its probabilities in fp32
    where the native one rounds them to bf16; the widened linear is the native one's result)."""
    import loom.kernels.attention as attention_module
    import loom.kernels.matmul as matmul_module

    model = init_model(micro_cfg, torch.device("cpu"), seed=3)
    tokens = torch.randint(0, micro_cfg.vocab_size, (2, 33))
    results = {}
    for mode in ("float32", "native", "widened"):
        monkeypatch.setattr(matmul_module, "cpu_lacks_bf16_arithmetic", lambda: mode == "widened")
        monkeypatch.setattr(attention_module, "bf16_via_fp32", lambda device: mode == "widened")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        results[mode] = [loss.detach()] + [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)

    def errors(mode):
        return [((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                for a, b in zip(results[mode], results["float32"])]

    native, widened = errors("native"), errors("widened")
    assert 0 < max(widened) <= 1.2 * max(native) and max(native) < 0.05
    assert sum(widened) <= 1.2 * sum(native)

@pytest.mark.slow

def test_compiled_blocks_match_eager(micro_cfg):
    """train.compile compiles each block; the compiled model computes the eager loss and
    gradients (the eager-only fast paths, such as RoPE's in-place halves, must not break tracing)."""
    cfg = dataclasses.replace(micro_cfg, n_layers=1)  # one block: one compilation
    eager = init_model(cfg, torch.device("cpu"), seed=4)
    compiled = init_model(cfg, torch.device("cpu"), seed=4)
    for block in compiled.layers.values():
        block.compile()
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    results = []
    for model in (eager, compiled):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for want, got in zip(*results):
        assert_rel_close(got, want, 1e-5)


def _attention_fp64(q, k, v, causal: bool):
    """softmax(QK^T / sqrt(D)) V in fp64 with GQA; causal is top-left aligned."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize(
    "b, hq, hkv, lq, lk, d, causal",
    [(1, 8, 8, 1024, 1024, 32, True),    # the benchmark's shape
     (2, 4, 2, 200, 200, 64, True),      # GQA, lengths not a multiple of the 64-row tiles
     (1, 4, 4, 130, 70, 32, False),      # a fully visible rectangle (context-parallel block)
     (1, 2, 1, 77, 77, 128, True),
     (1, 3, 3, 5, 5, 16, True)],         # fewer rows than one tile
)
def test_loom_cpu_attention_kernel_matches_fp64(b, hq, hkv, lq, lk, d, causal):
    """loom's AVX-512 kernel (where this machine runs it) against fp64 attention: output, lse
    and all three gradients, on [B, L, H, D]-strided inputs like the model's."""
    from loom.kernels import cpu_attention

    if not cpu_attention.available():
        pytest.skip(cpu_attention.status())
    torch.manual_seed(0)
    q = torch.randn(b, lq, hq, d).transpose(1, 2)
    k = torch.randn(b, lk, hkv, d).transpose(1, 2)
    v = torch.randn(b, lk, hkv, d).transpose(1, 2)
    assert cpu_attention.supports(q, k, v)
    out, lse = torch.ops.loom.cpu_attention_forward(q, k, v, causal, d**-0.5)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _attention_fp64(*ref_inputs, causal)
    assert out.shape == q.shape and lse.shape == (b, hq, lq)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=2e-6)
    g = torch.randn(b, hq, lq, d)
    ref_out.backward(g.double())
    grads = torch.ops.loom.cpu_attention_backward(g, q, k, v, out, lse, causal, d**-0.5)
    for got, want in zip(grads, ref_inputs):
        assert got.shape == want.shape
        scale = want.grad.abs().max()
        assert (got.double() - want.grad).abs().max() <= 1e-5 * scale


def test_attention_interface_uses_loom_kernel_and_falls_back(monkeypatch):
    """The CPU fp32 path of attention_forward/backward runs loom's kernel where available and
    ATen's flash op otherwise; both give the same attention."""
    from loom.kernels import cpu_attention
    from loom.kernels.cpu_attention import LOOM_CPU_ATTENTION
    import loom.kernels.attention as attention

    q, k, v = (torch.randn(1, 4, 96, 32) for _ in range(3))
    calls = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(attention.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda *a, **kw: calls.append("aten") or real(*a, **kw), raising=False)
    ours, _ = attention.attention_forward(q, k, v, True, 32**-0.5, kernel=LOOM_CPU_ATTENTION)
    assert calls == ([] if cpu_attention.available() else ["aten"])
    monkeypatch.setattr(cpu_attention, "supports", lambda *a: False)
    theirs, _ = attention.attention_forward(q, k, v, True, 32**-0.5, kernel=LOOM_CPU_ATTENTION)
    assert calls[-1] == "aten"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _spy_on_kernels(monkeypatch) -> set:
    """The set that collects the names of loom's kernel entry points called from now on."""
    from loom.kernels import cpu_attention, cpu_kernels

    called = set()

    class Spy:
        def __init__(self, lib):
            self.lib = lib

        def __getattr__(self, name):
            called.add(name)
            return getattr(self.lib, name)

    for module in (cpu_attention, cpu_kernels):
        real = module._lib
        monkeypatch.setattr(module, "_lib", lambda real=real: Spy(real()))
    return called


def test_fp32_cpu_training_step_runs_every_loom_kernel(monkeypatch):
    """One fp32 CPU forward + backward of the model calls each of loom's CPU kernels (where the
    library is available; none where it is not). Value tests alone would pass on PyTorch's ops."""
    from loom.kernels import library

    called = _spy_on_kernels(monkeypatch)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=256)
    model = init_model(cfg, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, 256, (2, 65))
    model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
    assert called == set()  # as built: PyTorch's ops only (no kernel dispatch in the model)
    install_cpu_kernels(model)
    model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
    kernels = {"loom_attention_forward", "loom_attention_backward", "loom_rms_norm_forward",
               "loom_rms_norm_backward", "loom_swiglu_forward", "loom_swiglu_backward", "loom_rope",
               "loom_softmax_cross_entropy"}
    assert called == (kernels if library.available() else set())


@pytest.mark.parametrize("head_dim, attention_widens", [(16, True), (64, False)])
def test_bf16_cpu_training_step_widens_onto_loom_kernels(monkeypatch, head_dim, attention_widens):
    """Under bf16 autocast, RoPE and SwiGLU run loom's fp32 kernels on widened inputs, and
    attention does at head_dim <= WIDEN_MAX_HEAD_DIM (at any head_dim on a CPU without bf16
    arithmetic); the step is as close to the fp32 step as PyTorch's bf16 ops bring it."""
    from loom.kernels import library
    from loom.kernels.matmul import cpu_lacks_bf16_arithmetic

    cfg = ModelConfig(dim=4 * head_dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=256)
    tokens = torch.randint(0, 256, (2, 65))
    results = {}
    for mode in ("float32", "torch", "loom"):
        model = init_model(cfg, torch.device("cpu"), seed=0)
        if mode == "loom":
            line = convert_model(model, "auto", torch.device("cpu"), torch.bfloat16)
            called = _spy_on_kernels(monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        results[mode] = [loss.detach()] + [p.grad for p in model.parameters()]
    widened = {"loom_swiglu_forward", "loom_swiglu_backward", "loom_rope"}
    if attention_widens or cpu_lacks_bf16_arithmetic():
        widened |= {"loom_attention_forward", "loom_attention_backward"}
    if library.available():
        assert widened <= called and not ({"loom_attention_forward"} - widened) & called
        # The summary's kernel line says what ran widened.
        assert ("attention by PyTorch's bf16 op" in line) == ("loom_attention_forward" not in widened), line

    def errors(mode):
        return [((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                for a, b in zip(results[mode], results["float32"])]

    assert max(errors("loom")) <= 1.2 * max(errors("torch")) < 0.06


def test_vocab_parallel_loss_equals_the_fused_loss():
    """The vocabulary-parallel loss on one shard of the whole vocabulary (a one-rank group) is
    the fused loss: ignored labels, several chunks, an upstream gradient other than 1."""
    import torch.distributed as dist

    from loom.models.loss import linear_cross_entropy
    from loom.parallel.vocab_parallel import vocab_parallel_cross_entropy

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        h = torch.randn(2, 300, 16)
        w = torch.randn(50_000, 16)  # 8 MiB chunks of 50,000 fp32 logits -> 41 tokens each
        labels = torch.randint(0, 50_000, (2, 300))
        labels[0, ::7] = -100
        grads = []
        for loss_fn in (lambda a, b: linear_cross_entropy(a, b, labels),
                        lambda a, b: vocab_parallel_cross_entropy(a, b, labels, 0, dist.group.WORLD)):
            a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = loss_fn(a, b)
            (2.5 * loss).backward()
            grads.append((loss.detach(), a.grad, b.grad))
        for x, y in zip(*grads):  # fp32 sums in other orders (one kernel against torch's ops)
            assert_rel_close(y, x, 1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt3", "tiny-nemotron", "tiny-bert"])
def test_training_step_with_and_without_loom_kernels(name):
    """train.kernels: the CPU fp32 step of every family with loom's kernels installed by the
    converter equals the step on PyTorch's ops (loss and every gradient, fp32 parity rule)."""
    from loom.kernels import library
    from conftest import assert_rel_close

    if not library.available():
        pytest.skip(f"loom's kernels cannot run here: {library.status()}")
    cfg = dataclasses.replace(MODELS[name], n_layers=2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 97))
    labels = torch.randint(0, cfg.vocab_size, (2, 97))
    labels[0, :7] = -100
    runs = {}
    for kernels in ("torch", "loom"):
        model = init_model(cfg, torch.device("cpu"), seed=1)
        line = convert_model(model, kernels, torch.device("cpu"))
        assert ("loom" in line) == (kernels == "loom"), line
        loss = model(tokens, labels=labels)
        loss.backward()
        runs[kernels] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    (loss_t, grads_t), (loss_l, grads_l) = runs["torch"], runs["loom"]
    assert loss_l == pytest.approx(loss_t, rel=1e-5)
    floor = 1e-4 * max(g.abs().max().item() for g in grads_t.values())
    for n, g in grads_t.items():
        assert_rel_close(grads_l[n], g, 1e-5, floor)


@pytest.mark.parametrize("kernels", ["torch", "loom"])
def test_labels_outside_the_vocabulary_are_an_error_on_both_paths(kernels):
    """-100 is the only ignored label; a negative label or one >= V is an error whichever
    softmax runs (loom's kernel used to skip them, PyTorch's to clamp them to class 0)."""
    from loom.models.kernel_parts import loom_softmax_cross_entropy_

    softmax_ce = loom_softmax_cross_entropy_ if kernels == "loom" else None
    h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
    ok = torch.tensor([[1, 2, -100, 4, 10], [0, -100, 3, 3, 3]])
    assert torch.isfinite(linear_cross_entropy(h, w, ok, softmax_ce=softmax_ce))
    for bad in (-1, -101, 11, 1000):
        labels = ok.clone()
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=f"label {bad} is outside the vocabulary \\[0, 11\\)"):
            linear_cross_entropy(h, w, labels, softmax_ce=softmax_ce)


def test_import_and_fallback_without_fcntl_or_compiler(tmp_path):
    """Where the kernels cannot build (no fcntl, no g++: Windows, ARM, a bare container) `import
    loom` still works, train.kernels='auto' falls back to PyTorch's ops and says why, and 'loom'
    is refused before anything starts."""
    import subprocess
    import sys

    code = (
        "import sys, os; sys.modules['fcntl'] = None; os.environ['PATH'] = ''\n"
        "import torch, loom\n"
        "from loom.models.converters import resolve_kernels\n"
        "use, line = resolve_kernels('auto', torch.device('cpu'))\n"
        "print(use, line)\n"
        "from loom.config import load_config, validate, ConfigError\n"
        "try:\n"
        "    validate(load_config(None, ['--train.kernels=loom']), check_files=False)\n"
        "except ConfigError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = r.stdout.strip().splitlines()
    assert first.startswith("False PyTorch ops (") and ("compiler" in first or "capability" in first
                                                        or "x86-64" in first), first
    assert second.startswith("refused: train.kernels='loom' but loom's kernels cannot run here"), second


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_equal_the_published_figures(name):
    """Every registry entry with a published count: the built model (on meta) has it, exactly
    where the source gives an exact figure (Llama, Nemotron-4), else to the precision the
    source publishes (e.g. GPT-3 175B: "175.0B"); the analytic count agrees with the build."""
    count, precision, source = PUBLISHED_PARAMS[name]
    model = build_model(MODELS[name], "meta")
    built = sum(p.numel() for p in model.parameters())
    assert built == param_counts(MODELS[name]).total
    if precision == 0:
        assert built == count, source
    else:
        assert abs(built - count) <= precision * count, (built, source)


def test_nemotron4_340b_head_dim():
    assert MODELS["nemotron4-340b"].head_dim == 192  # 18432 / 96 heads (its count: PUBLISHED_PARAMS)
