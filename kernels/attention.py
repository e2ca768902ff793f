"""Triton kernels for fused cross-modal attention (contract: csrc/attention.h), FlashAttention-2 style.

Packed varlen layout: q (Tq, Hq, D), k and v (Tk, Hk, D) with int32 offsets cu_seqlens_q / cu_seqlens_k; query
head h reads key/value head h // (Hq // Hk) (GQA). The (lq, lk) scores of a sample never reach memory.

- Forward, `_attention_forward_kernel`: one program per (BLOCK_M query rows, sample, query head); programs past
  their sample's length return at once, so the grid is sized by max_seqlen_q. It walks only the key blocks that
  exist for the sample, and under the (bottom-right aligned) causal mask only those below the diagonal, with an
  online softmax in exp2 (the scale is folded with log2(e)). Key blocks that every row of the program may see
  fully skip the mask; only the diagonal and the ragged last block pay for it. The epilogue stores attn and the
  natural-log lse, and out = residual + tanh(gate[h]) * attn from the fp32 attn in the same pass.
- Backward, three kernels (nothing atomic, so every gradient is bitwise reproducible):
  `_attention_backward_preprocess_kernel` computes delta = rowsum(grad_out * attn) (stored times g_h, the term
  the softmax backward of dA = g_h * grad_out needs) and, with a gate, per-block partial sums of
  (1 - g_h^2) * delta that the launcher adds up in torch for grad_gate;
  `_attention_backward_dkdv_kernel` runs one program per (key block, sample, key/value head) and walks the query
  heads of its GQA group and their query blocks, so dK and dV are complete sums held on chip;
  `_attention_backward_dq_kernel` runs one program per (query block, sample, query head) over its key blocks.
  Softmax is recomputed from lse; g_h scales the products (dP = g_h * grad_out @ V^T, dV += (g_h P)^T grad_out)
  rather than grad_out itself, so no extra rounding of grad_out reaches the 16-bit tensor-core operands.

Rows with no allowed key (lk = 0, or causal with lq > lk) get attn exactly 0, lse = -inf and zero gradients:
the running max is guarded before exp2 (never -inf minus -inf), and the backward reads lse = -inf as 0 only
where every probability is masked to 0 anyway. Query rows past a sample's end load as zeros, which makes their
terms in dK and dV exactly zero, so they need no mask in the inner loops; key columns past the end do need one
(they would enter the softmax). Every load and store is masked, offsets into the packed tensors are int64.

Math is fp32 after every load (the interpreter does 16-bit arithmetic on raw bits; GPUs are more accurate so).
On a GPU the dots take 16-bit operands on tensor cores (P and dS rounded to the input dtype, as FlashAttention
does) and fp32 follows torch's matmul precision; the interpreter multiplies in fp32. Head dims that are not
powers of two (80, 96) run in a BLOCK_D of the next power of two with the columns past D masked.

Block sizes: a small @triton.autotune per kernel on a GPU, keyed on the head dim (and, as Triton always adds,
the dtypes); under TRITON_INTERPRET=1 one 16 x 16 config, as the interpreter cannot autotune several.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.backends import triton_interpreting

from .cross_entropy import _tanh

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_tile(base, rows, row_mask, row_stride, offs_d, d_mask):
    """fp32 (len(rows), BLOCK_D) tile of a (rows, D) slice whose row r starts at base + r * row_stride."""
    offsets = rows.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    return tl.load(base + offsets, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, offs_m, offs_d, d_mask, lo, hi, lk, diff, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    # Scores are in log2 units (qk_scale = scale * log2(e)); m_i is the running max, l_i the running sum.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < lk
        k = _row_tile(k_base, offs_n, n_mask, stride_kt, offs_d, d_mask)
        v = _row_tile(v_base, offs_n, n_mask, stride_kt, offs_d, d_mask)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            allowed = n_mask[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diff)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key yet keeps m = -inf: subtract 0 instead, so exp2 sees -inf, never NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    attn_ptr,
    lse_ptr,
    gate_ptr,
    residual_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_lse,
    groups,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    sample = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + sample)
    lq = tl.load(cu_seqlens_q_ptr + sample + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    k_start = tl.load(cu_seqlens_k_ptr + sample)
    lk = tl.load(cu_seqlens_k_ptr + sample + 1) - k_start
    diff = lk - lq  # key j is allowed for row i when j <= i + diff (causal, bottom-right aligned)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < lq
    d_mask = offs_d < HEAD_DIM
    q_base = q_ptr + q_start.to(tl.int64) * stride_qt + head * stride_qh
    kv_offset = k_start.to(tl.int64) * stride_kt + (head // groups) * stride_kh
    q = _row_tile(q_base, offs_m, m_mask, stride_qt, offs_d, d_mask)

    # [0, full): key blocks every row of this program may see whole; [full, hi): the diagonal and ragged tail.
    if CAUSAL:
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, lq) + diff, 0), lk)
        full = tl.minimum(tl.maximum(m0 + diff + 1, 0), lk)
    else:
        hi = lk
        full = lk
    full = (full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, k_ptr + kv_offset, v_ptr + kv_offset, stride_kt, offs_m, offs_d,
                                    d_mask, 0, full, lk, diff, qk_scale, False, CAUSAL, DOT_DTYPE, DOT_PRECISION,
                                    BLOCK_N)
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, k_ptr + kv_offset, v_ptr + kv_offset, stride_kt, offs_m, offs_d,
                                    d_mask, full, hi, lk, diff, qk_scale, True, CAUSAL, DOT_DTYPE, DOT_PRECISION,
                                    BLOCK_N)

    # l_i > 0 exactly for rows with an allowed key (the max contributes exp2(0) = 1); the others stay 0 / -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    attn = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))

    offsets = (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    mask = m_mask[:, None] & d_mask[None, :]
    tl.store(attn_ptr + offsets, attn.to(attn_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + head.to(tl.int64) * stride_lse + q_start + offs_m, lse, mask=m_mask)
    if HAS_GATE or HAS_RESIDUAL:
        out = attn
        if HAS_GATE:
            out = _tanh(tl.load(gate_ptr + head).to(tl.float32)) * out
        if HAS_RESIDUAL:
            out += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_backward_preprocess_kernel(
    grad_out_ptr,
    attn_ptr,
    delta_ptr,
    gate_ptr,
    partial_ptr,
    rows,
    stride_t,
    stride_h,
    stride_delta,
    num_blocks,
    HEAD_DIM: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # delta[h, t] = g_h * sum_d grad_out * attn; partial[h, block] = (1 - g_h^2) * sum over the block of the
    # unscaled delta (grad_gate's terms, summed by the launcher in a fixed order).
    pid = tl.program_id(0)
    head = tl.program_id(1)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < rows
    d_mask = offs_d < HEAD_DIM
    base = head.to(tl.int64) * stride_h
    grad_out = _row_tile(grad_out_ptr + base, offs_t, t_mask, stride_t, offs_d, d_mask)
    attn = _row_tile(attn_ptr + base, offs_t, t_mask, stride_t, offs_d, d_mask)
    delta = tl.sum(grad_out * attn, 1)
    if HAS_GATE:
        g = _tanh(tl.load(gate_ptr + head).to(tl.float32))
        tl.store(partial_ptr + head.to(tl.int64) * num_blocks + pid, (1.0 - g * g) * tl.sum(delta, 0))
        delta = delta * g
    tl.store(delta_ptr + head.to(tl.int64) * stride_delta + offs_t, delta, mask=t_mask)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, offs_n, offs_d, d_mask, lo, hi, lq,
                 diff, qk_scale, g, MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    # Transposed: rows are this program's keys, columns query rows. Rows past lq load as zeros (q, grad_out,
    # lse, delta), so their P^T = 1 multiplies zeros in both products; only the causal mask is needed.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < lq
        q = _row_tile(q_base, offs_m, m_mask, stride_qt, offs_d, d_mask)
        do = _row_tile(do_base, offs_m, m_mask, stride_qt, offs_d, d_mask)
        lse = tl.load(lse_base + offs_m, mask=m_mask, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * _LOG2E  # such rows have every key masked below
        delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
        s_t = tl.dot(k.to(DOT_DTYPE), tl.trans(q.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diff, p_t, 0.0)
        dv = tl.dot((p_t * g).to(DOT_DTYPE), do.to(DOT_DTYPE), dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v.to(DOT_DTYPE), tl.trans(do.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * g
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT_DTYPE), q.to(DOT_DTYPE), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    gate_ptr,
    grad_k_ptr,
    grad_v_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_lse,
    groups,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    sample = tl.program_id(1)
    kv_head = tl.program_id(2)
    k_start = tl.load(cu_seqlens_k_ptr + sample)
    lk = tl.load(cu_seqlens_k_ptr + sample + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= lk:
        return
    q_start = tl.load(cu_seqlens_q_ptr + sample)
    lq = tl.load(cu_seqlens_q_ptr + sample + 1) - q_start
    diff = lk - lq

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < lk
    d_mask = offs_d < HEAD_DIM
    kv_offsets = (k_start + offs_n).to(tl.int64)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)

    # Causal: query blocks from the first row that sees key n0; [lo, full) holds rows that see only part of
    # this key block (masked), [full, lq) rows that see all of it. Keys nobody reads keep zero gradients.
    if CAUSAL:
        lo = (tl.maximum(n0 - diff, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diff, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full = 0
    masked_hi = tl.minimum(full, lq)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for member in range(groups):
        head = kv_head * groups + member
        g = 1.0
        if HAS_GATE:
            g = _tanh(tl.load(gate_ptr + head).to(tl.float32))
        q_offset = q_start.to(tl.int64) * stride_qt + head * stride_qh
        stats_offset = head.to(tl.int64) * stride_lse + q_start
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr + q_offset, grad_out_ptr + q_offset, lse_ptr + stats_offset,
                              delta_ptr + stats_offset, stride_qt, offs_n, offs_d, d_mask, lo, masked_hi, lq, diff,
                              qk_scale, g, True, DOT_DTYPE, DOT_PRECISION, BLOCK_M)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr + q_offset, grad_out_ptr + q_offset, lse_ptr + stats_offset,
                              delta_ptr + stats_offset, stride_qt, offs_n, offs_d, d_mask, full, lq, lq, diff,
                              qk_scale, g, False, DOT_DTYPE, DOT_PRECISION, BLOCK_M)
    tl.store(grad_k_ptr + kv_offsets, (dk * scale).to(grad_k_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(grad_v_ptr + kv_offsets, dv.to(grad_v_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, offs_m, offs_d, d_mask, lo, hi, lk, diff, qk_scale,
               g, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < lk
        k = _row_tile(k_base, offs_n, n_mask, stride_kt, offs_d, d_mask)
        v = _row_tile(v_base, offs_n, n_mask, stride_kt, offs_d, d_mask)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            allowed = n_mask[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diff)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * g
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k.to(DOT_DTYPE), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_out_ptr,
    lse_ptr,
    delta_ptr,
    gate_ptr,
    grad_q_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_lse,
    groups,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    sample = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + sample)
    lq = tl.load(cu_seqlens_q_ptr + sample + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    k_start = tl.load(cu_seqlens_k_ptr + sample)
    lk = tl.load(cu_seqlens_k_ptr + sample + 1) - k_start
    diff = lk - lq

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < lq
    d_mask = offs_d < HEAD_DIM
    q_base = q_ptr + q_start.to(tl.int64) * stride_qt + head * stride_qh
    do_base = grad_out_ptr + q_start.to(tl.int64) * stride_qt + head * stride_qh
    kv_offset = k_start.to(tl.int64) * stride_kt + (head // groups) * stride_kh
    q = _row_tile(q_base, offs_m, m_mask, stride_qt, offs_d, d_mask)
    do = _row_tile(do_base, offs_m, m_mask, stride_qt, offs_d, d_mask)
    stats = head.to(tl.int64) * stride_lse + q_start + offs_m
    lse = tl.load(lse_ptr + stats, mask=m_mask, other=0.0)
    # -inf only for rows with no allowed key, which only masked blocks reach (there every p is set to 0).
    lse = tl.where(lse == float("-inf"), 0.0, lse) * _LOG2E
    delta = tl.load(delta_ptr + stats, mask=m_mask, other=0.0)
    g = 1.0
    if HAS_GATE:
        g = _tanh(tl.load(gate_ptr + head).to(tl.float32))

    # The forward's key ranges: [0, full) unmasked, [full, hi) masked.
    if CAUSAL:
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, lq) + diff, 0), lk)
        full = tl.minimum(tl.maximum(m0 + diff + 1, 0), lk)
    else:
        hi = lk
        full = lk
    full = (full // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr + kv_offset, v_ptr + kv_offset, stride_kt, offs_m, offs_d, d_mask,
                    0, full, lk, diff, qk_scale, g, False, CAUSAL, DOT_DTYPE, DOT_PRECISION, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr + kv_offset, v_ptr + kv_offset, stride_kt, offs_m, offs_d, d_mask,
                    full, hi, lk, diff, qk_scale, g, True, CAUSAL, DOT_DTYPE, DOT_PRECISION, BLOCK_N)
    offsets = (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    tl.store(grad_q_ptr + offsets, (dq * scale).to(grad_q_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Configurations and launchers.

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_MAX_HEAD_DIM = 128  # the contract's largest; the GPU configs are sized for it


# GPU candidates per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages, operands, BLOCK_D), where operands is
# "16" (fp16 / bf16 on tensor cores), "tf32" (fp32 under torch's "high" matmul precision, tensor cores) or "fp32"
# ("ieee" dots on FMA units), and BLOCK_D "small" (up to 64), "large" (128) or "any". The shapes follow
# FlashAttention-2 and Triton's fused-attention tutorial on Hopper: wide query tiles for the forward and dQ
# (which stream keys), wide key tiles for dK/dV (which stream queries). The ranges come from ptxas for sm_90:
# 16-bit candidates spill no registers (dK/dV at BLOCK_D 128: 0 and 84 bytes; it holds two (BLOCK_N, BLOCK_D)
# fp32 accumulators besides K and V, so it needs 8 warps there); tf32 doubles the shared memory of each stage,
# so 2 stages; FMA dots hold whole operand tiles in registers and spill at any useful tile (0.9 to 2 KB per
# thread for the forward at BLOCK_D 128), and take ptxas 5 to 50 s per config, so fp32 gets two small
# candidates: it is the exact path, not the fast one. Chosen from compiler output, not yet timed on a GPU; the
# autotuner times what is left.
_GPU_CONFIGS = {
    "forward": [
        (64, 64, 4, 3, "16", "any"), (128, 32, 8, 3, "16", "any"), (128, 64, 8, 3, "16", "any"),
        (128, 128, 8, 3, "16", "small"),
        (64, 64, 4, 2, "tf32", "any"), (128, 32, 8, 2, "tf32", "any"),
        (32, 32, 8, 2, "fp32", "any"), (64, 32, 8, 2, "fp32", "any"),
    ],
    "dkdv": [
        (32, 64, 8, 3, "16", "large"), (64, 64, 8, 3, "16", "large"),
        (32, 64, 4, 3, "16", "small"), (32, 128, 8, 3, "16", "small"), (64, 64, 4, 3, "16", "small"),
        (64, 128, 8, 3, "16", "small"),
        (32, 64, 8, 2, "tf32", "any"), (64, 64, 8, 2, "tf32", "any"),
        (16, 32, 8, 2, "fp32", "any"), (32, 32, 8, 2, "fp32", "any"),
    ],
    "dq": [
        (64, 32, 4, 3, "16", "any"), (64, 64, 4, 3, "16", "any"), (128, 32, 8, 3, "16", "any"),
        (128, 64, 8, 3, "16", "any"),
        (64, 32, 4, 2, "tf32", "any"), (128, 32, 8, 2, "tf32", "any"),
        (64, 16, 8, 2, "fp32", "any"), (32, 32, 8, 2, "fp32", "any"),
    ],
}
# The interpreter cannot autotune several configs, and pays per block operation: one small config, whose
# 16-row blocks make the tests' lengths (up to 17) cross block edges.
_INTERPRETER_CONFIG = (16, 16, 4, 1)


def _select(kind: str, configs: list, constexprs: dict) -> list:
    """The candidates of `kind` (configs in _GPU_CONFIGS order) for this launch's operands and BLOCK_D."""
    if constexprs["DOT_DTYPE"] != tl.float32:
        operands = "16"
    else:
        operands = "tf32" if constexprs["DOT_PRECISION"] == "tf32" else "fp32"
    size = "small" if constexprs["BLOCK_D"] <= 64 else "large"
    return [config for config, candidate in zip(configs, _GPU_CONFIGS[kind])
            if candidate[4] == operands and candidate[5] in ("any", size)]


