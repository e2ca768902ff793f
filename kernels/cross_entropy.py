"""Triton kernels for cross-entropy on logits (contract: csrc/cross_entropy.h).

One program per row walks the vocabulary in BLOCK_V slices: the forward keeps a running max and
sum of exponentials (online logsumexp) and stores only loss and logsumexp; the backward recomputes
softmax from the logsumexp and writes the gradient, possibly over the logits themselves.
Math is fp32 after every load; row offsets are int64 so N·V may exceed 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh through exp: libdevice is unavailable in the interpreter. Saturates correctly at ±inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _cross_entropy_forward_kernel(
    logits_ptr,
    logits_row_stride,
    target_ptr,
    loss_ptr,
    lse_ptr,
    vocab,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    if (target == ignore_index) | (target < 0) | (target >= vocab):
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * logits_row_stride
    running_max = -float("inf")
    sum_exp = 0.0
    sum_x = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0))
        x = tl.where(mask, x, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(x))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max))
        running_max = new_max
    lse = running_max + tl.log(sum_exp)
    x_target = tl.load(row_ptr + target).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * _tanh(x_target / softcap)
    loss = lse - (1.0 - label_smoothing) * x_target + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * sum_x / vocab
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    target_ptr,
    lse_ptr,
    grad_loss_ptr,
    vocab,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    row_ptr = logits_ptr + row * logits_row_stride
    out_ptr = grad_ptr + row * grad_row_stride
    if (target == ignore_index) | (target < 0) | (target >= vocab):
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(out_ptr + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < vocab)
        return
    lse = tl.load(lse_ptr + row).to(tl.float32)
    g = tl.load(grad_loss_ptr + row).to(tl.float32)
    # dloss/dx_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t], times dx/dz = 1 - (x / softcap)^2.
    scale = g * (1.0 + 2.0 * z_loss * lse)
    offset = g * label_smoothing / vocab
    target_term = g * (1.0 - label_smoothing)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        grad = tl.exp(x - lse) * scale - offset - tl.where(cols == target, target_term, 0.0)
        if HAS_SOFTCAP:
            u = x / softcap
            grad *= 1.0 - u * u
        tl.store(out_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int, device: torch.device) -> tuple[int, int]:
    # Small blocks in the interpreter (CPU tensors), where every block is a numpy array.
    block = min(triton.next_power_of_2(vocab), 8192 if device.type == "cuda" else 1024)
    return block, (16 if block >= 8192 else 8 if block >= 2048 else 4)


def _stat_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def cross_entropy_forward(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=_stat_dtype(logits), device=logits.device)
    lse = torch.empty_like(loss)
    if rows == 0:
        return loss, lse
    block, warps = _block_v(vocab, logits.device)
    _cross_entropy_forward_kernel[(rows,)](
        logits,
        logits.stride(0),
        target,
        loss,
        lse,
        vocab,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        HAS_SOFTCAP=softcap > 0,
        HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_V=block,
        num_warps=warps,
    )
    return loss, lse


def cross_entropy_backward(logits, target, lse, grad_loss, grad_logits, ignore_index, label_smoothing, z_loss, softcap):
    rows, vocab = logits.shape
    if rows == 0:
        return
    block, warps = _block_v(vocab, logits.device)
    _cross_entropy_backward_kernel[(rows,)](
        logits,
        logits.stride(0),
        grad_logits,
        grad_logits.stride(0),
        target,
        lse,
        grad_loss,
        vocab,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        HAS_SOFTCAP=softcap > 0,
        BLOCK_V=block,
        num_warps=warps,
    )
