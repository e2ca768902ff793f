"""Fused cross-modal attention: text queries over image or audio keys, ragged per sample, forward and backward.

Two layouts, one kernel contract (csrc/attention.h):
  padded, as torch SDPA: q (B, Hq, Nq, D), k/v (B, Hk, Nk, D), an optional boolean key_padding_mask (B, Nk);
  packed varlen, as flash_attn_varlen: q (Tq, Hq, D), k/v (Tk, Hk, D), int32 cu_seqlens_q / cu_seqlens_k (B + 1,).
The padded form is packed before the kernels run (the masked keys are dropped, so no work is spent on them)
and unpacked after; the kernels only ever see real rows and real keys.

Optionally fused: out = residual + tanh(gate) * attention (Flamingo / Idefics / Mllama gated cross-attention),
gate a scalar or one per query head, learnable. Rows with no key to attend (a sample without media, or
above the causal diagonal) get exactly the residual (zero attention) and zero gradients.

Saved for the backward: the attention output and the per-row logsumexp (float32); the softmax is recomputed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from . import _checks

_OP = "cross_modal_attention"


def cross_modal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    gate: Tensor | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """softmax(scale * q @ k.T) @ v per sample and head, optionally gated: residual + tanh(gate) * attention.

    Padded layout (no cu_seqlens): q (B, Hq, Nq, D), k and v (B, Hk, Nk, D); key_padding_mask (B, Nk) is True
    for the keys to attend. Varlen layout: q (Tq, Hq, D), k and v (Tk, Hk, D), cu_seqlens_q / cu_seqlens_k
    int32 (B + 1,) offsets of each sample's rows; max_seqlen_* are optional hints (computed when None).
    Hq must be a multiple of Hk (grouped-query attention). causal=True masks keys j > i + lk - lq (aligned
    bottom-right, so that the same op serves self-attention). scale defaults to D ** -0.5. gate: a scalar
    tensor or one value per query head; residual: q's shape. Returns a tensor of q's shape and dtype.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    _checks.floating("q", q)
    for name, value in (("k", k), ("v", v)):
        _checks.floating(name, value)
        _checks.same_device(name, value, "q", q)
    _check_layout(q, k, v, varlen)
    heads_q, heads_k, head_dim = q.shape[-2 if varlen else 1], k.shape[-2 if varlen else 1], q.shape[-1]
    if head_dim == 0:
        raise ValueError(f"q: expected a head dim of at least 1, got shape {tuple(q.shape)}")
    if heads_k == 0:
        raise ValueError(f"k: expected at least one head, got shape {tuple(k.shape)}")
    if heads_q % heads_k:
        raise ValueError(f"q: expected a number of heads divisible by k's {heads_k} (grouped-query attention), "
                         f"got {heads_q}")
    if scale is None:
        scale = head_dim ** -0.5
    _checks.in_range("scale", scale, 0.0, math.inf, high_inclusive=False)
    if scale == 0:
        raise ValueError("scale: expected a positive number, got 0")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")

    autocast = torch.is_autocast_enabled(q.device.type)
    dtype = torch.get_autocast_dtype(q.device.type) if autocast else q.dtype
    if not autocast:
        for name, value in (("k", k), ("v", v), ("residual", residual)):
            if value is not None and value.dtype != q.dtype:
                raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {value.dtype}")
    if residual is not None:
        _checks.floating("residual", residual)
        _checks.same_device("residual", residual, "q", q)
        if residual.shape != q.shape:
            raise ValueError(f"residual: expected q's shape {tuple(q.shape)}, got {tuple(residual.shape)}")
        residual = residual.to(dtype)
    if gate is not None:
        gate = _per_head_gate(gate, q, heads_q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    if varlen:
        _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, key_padding_mask, q)
        max_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
        max_k = _max_seqlen("max_seqlen_k", max_seqlen_k)
        out, attn, _ = torch.ops.mmfast.cross_modal_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q, cu_seqlens_k, None, gate,
            None if residual is None else residual.contiguous(), max_q, max_k, causal, float(scale),
            backends.requested_backend(backend))
        return attn if gate is None and residual is None else out

    batch, _, len_q, _ = q.shape
    len_k = k.shape[2]
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, q, batch, len_k)
    # Rows become (sample, position); a copy, linear in the tensors' size (the attention is quadratic).
    packed = [t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (q, k, v)]
    if residual is not None:
        residual = residual.transpose(1, 2).reshape(-1, heads_q, head_dim)
    offsets = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    out, attn, _ = torch.ops.mmfast.cross_modal_attention(
        *packed, offsets * len_q, offsets * len_k, key_padding_mask, gate, residual, len_q, len_k, causal,
        float(scale), backends.requested_backend(backend))
    result = attn if gate is None and residual is None else out
    return result.view(batch, len_q, heads_q, head_dim).transpose(1, 2)