def _autotuned(kind: str):
    if triton_interpreting():
        block_m, block_n, warps, stages = _INTERPRETER_CONFIG
        configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)]
        return triton.autotune(configs=configs, key=["HEAD_DIM"])
    configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
               for block_m, block_n, warps, stages, _, _ in _GPU_CONFIGS[kind]]

    def prune(configs, named_args, **kwargs):
        return _select(kind, configs, kwargs)

    return triton.autotune(configs=configs, key=["HEAD_DIM"], prune_configs_by={"early_config_prune": prune})


_forward_kernel = _autotuned("forward")(_attention_forward_kernel)
_dkdv_kernel = _autotuned("dkdv")(_attention_backward_dkdv_kernel)
_dq_kernel = _autotuned("dq")(_attention_backward_dq_kernel)
_KINDS = {_forward_kernel: "forward", _dkdv_kernel: "dkdv", _dq_kernel: "dq"}


def candidate_configs(kernel, constexprs: dict) -> list:
    """The configs the autotuner may time for a launch with these constexprs (the sm_90 compile test's list)."""
    if len(kernel.configs) == 1:
        return list(kernel.configs)
    return _select(_KINDS[kernel], kernel.configs, constexprs)


def _dot_config(dtype: torch.dtype, device: torch.device):
    # The interpreter (CPU tensors) multiplies 16-bit values as raw bits, so it gets fp32 operands; a GPU (or the
    # compile test's meta tensors) multiplies 16-bit operands on tensor cores; fp32 follows torch's precision.
    if device.type == "cpu":
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return _TL_DTYPE[dtype], "ieee"


