"""Output layer and cross-entropy fused, chunked over tokens.

The full logits [N, V] are never materialized: each chunk of tokens computes its logits, its
loss and, at once, the gradients of its hidden states and its share of the output weight's
gradient. Memory for the loss is O(chunk * V) instead of O(N * V); at 128K tokens and a 128K
vocabulary the fp32 logits alone would be 64 GiB. Chunks also keep each matmul's output small,
which on CPU avoids page-faulting a fresh huge buffer every step (~1.5x on that matmul here).
"""
from __future__ import annotations

import torch

from loom.kernels.matmul import matmul

IGNORE_INDEX = -100


# Rows below which the output layer's matmuls run inefficiently (measured on this CPU, Llama
# dim 256, 2 threads: 64-row chunks train 10% slower than 256-row ones at vocabulary 32000 and
# 128256; no gain beyond 256).
MIN_CHUNK_ROWS = 256


def chunk_tokens(n: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk of n against a vocabulary (or vocabulary shard) of `vocab`: logits of
    about 8 MiB (fp32) on CPU, 1 GiB on GPUs, but at least MIN_CHUNK_ROWS tokens, so that a
    large vocabulary does not make the matmuls skinny (at 128256: 128 MiB of logits per chunk)."""
    budget = 2**21 if device.type == "cpu" else 2**28
    return min(n, max(MIN_CHUNK_ROWS, budget // vocab))


def check_labels(labels: torch.Tensor, vocab: int) -> None:
    """Every label is a class in [0, vocab) or IGNORE_INDEX (-100); anything else is an error
    (a silently skipped or clamped label would train on the wrong target). On GPUs the check
    is asynchronous (no host synchronization); fake tensors have no values to check."""
    if type(labels) is not torch.Tensor:
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if labels.device.type == "cuda":
        torch._assert_async(~bad.any(), f"labels outside [0, {vocab}) other than {IGNORE_INDEX}")
        return
    if bad.any():
        value = int(labels[bad][0])
        raise ValueError(f"label {value} is outside the vocabulary [0, {vocab}); allowed: a token id "
                         f"or {IGNORE_INDEX} (ignored)")


def softmax_cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor,
                           want_grads: bool) -> torch.Tensor:
    """logits [c, V] fp32, labels [c] (checked: classes or IGNORE_INDEX) -> per-token losses [c]
    (0 where ignored); with want_grads, logits are overwritten by
    grad_scale * (softmax - one_hot(label)), zero where ignored. PyTorch's ops; loom's CPU
    kernel (loom.models.kernel_parts) computes the same in one pass."""
    valid = labels != IGNORE_INDEX
    target = logits.gather(1, labels.clamp(min=0)[:, None])  # [c, 1]
    # One exp pass serves both the log-sum-exp and the softmax, in place.
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()
    row_sum = probs.sum(dim=-1, keepdim=True)
    losses = (row_max + row_sum.log() - target).squeeze(1) * valid
    if want_grads:
        probs.mul_(grad_scale / row_sum)
        probs.scatter_add_(1, labels.clamp(min=0)[:, None], -grad_scale.expand(labels.shape[0], 1))
        if type(valid) is not torch.Tensor or not valid.all():  # fake tensors have no values to test
            probs.mul_(valid[:, None])
    return losses


def take_saved_grads(ctx) -> tuple:
    """The gradients a fused loss computed in forward, for its backward. Dropped from ctx
    (so they do not outlive the backward) unless the graph is retained: zero-bubble pipeline
    schedules run backward twice over it, once for the inputs and once for the weights."""
    grads = ctx.grads
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)()
    if not keep:
        del ctx.grads
    return grads


def chunked_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        compute_dtype: torch.dtype, want_grads: bool, loss_of_chunk) -> tuple:
    """The loop of every fused loss: hidden [N, D], weight [V', D] and bias [V'] or None (the
    vocabulary or this rank's shard of it), chunk by chunk of tokens: logits [c, V'] in fp32,
    then loss_of_chunk(logits, start, end) -> the chunk's summed loss, which with want_grads
    also overwrites the logits with d(mean loss)/d(logits); then the chunk's share of the
    gradients. Returns (summed loss, grad of hidden [N, D], grad of weight [V', D] fp32, grad of
    bias [V'] fp32 or None) (gradients None without want_grads)."""
    n = hidden.shape[0]
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    grad_h = torch.empty_like(hidden) if want_grads else None
    grad_w = None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_grads and bias is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = chunk_tokens(n, weight.shape[0], hidden.device)
    for start in range(0, n, step):
        end = min(n, start + step)
        hc = h[start:end]
        logits = matmul(hc, w.t())  # [c, V']
        if b is not None:
            logits = logits + b
        logits = logits.float()
        loss += loss_of_chunk(logits, start, end)
        if want_grads:
            g = logits.to(compute_dtype)  # d(mean loss)/d logits
            grad_h[start:end] = matmul(g, w)
            if grad_b is not None:
                grad_b += logits.sum(0)
            if grad_w is None:
                grad_w = matmul(g.t(), hc).float()  # [V', D]; no zero-filled start
            elif g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), hc)  # no [V', D] temporary per chunk
            else:
                grad_w.add_(matmul(g.t(), hc))
    return loss, grad_h, grad_w, grad_b


def upstream_scaled_grads(ctx, grad_loss: torch.Tensor) -> tuple:
    """A fused loss's backward: its gradients (computed in forward, kept on ctx) times the
    upstream gradient, for (hidden, weight). A plain CPU upstream gradient of 1 (the usual
    loss.backward()) needs no pass; elsewhere (GPUs, where .item() would synchronize; fake
    tensors, which have no value) they are multiplied."""
    grad_h, grad_w, grad_b = take_saved_grads(ctx)
    if not (type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
        grad_h = grad_h * grad_loss.to(grad_h.dtype)
        grad_w = grad_w * grad_loss
        grad_b = grad_b * grad_loss if grad_b is not None else None
    gh = grad_h if ctx.needs_input_grad[0] else None
    gw = grad_w.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    gb = grad_b.to(ctx.weight_dtype) if grad_b is not None and ctx.needs_input_grad[2] else None
    return gh, gw, gb


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, compute_dtype, softmax_ce, loss_tokens):
        # Gradients are of the mean loss from the start, so that backward has nothing left to
        # do for the usual upstream gradient of 1 (no pass over a [V, D] gradient).
        grad_scale = 1.0 / loss_divisor(labels, loss_tokens)
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype

        def loss_of_chunk(logits, start, end):
            return softmax_ce(logits, labels[start:end], grad_scale, want_grads).sum()

        out = chunked_linear_loss(hidden, weight, bias, compute_dtype, want_grads, loss_of_chunk)
        # Kept on ctx, not saved tensors, so that backward can hand them over without a copy.
        ctx.grads = out[1:]
        return out[0] * grad_scale

    @staticmethod
    def backward(ctx, grad_loss):
        return (*upstream_scaled_grads(ctx, grad_loss), None, None, None, None)


def loss_divisor(labels: torch.Tensor, loss_tokens: torch.Tensor | None) -> torch.Tensor:
    """What the summed loss is divided by (fp32 scalar): the labels' valid tokens, or with
    loss_tokens [B] (per sample, the valid tokens of its whole sequence divided by the number of
    context-parallel ranks sharing it) their sum, so that every rank's mean is a share of the
    whole micro-batch's mean whatever the layout (masked-LM and fine-tuning targets leave
    different token counts on each rank)."""
    if loss_tokens is not None:
        return loss_tokens.float().sum().clamp(min=1e-12)
    return (labels != IGNORE_INDEX).sum().clamp(min=1).float()


def compute_dtype_of(hidden: torch.Tensor) -> torch.dtype:
    """The dtype an nn.Linear would compute in here: autocast's, else the input's."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, softmax_ce=None,
                         loss_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of `hidden @ weight.T + bias` against labels, in fp32, without the logits.

    hidden [..., D], weight [V, D], bias [V] or None, labels [...] (IGNORE_INDEX = -100 leaves a
    token out; any other label outside [0, V) is an error). softmax_ce: the per-chunk kernel,
    `softmax_cross_entropy_`'s signature (default: that one). loss_tokens: see `loss_divisor`.
    Under autocast the matmuls run in the autocast dtype, as an nn.Linear would.
    """
    check_labels(labels, weight.shape[0])
    dev = hidden.device.type
    compute_dtype = compute_dtype_of(hidden)
    with torch.autocast(dev, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, bias, labels.flatten(), compute_dtype,
                                              softmax_ce or softmax_cross_entropy_, loss_tokens)