def _check_layout(q: Tensor, k: Tensor, v: Tensor, varlen: bool) -> None:
    dims, shape = (3, "(T, H, D)") if varlen else (4, "(B, H, N, D)")
    for name, value in (("q", q), ("k", k), ("v", v)):
        if value.dim() != dims:
            layout = "with cu_seqlens (varlen)" if varlen else "without cu_seqlens (padded)"
            raise ValueError(f"{name}: expected shape {shape} {layout}, got {tuple(value.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected q's head dim {q.shape[-1]}, got {k.shape[-1]}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected q's batch size {q.shape[0]}, got {k.shape[0]}")


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, key_padding_mask, q) -> None:
    """Static checks; the values (start at 0, non-decreasing, end at the total) are checked where the op runs."""
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask: the varlen layout takes lengths from cu_seqlens_k; expected None")
    for name, value in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if value is None:
            raise ValueError(f"{name}: the varlen layout needs both cu_seqlens_q and cu_seqlens_k, got None")
        _checks.tensor(name, value)
        if value.dtype != torch.int32:
            raise TypeError(f"{name}: expected int32 offsets, got {value.dtype}")
        _checks.same_device(name, value, "q", q)
        if value.dim() != 1 or value.numel() < 1:
            raise ValueError(f"{name}: expected shape (batch + 1,), got {tuple(value.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_k: expected cu_seqlens_q's length {cu_seqlens_q.numel()} (one sample each), "
                         f"got {cu_seqlens_k.numel()}")


def _max_seqlen(name: str, value) -> int:
    if value is None:
        return -1
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int or None, got {value!r}")
    return value


def _check_key_padding_mask(mask, q: Tensor, batch: int, len_k: int) -> None:
    _checks.tensor("key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected a bool tensor (True = attend), got {mask.dtype}")
    _checks.same_device("key_padding_mask", mask, "q", q)
    if tuple(mask.shape) != (batch, len_k):
        raise ValueError(f"key_padding_mask: expected shape ({batch}, {len_k}) (batch, keys), got {tuple(mask.shape)}")


def _per_head_gate(gate, q: Tensor, heads: int) -> Tensor:
    """The gate as (heads,) in the kernels' statistics dtype: a scalar is shared by every head (autograd sums its
    gradient back)."""
    _checks.floating("gate", gate)
    _checks.same_device("gate", gate, "q", q)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if gate.numel() == 1 and gate.dim() <= 1:
        return gate.to(dtype).reshape(1).expand(heads).contiguous()
    if tuple(gate.shape) != (heads,):
        raise ValueError(f"gate: expected a scalar or shape ({heads},) (one per query head), got {tuple(gate.shape)}")
    return gate.to(dtype)


