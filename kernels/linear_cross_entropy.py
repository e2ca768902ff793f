"""Triton kernels for fused linear cross-entropy (contract: csrc/linear_cross_entropy.h).

The (n, V) logits never reach memory. The forward runs one program per block of BLOCK_N rows; it walks
the vocabulary in BLOCK_V tiles, computes each tile of logits on chip (tl.dot over H in BLOCK_H steps,
fp32 accumulation) and folds it into an online logsumexp, the sum of logits (label smoothing), the
target logit and the argmax; only loss, lse and argmax are stored. The backward runs one program per
(row block, vocabulary tile): it recomputes that tile of logits, turns it into the gradient tile G
with the saved lse, and adds G @ W_tile to grad_hidden, G^T @ h_rows to grad_weight and the column
sums of G to grad_bias, with fp32 atomics (so the sums are not bitwise reproducible run to run). The
launcher casts the fp32 sums to the input dtypes. Offsets are int64: V * H exceeds 2^31 for large
vocabularies. chunk_size is ignored: no chunk of logits ever leaves the chip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_entropy import _tanh


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    hidden_dim,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for start in range(0, hidden_dim, BLOCK_H):
        ks = start + tl.arange(0, BLOCK_H)
        k_mask = ks < hidden_dim
        h = tl.load(hidden_ptr + rows[:, None] * hidden_dim + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * hidden_dim + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0)
        z = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), z, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _linear_cross_entropy_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    target_ptr,
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    rows_total,
    vocab,
    hidden_dim,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    RETURN_ARGMAX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < rows_total
    target = tl.load(target_ptr + rows, mask=row_mask, other=0)
    running_max = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_x = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    best_z = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    best_col = tl.zeros([BLOCK_N], dtype=tl.int64)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < vocab
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, hidden_dim, HAS_BIAS,
                         DOT_DTYPE, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        if RETURN_ARGMAX:
            # Strictly greater keeps the earlier tile on ties; tl.argmax keeps the first column within a tile.
            z_masked = tl.where(col_mask[None, :], z, -float("inf"))
            tile_best = tl.max(z_masked, axis=1)
            tile_col = start + tl.argmax(z_masked, axis=1, tie_break_left=True).to(tl.int64)
            better = tile_best > best_z
            best_col = tl.where(better, tile_col, best_col)
            best_z = tl.where(better, tile_best, best_z)
        x = z
        if HAS_SOFTCAP:
            x = softcap * _tanh(z / softcap)
        x_target += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1)
        x = tl.where(col_mask[None, :], x, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(sum_exp)
    loss = lse - (1.0 - label_smoothing) * x_target + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * sum_x / vocab
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if RETURN_ARGMAX:
        tl.store(argmax_ptr + rows, best_col, mask=row_mask)


@triton.jit
def _linear_cross_entropy_backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    target_ptr,
    lse_ptr,
    grad_loss_ptr,
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    rows_total,
    vocab,
    hidden_dim,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_GRAD_HIDDEN: tl.constexpr,
    NEED_GRAD_WEIGHT: tl.constexpr,
    NEED_GRAD_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < rows_total
    col_mask = cols < vocab
    target = tl.load(target_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_loss_ptr + rows, mask=row_mask, other=0.0)
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, hidden_dim, HAS_BIAS,
                     DOT_DTYPE, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    x = z
    if HAS_SOFTCAP:
        x = softcap * _tanh(z / softcap)
    # dloss/dx_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t], times dx/dz = 1 - (x / softcap)^2.
    grad = tl.exp(x - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / vocab
    grad -= tl.where(cols[None, :] == target[:, None], 1.0 - label_smoothing, 0.0)
    if HAS_SOFTCAP:
        u = x / softcap
        grad *= 1.0 - u * u
    # Padding rows and columns must add nothing; their exp(x - lse) is meaningless, even inf.
    grad = tl.where(row_mask[:, None] & col_mask[None, :], grad * g[:, None], 0.0)
    if NEED_GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, axis=0), mask=col_mask, sem="relaxed")
    if NEED_GRAD_HIDDEN or NEED_GRAD_WEIGHT:
        grad_dot = grad.to(DOT_DTYPE)
        for start in range(0, hidden_dim, BLOCK_H):
            ks = start + tl.arange(0, BLOCK_H)
            k_mask = ks < hidden_dim
            if NEED_GRAD_HIDDEN:
                w = tl.load(weight_ptr + cols[:, None] * hidden_dim + ks[None, :],
                            mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                part = tl.dot(grad_dot, w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
                tl.atomic_add(grad_hidden_ptr + rows[:, None] * hidden_dim + ks[None, :], part,
                              mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
            if NEED_GRAD_WEIGHT:
                h = tl.load(hidden_ptr + rows[:, None] * hidden_dim + ks[None, :],
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                part = tl.dot(tl.trans(grad_dot), h.to(DOT_DTYPE), input_precision=DOT_PRECISION)
                tl.atomic_add(grad_weight_ptr + cols[:, None] * hidden_dim + ks[None, :], part,
                              mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_config(dtype: torch.dtype, device: torch.device):
    # The interpreter multiplies bf16 as raw uint16 bits, so it gets fp32 operands (the products are exact
    # either way); a GPU multiplies 16-bit operands on tensor cores, with G rounded to the input dtype as
    # torch's own backward does. fp32 follows torch's matmul precision setting.
    if device.type != "cuda":
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return _TL_DTYPE[dtype], "ieee"


# (BLOCK_N, BLOCK_V, BLOCK_H) on a GPU by (fp32 operands, backward), all at 8 warps: the largest tiles for
# which ptxas reports no register spills for sm_90 (a few bytes for the fp32 forward). The backward holds G
# beside the partial-gradient tiles, hence narrower tiles. Chosen from compiler output, not yet timed on a GPU.
_GPU_BLOCKS = {
    (False, False): (64, 128, 64),
    (False, True): (64, 128, 32),
    (True, False): (64, 128, 32),
    (True, True): (64, 64, 32),
}


def _blocks(rows: int, vocab: int, hidden_dim: int, dtype: torch.dtype, device: torch.device, backward: bool):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages): one config, as the interpreter cannot autotune."""
    def fit(size, cap):
        # tl.dot needs every block dimension >= 16.
        return min(cap, max(16, triton.next_power_of_2(size)))

    if device.type != "cuda":
        # The interpreter pays per program and per block operation, so few, large blocks.
        block_n, block_v, block_h, warps, stages = 32, 128, 16, 4, 1
    else:
        (block_n, block_v, block_h), warps, stages = _GPU_BLOCKS[dtype == torch.float32, backward], 8, 3
    return fit(rows, block_n), fit(vocab, block_v), fit(hidden_dim, block_h), warps, stages


