"""Triton kernels for the fused LoRA linear (contract: csrc/lora.h).

Two kernels do all the work, each launched with strides so that one body serves several products:

- `_skinny_kernel`: C (P, R) = scale * op(A) (P, Q) @ B (Q, R) for a small R (the rank). One program per
  (BLOCK_P rows, BLOCK_R ranks; one rank block for r <= 128 on a GPU) walks all of Q, so every element of
  A is read once and the sum needs no atomics. It gives xa = dropout(x) @ lora_A.T and gxa = scaling *
  grad_out @ lora_B, and, reading a transposed operand, grad_B = scaling * grad_out.T @ xa (with grad_bias
  as the row sums of the same tiles) and grad_A.T = dropout(x).T @ gxa.
- `_lora_gemm_kernel`: a tiled GEMM C (M, N) = A @ B whose epilogue adds the low-rank term
  (U (M, R) @ V (R, N)) * lora_scale, optionally masked by the dropout keep mask, the bias, and what C
  already holds. It gives out = x @ W.T + bias + scaling * xa @ lora_B.T, grad_x = grad_out @ W +
  (gxa @ lora_A) * keep / (1 - p) (added into a given buffer), and, without an epilogue, the weight
  gradient grad_out.T @ x (a Triton GEMM too; it runs only for a trainable weight, not the usual frozen one).

Dropout: keep[i, j] = rand(seed, i * K + j) >= p. The int64 offset goes to Triton's Philox as two 32-bit
counter words, which is what `tl.rand(seed, offset)` does with int64 offsets in Triton 3.9 (a test checks that
the masks agree); calling Philox directly keeps the mask the same on Triton versions whose `tl.rand` switches
to 64-bit Philox for int64 offsets, and the high word keeps it from repeating past 2^32 elements. The offset
of element (i, j) is its linear index in x, so a kernel reading x or x.T redraws it from the address it
loads, and the grad_x epilogue from the address it stores: dropout(x) never reaches memory, and neither does
the mask (the forward returns an empty uint8 tensor; the backward redraws the mask from the seed).

Everything accumulates in fp32 (float64 is refused); each tensor is stored once, in its input's dtype,
except gxa, an (N, r) fp32 scratch. All products are deterministic: no atomics, no split reductions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keep(seed, offsets, dropout_p):
    # offsets are int64; their high word is the second Philox counter, so offsets past 2^32 do not wrap.
    lo = offsets.to(tl.uint32)
    hi = (offsets >> 32).to(tl.uint32)
    zero = lo * 0
    bits, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _skinny_kernel(
    a_ptr,
    stride_ap,
    stride_aq,
    b_ptr,
    stride_bq,
    stride_br,
    c_ptr,
    stride_cp,
    stride_cr,
    sum_ptr,
    P,
    Q,
    R,
    scale,
    seed,
    dropout_p,
    DROPOUT: tl.constexpr,
    PRODUCT: tl.constexpr,
    ROW_SUM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # DROPOUT: A's memory offset is x's linear index (A is x or x.T), which is the keep mask's Philox offset.
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    rs = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    p_mask = ps < P
    r_mask = rs < R
    acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, Q, BLOCK_Q):
        qs = start + tl.arange(0, BLOCK_Q).to(tl.int64)
        q_mask = qs < Q
        offsets = ps[:, None] * stride_ap + qs[None, :] * stride_aq
        a = tl.load(a_ptr + offsets, mask=p_mask[:, None] & q_mask[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            a = tl.where(_keep(seed, offsets, dropout_p), a, 0.0)
        if ROW_SUM:
            row_sum += tl.sum(a, axis=1)
        if PRODUCT:
            b = tl.load(b_ptr + qs[:, None] * stride_bq + rs[None, :] * stride_br,
                        mask=q_mask[:, None] & r_mask[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    if PRODUCT:
        acc *= scale
        tl.store(c_ptr + ps[:, None] * stride_cp + rs[None, :] * stride_cr, acc.to(c_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & r_mask[None, :])
    if ROW_SUM:
        # Every rank block sums the same rows; the first stores them.
        if tl.program_id(1) == 0:
            tl.store(sum_ptr + ps, row_sum.to(sum_ptr.dtype.element_ty), mask=p_mask)


@triton.jit
def _lora_gemm_kernel(
    a_ptr,
    stride_am,
    stride_ak,
    b_ptr,
    stride_bk,
    stride_bn,
    c_ptr,
    stride_cm,
    stride_cn,
    bias_ptr,
    u_ptr,
    stride_um,
    stride_ur,
    v_ptr,
    stride_vr,
    stride_vn,
    M,
    N,
    K,
    R,
    lora_scale,
    seed,
    dropout_p,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # DROPOUT: C is (N_rows, K_in) like x, so its element (m, n) has the keep mask's offset m * N + n.
    # GROUP_M row tiles share each column tile consecutively, so B tiles are reused from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    if HAS_LORA:
        low = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, R, BLOCK_R):
            rs = start + tl.arange(0, BLOCK_R).to(tl.int64)
            r_mask = rs < R
            u = tl.load(u_ptr + rows[:, None] * stride_um + rs[None, :] * stride_ur,
                        mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            v = tl.load(v_ptr + rs[:, None] * stride_vr + cols[None, :] * stride_vn,
                        mask=r_mask[:, None] & col_mask[None, :], other=0.0)
            low = tl.dot(u.to(DOT_DTYPE), v.to(DOT_DTYPE), low, input_precision=DOT_PRECISION)
        low *= lora_scale
        if DROPOUT:
            low = tl.where(_keep(seed, rows[:, None] * N + cols[None, :], dropout_p), low, 0.0)
        acc += low
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    c_mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _mask_kernel(keep_ptr, total, seed, dropout_p, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(keep_ptr + offsets, _keep(seed, offsets, dropout_p).to(tl.uint8), mask=offsets < total)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _interpreting(device: torch.device) -> bool:
    # CPU tensors reach Triton only under TRITON_INTERPRET=1; anything else (CUDA, or the meta tensors of the
    # compile test) gets the GPU configuration.
    return device.type == "cpu"


def _dot_config(dtype: torch.dtype, device: torch.device):
    # The interpreter multiplies bf16 as raw bits, so it gets fp32 operands; a GPU multiplies 16-bit operands on
    # tensor cores (rounding U and gxa to the input dtype, as torch does); fp32 follows torch's matmul precision.
    if _interpreting(device):
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return _TL_DTYPE[dtype], "ieee"


def _launch(kernel, grid, args, constexprs, options):
    """The one place kernels are launched; the sm_90 compile test swaps it for a compiler call."""
    kernel[grid](*args, **constexprs, **options)


def _fit(size: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16 and a power of two.
    return min(cap, max(16, triton.next_power_of_2(size)))


# On a GPU: 128 x 128 output tiles at 8 warps, the usual Hopper choice, with BLOCK_K 64 for 16-bit operands (3
# stages of 128 x 64 + 64 x 128 tiles: 96 KiB of shared memory) and 32 for fp32. Two cases take 128 x 64 tiles,
# the largest at which ptxas reports no register spills for sm_90: the dropout epilogue (Philox state for every
# element of the tile beside both accumulators) and fp32 "ieee" dots, which run on FMA units, not tensor cores.
# Chosen from compiler output, not yet timed on a GPU.
_GPU_GEMM_RANK = 64  # the epilogue's BLOCK_R: the low-rank tiles are walked in slices of this many ranks
_GPU_SKINNY_RANK = 128  # above this the skinny kernel splits the rank over programs (redrawing the mask)
# The interpreter pays per block operation; 16-wide blocks make the tests' odd shapes cross several tiles.
_INTERPRETER_BLOCK = 16


def _gemm_blocks(m: int, n: int, k: int, r: int, dtype: torch.dtype, device: torch.device, dropout: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, num_warps, num_stages): one deterministic config."""
    if _interpreting(device):
        b = _INTERPRETER_BLOCK
        return _fit(m, b), _fit(n, b), _fit(k, b), _fit(r, b), 4, 4, 1
    fma = _dot_config(dtype, device) == (tl.float32, "ieee")
    block_n = 64 if dropout or fma else 128
    block_k = 32 if dtype == torch.float32 else 64
    return _fit(m, 128), _fit(n, block_n), _fit(k, block_k), _fit(r, _GPU_GEMM_RANK), 8, 8, 3