def _longest(name: str, offsets: Tensor, total: int, hint: int) -> int:
    """The longest sample of `offsets` after checking them (data-dependent, so checked where the op runs)."""
    values = offsets.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}: expected offsets starting at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name}: expected non-decreasing offsets, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}: expected offsets ending at the number of rows {total}, got {values[-1]}")
    longest = max((b - a for a, b in zip(values, values[1:])), default=0)
    if 0 <= hint < longest:
        raise ValueError(f"max_seqlen_{name[-1]}: expected at least the longest sample's {longest}, got {hint}")
    return longest


def _pack_keys(k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The attended keys and values of a padded batch, their offsets and their rows in the padded batch."""
    rows = mask.reshape(-1).nonzero().squeeze(1)
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    offsets[1:] = mask.sum(1).cumsum(0)
    return k.index_select(0, rows), v.index_select(0, rows), offsets, rows


@torch.library.custom_op("mmfast::cross_modal_attention", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    key_padding_mask: Tensor | None,
    gate: Tensor | None,
    residual: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, attn, lse), all packed; out is empty when there is neither gate nor residual.

    With key_padding_mask, k and v hold every padded key (B * Nk rows) and are packed here."""
    forward = backends.kernel(_OP, backends.select(_OP, q.device, backend), "forward")
    if key_padding_mask is not None:
        k, v, cu_seqlens_k, _ = _pack_keys(k, v, key_padding_mask)
    max_seqlen_q = _longest("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    max_seqlen_k = _longest("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    with torch.autocast(q.device.type, enabled=False):
        out, attn, lse = forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                 gate, residual)
    return (q.new_empty(0) if out is None else out), attn, lse


@_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, gate, residual, max_seqlen_q, max_seqlen_k, causal,
      scale, backend):
    out = q.new_empty(0) if gate is None and residual is None else torch.empty_like(q)
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=stats)


@torch.library.custom_op("mmfast::cross_modal_attention_backward", mutates_args=())
def _backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    key_padding_mask: Tensor | None,
    gate: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v, grad_gate); grad_gate is empty without a gate. Masked keys get zero gradients."""
    backward = backends.kernel(_OP, backends.select(_OP, q.device, backend), "backward")
    padded_k = k
    if key_padding_mask is not None:
        k, v, cu_seqlens_k, rows = _pack_keys(k, v, key_padding_mask)
    max_seqlen_q = _longest("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    max_seqlen_k = _longest("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    with torch.autocast(q.device.type, enabled=False):
        grad_q, grad_k, grad_v, grad_gate = backward(grad.contiguous(), q, k, v, attn, lse, cu_seqlens_q,
                                                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, gate)
    if key_padding_mask is not None:
        grad_k = torch.zeros_like(padded_k).index_copy_(0, rows, grad_k)
        grad_v = torch.zeros_like(padded_k).index_copy_(0, rows, grad_v)
    return grad_q, grad_k, grad_v, (q.new_empty(0) if grad_gate is None else grad_gate)


@_backward.register_fake
def _(grad, q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, gate, max_seqlen_q, max_seqlen_k,
      causal, scale, backend):
    grad_gate = q.new_empty(0) if gate is None else torch.empty_like(gate)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_gate


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, gate, residual, max_seqlen_q, max_seqlen_k, causal,
     scale, backend) = inputs
    _, attn, lse = output
    ctx.save_for_backward(q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, gate)
    ctx.fused = gate is not None or residual is not None
    ctx.has_residual = residual is not None
    ctx.options = (max_seqlen_q, max_seqlen_k, causal, scale, backend)


def _autograd_backward(ctx, grad_out, grad_attn, grad_lse):
    q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, gate = ctx.saved_tensors
    grad = grad_out if ctx.fused else grad_attn  # the one output the caller sees
    if grad is None:
        grad = torch.zeros_like(q)
    grad_q, grad_k, grad_v, grad_gate = torch.ops.mmfast.cross_modal_attention_backward(
        grad, q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, gate, *ctx.options)
    return (grad_q, grad_k, grad_v, None, None, None, grad_gate if gate is not None else None,
            grad if ctx.has_residual else None, None, None, None, None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