def linear_cross_entropy_forward(hidden, weight, bias, target, grad_loss, label_smoothing, z_loss, softcap,
                                 chunk_size, need_grad_hidden, need_grad_weight, need_grad_bias, return_argmax):
    if hidden.dtype not in _TL_DTYPE:
        raise TypeError(f"hidden: the Triton linear cross-entropy takes float32, float16 or bfloat16, "
                        f"got {hidden.dtype}")
    rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    has_bias = bias is not None
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    lse = torch.empty_like(loss)
    argmax = torch.empty(rows, dtype=torch.long, device=device) if return_argmax else None
    grads = grad_loss is not None

    def fp32_sum(wanted, *shape):
        return torch.zeros(*shape, dtype=torch.float32, device=device) if grads and wanted else None

    grad_hidden = fp32_sum(need_grad_hidden, rows, hidden_dim)
    grad_weight = fp32_sum(need_grad_weight, vocab, hidden_dim)
    grad_bias = fp32_sum(need_grad_bias and has_bias, vocab)
    dot_dtype, dot_precision = _dot_config(hidden.dtype, device)
    # Pointers the kernel never reads for a disabled feature still need a tensor to point at.
    unused = loss
    if rows > 0:
        block_n, block_v, block_h, warps, stages = _blocks(rows, vocab, hidden_dim, hidden.dtype, device, False)
        _linear_cross_entropy_forward_kernel[(triton.cdiv(rows, block_n),)](
            hidden,
            weight,
            bias if has_bias else unused,
            target,
            loss,
            lse,
            argmax if return_argmax else unused,
            rows,
            vocab,
            hidden_dim,
            label_smoothing,
            z_loss,
            softcap,
            HAS_BIAS=has_bias,
            HAS_SOFTCAP=softcap > 0,
            HAS_SMOOTHING=label_smoothing > 0,
            RETURN_ARGMAX=return_argmax,
            DOT_DTYPE=dot_dtype,
            DOT_PRECISION=dot_precision,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_H=block_h,
            num_warps=warps,
            num_stages=stages,
        )
    if rows > 0 and any(g is not None for g in (grad_hidden, grad_weight, grad_bias)):
        block_n, block_v, block_h, warps, stages = _blocks(rows, vocab, hidden_dim, hidden.dtype, device, True)
        _linear_cross_entropy_backward_kernel[(triton.cdiv(rows, block_n), triton.cdiv(vocab, block_v))](
            hidden,
            weight,
            bias if has_bias else unused,
            target,
            lse,
            grad_loss,
            unused if grad_hidden is None else grad_hidden,
            unused if grad_weight is None else grad_weight,
            unused if grad_bias is None else grad_bias,
            rows,
            vocab,
            hidden_dim,
            label_smoothing,
            z_loss,
            softcap,
            HAS_BIAS=has_bias,
            HAS_SOFTCAP=softcap > 0,
            NEED_GRAD_HIDDEN=grad_hidden is not None,
            NEED_GRAD_WEIGHT=grad_weight is not None,
            NEED_GRAD_BIAS=grad_bias is not None,
            DOT_DTYPE=dot_dtype,
            DOT_PRECISION=dot_precision,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_H=block_h,
            num_warps=warps,
            num_stages=stages,
        )

    def cast(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return loss, lse, argmax, cast(grad_hidden, hidden), cast(grad_weight, weight), cast(grad_bias, bias)