def _launch(kernel, grid, args, constexprs, options=None):
    """The one place kernels are launched; the sm_90 compile test swaps it for a compiler call."""
    kernel[grid](*args, **constexprs, **(options or {}))


def _check(q, k, v, residual=None):
    if q.dtype not in _TL_DTYPE:
        raise TypeError(f"q: the Triton cross-modal attention takes float32, float16 or bfloat16, got {q.dtype}")
    for name, x in (("k", k), ("v", v), ("residual", residual)):
        if x is not None and x.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {x.dtype}")
    head_dim = q.shape[-1]
    if not 0 < head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"q: the Triton cross-modal attention takes head dims 1 to {_MAX_HEAD_DIM}, got {head_dim}")


def _samples(cu_seqlens_q) -> int:
    samples = cu_seqlens_q.shape[0] - 1
    if samples > 65535:  # the grid's second dimension
        raise ValueError(f"cu_seqlens_q: the Triton cross-modal attention takes at most 65535 samples, got {samples}")
    return samples


def _head_constexprs(q):
    head_dim = q.shape[-1]
    dot_dtype, dot_precision = _dot_config(q.dtype, q.device)
    # tl.dot needs every block dimension >= 16 and a power of two: 80 and 96 run in 128 with a mask.
    return dict(HEAD_DIM=head_dim, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)))