def _skinny_blocks(p: int, q: int, r: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_P, BLOCK_Q, BLOCK_R, num_warps, num_stages): one deterministic config."""
    if _interpreting(device):
        b = _INTERPRETER_BLOCK
        return _fit(p, b), _fit(q, b), _fit(r, b), 4, 1
    block_r = _fit(r, _GPU_SKINNY_RANK)
    # These passes are bound by reading A once; narrower row blocks when the rows alone give fewer
    # programs than ~2 per SM of an H100, as each program walks the whole of Q.
    block_p = 64 if p >= 64 * 264 else 32
    block_q = 32 if dtype == torch.float32 else 64
    return _fit(p, block_p), _fit(q, block_q), block_r, 4, 3


def _skinny(a, a_strides, b, b_strides, c, c_strides, P, Q, R, scale, dtype, *, row_sum=None, seed=0,
            dropout_p=0.0):
    """c (P, R) = scale * [dropout](a) @ b, and row_sum (P,) = rows of [dropout](a) summed; c may be None."""
    device = a.device
    block_p, block_q, block_r, warps, stages = _skinny_blocks(P, Q, R, dtype, device)
    grid = (triton.cdiv(P, block_p), triton.cdiv(R, block_r) if c is not None else 1)
    if grid[0] * grid[1] == 0:
        return
    dot_dtype, dot_precision = _dot_config(dtype, device)
    unused = a  # pointers of disabled features still need a tensor
    args = (a, *a_strides, unused if b is None else b, *b_strides, unused if c is None else c, *c_strides,
            unused if row_sum is None else row_sum, P, Q, R, scale, seed, dropout_p)
    constexprs = dict(DROPOUT=dropout_p > 0, PRODUCT=c is not None, ROW_SUM=row_sum is not None,
                      DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, BLOCK_P=block_p, BLOCK_Q=block_q,
                      BLOCK_R=block_r)
    _launch(_skinny_kernel, grid, args, constexprs, dict(num_warps=warps, num_stages=stages))


def _gemm(a, a_strides, b, b_strides, c, c_strides, M, N, K, dtype, *, bias=None, u=None, u_strides=(0, 0), v=None,
          v_strides=(0, 0), R=0, lora_scale=1.0, seed=0, dropout_p=0.0, accumulate=False):
    """c (M, N) = a @ b [+ (u @ v) * lora_scale * keep] [+ bias] [+ c]."""
    device = a.device
    block_m, block_n, block_k, block_r, group_m, warps, stages = _gemm_blocks(M, N, K, R, dtype, device,
                                                                              u is not None and dropout_p > 0)
    programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if programs == 0:
        return
    dot_dtype, dot_precision = _dot_config(dtype, device)
    unused = a
    args = (a, *a_strides, b, *b_strides, c, *c_strides, unused if bias is None else bias,
            unused if u is None else u, *u_strides, unused if v is None else v, *v_strides, M, N, K, R, lora_scale,
            seed, dropout_p)
    constexprs = dict(HAS_BIAS=bias is not None, HAS_LORA=u is not None, DROPOUT=dropout_p > 0,
                      ACCUMULATE=accumulate, DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=group_m)
    _launch(_lora_gemm_kernel, (programs,), args, constexprs, dict(num_warps=warps, num_stages=stages))


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"x: the Triton LoRA linear takes float32, float16 or bfloat16, got {x.dtype}")


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    _check_dtype(x)
    rows, features = x.shape
    out_features, rank = weight.shape[0], lora_A.shape[0]
    dtype = x.dtype
    xa = x.new_empty(rows, rank)
    out = x.new_empty(rows, out_features)
    # xa = dropout(x) @ lora_A.T: lora_A read as its transpose (features, rank).
    _skinny(x, (features, 1), lora_A, (1, features), xa, (rank, 1), rows, features, rank,
            1.0 / (1.0 - dropout_p), dtype, seed=seed, dropout_p=dropout_p)
    # out = x @ weight.T + scaling * xa @ lora_B.T + bias: weight and lora_B read as their transposes.
    _gemm(x, (features, 1), weight, (1, features), out, (out_features, 1), rows, out_features, features, dtype,
          bias=bias, u=xa, u_strides=(rank, 1), v=lora_B, v_strides=(1, rank), R=rank, lora_scale=scaling)
    return out, xa, x.new_empty(0, dtype=torch.uint8)


def lora_linear_backward(grad_out, x, weight, lora_A, lora_B, scaling, xa, mask, dropout_p, seed, grad_x,
                         need_grad_x, need_grad_weight, need_grad_bias, need_grad_A, need_grad_B):
    """`mask` is ignored: this backend redraws the keep mask from the seed."""
    _check_dtype(x)
    rows, features = x.shape
    out_features, rank = weight.shape[0], lora_A.shape[0]
    dtype = x.dtype
    inv_keep = 1.0 / (1.0 - dropout_p)

    gxa = None
    if need_grad_x or need_grad_A:
        # fp32 scratch: (N, r) is small, and both of its readers round it to their own dot dtype.
        gxa = torch.empty(rows, rank, dtype=torch.float32, device=x.device)
        _skinny(grad_out, (out_features, 1), lora_B, (rank, 1), gxa, (rank, 1), rows, out_features, rank,
                scaling, dtype)

    if need_grad_x:
        accumulate = grad_x is not None
        if not accumulate:
            grad_x = torch.empty_like(x)
        _gemm(grad_out, (out_features, 1), weight, (features, 1), grad_x, grad_x.stride(), rows, features,
              out_features, dtype, u=gxa, u_strides=(rank, 1), v=lora_A, v_strides=(features, 1), R=rank,
              lora_scale=inv_keep, seed=seed, dropout_p=dropout_p, accumulate=accumulate)
    else:
        grad_x = None

    grad_weight = None
    if need_grad_weight:
        # grad_out.T @ x: grad_out read as its transpose (out_features, rows).
        grad_weight = torch.empty_like(weight)
        _gemm(grad_out, (1, out_features), x, (features, 1), grad_weight, (features, 1), out_features, features,
              rows, dtype)

    grad_bias = x.new_empty(out_features) if need_grad_bias else None
    grad_B = torch.empty_like(lora_B) if need_grad_B else None
    if grad_B is not None or grad_bias is not None:
        # One pass over grad_out.T gives scaling * grad_out.T @ xa and, as its row sums, grad_bias.
        _skinny(grad_out, (1, out_features), xa, (rank, 1), grad_B, (rank, 1), out_features, rows, rank, scaling,
                dtype, row_sum=grad_bias)

    grad_A = None
    if need_grad_A:
        # grad_A.T (features, r) = dropout(x).T @ gxa: x read as its transpose, grad_A written as one.
        grad_A = torch.empty_like(lora_A)
        _skinny(x, (1, features), gxa, (rank, 1), grad_A, (1, features), features, rows, rank, inv_keep, dtype,
                seed=seed, dropout_p=dropout_p)
    return grad_x, grad_weight, grad_bias, grad_A, grad_B


_MASK_BLOCK = 1024


def lora_linear_mask(seed, rows, cols, dropout_p, device):
    """keep (rows, cols), bool: exactly the mask the kernels draw for an x of `cols` features."""
    device = torch.device(device)
    if dropout_p == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    keep = torch.empty(rows, cols, dtype=torch.uint8, device=device)
    total = rows * cols
    if total > 0:
        _launch(_mask_kernel, (triton.cdiv(total, _MASK_BLOCK),), (keep, total, seed, dropout_p),
                dict(BLOCK=_MASK_BLOCK), dict(num_warps=4))
    return keep.view(torch.bool)
