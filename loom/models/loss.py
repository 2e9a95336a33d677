"""Output layer and cross-entropy fused, chunked over tokens.

The full logits [N, V] are never materialized: each chunk of tokens computes its logits, its
loss and, at once, the gradients of its hidden states and its share of the output weight's
gradient. Memory for the loss is O(chunk * V) instead of O(N * V); at 128K tokens and a 128K
vocabulary the fp32 logits alone would be 64 GiB. Chunks also keep each matmul's output small,
which on CPU avoids page-faulting a fresh huge buffer every step (~1.5x on that matmul here).
"""
from __future__ import annotations

import torch

from loom.models.matmul import matmul

IGNORE_INDEX = -100


def _chunk_tokens(n: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk: logits of about 8 MiB (fp32) on CPU, 1 GiB on GPUs; at least 64."""
    budget = 2**21 if device.type == "cpu" else 2**28
    return max(64, min(n, budget // vocab))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, compute_dtype):
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if want_grads else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grads else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _chunk_tokens(n, weight.shape[0], hidden.device)
        for start in range(0, n, step):
            end = min(n, start + step)
            hc, lc, vc = h[start:end], labels[start:end], valid[start:end]
            logits = matmul(hc, w.t()).float()  # [c, V]
            target = logits.gather(1, lc.clamp(min=0)[:, None])  # [c, 1]
            # One exp pass serves both the log-sum-exp and the softmax, in place.
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            row_sum = probs.sum(dim=-1, keepdim=True)
            lse = row_max + row_sum.log()
            loss += ((lse - target).squeeze(1) * vc).sum()
            if want_grads:
                # d(sum of losses)/d logits = softmax - one_hot(label), zero for ignored tokens.
                probs.div_(row_sum)
                probs.scatter_add_(1, lc.clamp(min=0)[:, None], -torch.ones_like(target))
                if not vc.all():
                    probs.mul_(vc[:, None])
                g = probs.to(compute_dtype)
                grad_h[start:end] = matmul(g, w)
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), hc)  # no [V, D] temporary per chunk
                else:
                    grad_w.add_(matmul(g.t(), hc))
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        gh = grad_h * scale.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of `hidden @ weight.T` against labels, in fp32, without the logits.

    hidden [..., D], weight [V, D], labels [...] (IGNORE_INDEX = -100 leaves a token out).
    Under autocast the matmuls run in the autocast dtype, as an nn.Linear would.
    """
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(dev, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), compute_dtype)