def cross_modal_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                  gate, residual):
    """(out or None, attn, lse) as csrc/attention.h; out only with a gate or a residual."""
    _check(q, k, v, residual)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    total_q, heads_q, _ = q.shape
    heads_k = k.shape[1]
    samples = _samples(cu_seqlens_q)
    attn = torch.empty_like(q)
    lse = torch.empty(heads_q, total_q, dtype=torch.float32, device=q.device)
    fused = gate is not None or residual is not None
    out = torch.empty_like(q) if fused else None
    if total_q == 0 or samples <= 0 or max_seqlen_q <= 0:
        return out, attn, lse
    if residual is not None:
        residual = residual.contiguous()
    args = (q, k, v, out if fused else attn, attn, lse, q if gate is None else gate,
            q if residual is None else residual, cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), lse.stride(0), heads_q // heads_k, scale * _LOG2E.value)
    constexprs = dict(**_head_constexprs(q), CAUSAL=bool(causal), HAS_GATE=gate is not None,
                      HAS_RESIDUAL=residual is not None)

    def grid(meta):
        return triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), samples, heads_q

    _launch(_forward_kernel, grid, args, constexprs)
    return out, attn, lse


_PREPROCESS_BLOCK_T = 64


def cross_modal_attention_backward(grad_out, q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, causal, scale, gate):
    """(grad_q, grad_k, grad_v, grad_gate or None) as csrc/attention.h."""
    _check(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, attn, lse = grad_out.to(q.dtype).contiguous(), attn.contiguous(), lse.contiguous()
    total_q, heads_q, _ = q.shape
    total_k, heads_k, _ = k.shape
    samples = _samples(cu_seqlens_q)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    head = _head_constexprs(q)

    block_t = 16 if q.device.type == "cpu" else _PREPROCESS_BLOCK_T
    num_blocks = triton.cdiv(total_q, block_t)
    delta = torch.empty(heads_q, total_q, dtype=torch.float32, device=q.device)
    partial = torch.zeros(heads_q, num_blocks, dtype=torch.float32, device=q.device) if gate is not None else None
    if total_q > 0:
        args = (grad_out, attn, delta, q if gate is None else gate, delta if partial is None else partial, total_q,
                q.stride(0), q.stride(1), delta.stride(0), num_blocks)
        _launch(_attention_backward_preprocess_kernel, (num_blocks, heads_q), args,
                dict(HEAD_DIM=head["HEAD_DIM"], HAS_GATE=gate is not None, BLOCK_T=block_t,
                     BLOCK_D=head["BLOCK_D"]), dict(num_warps=4))
    grad_gate = partial.sum(1) if partial is not None else None  # a fixed order: deterministic

    constexprs = dict(**head, CAUSAL=bool(causal), HAS_GATE=gate is not None)
    common = (cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
              heads_q // heads_k, scale * _LOG2E.value, scale)
    gate_arg = q if gate is None else gate
    if samples > 0 and total_k > 0 and max_seqlen_k > 0:

        def dkdv_grid(meta):
            return triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), samples, heads_k

        _launch(_dkdv_kernel, dkdv_grid, (q, k, v, grad_out, lse, delta, gate_arg, grad_k, grad_v, *common),
                constexprs)
    if samples > 0 and total_q > 0 and max_seqlen_q > 0:

        def dq_grid(meta):
            return triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), samples, heads_q

        _launch(_dq_kernel, dq_grid, (q, k, v, grad_out, lse, delta, gate_arg, grad_q, *common), constexprs)
    return grad_q, grad_k, grad_v, grad_gate
