"""Fused linear cross-entropy: the loss of hidden @ weight.T + bias without ever holding the logits.

Rows whose target is ignored are dropped before any matmul. The backends then walk the remaining rows
in chunks (or on-chip tiles), so at most one chunk of logits exists at a time.

For a mean or sum the gradient is known up to one scalar during the forward, so the forward computes
the gradients of hidden, weight and bias right away, while each chunk of logits is at hand, and the
backward only scales them: three matmuls in all, against four for a recomputing backward. With
reduction="none" the forward keeps nothing but its inputs and the backward recomputes the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from . import _checks

_OP = "linear_cross_entropy"
# A chunk's logits take at most this fraction of the weight's size, which keeps peak memory close to
# the weight gradient itself; small heads get at least _MIN_CHUNK_ELEMENTS so their matmuls stay efficient.
_CHUNK_FRACTION = 5
_MIN_CHUNK_ELEMENTS = 1 << 22


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_argmax: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """cross_entropy(hidden @ weight.T + bias, target) without materialising the (N, V) logits.

    hidden (N, H) or (B, T, H); weight (V, H) as in nn.Linear; bias (V,); target (N,) or (B, T) class
    indices. The options mean what they mean in mmfast.ops.cross_entropy (and torch's
    F.linear_cross_entropy): ignore_index, label_smoothing, reduction, plus z_loss and softcap.

    return_lse=True also returns the per-token logsumexp and return_argmax=True the per-token
    prediction (argmax of the logits; -1 where the target is ignored), e.g. for token accuracy:
    `((argmax == target) & (target != ignore_index)).sum()`. Both are shaped like `target`, carry no
    gradient, and come after the loss in that order.

    chunk_size: tokens per chunk for the cpu, cuda and torch backends (default: a chunk of logits
    takes at most a fifth of the weight's size). Triton tiles on chip and ignores it.

    With reduction "mean" or "sum" the gradients are computed during the forward and kept until the
    backward, which may then run only once (a second one raises).
    """
    _check_inputs(hidden, weight, target, bias)
    _checks.loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")

    vocab, hidden_dim = weight.shape
    grad_enabled = torch.is_grad_enabled()
    needs = [grad_enabled and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, lse, argmax, *_ = torch.ops.mmfast.linear_cross_entropy(
        hidden.reshape(-1, hidden_dim).contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        target.reshape(-1).long().contiguous(),
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap or 0.0),
        reduction,
        chunk_size or default_chunk_size(vocab, hidden_dim),
        *needs,
        bool(return_argmax),
        backends.requested_backend(backend),
    )
    loss = loss.to(hidden.dtype)
    if reduction == "none":
        loss = loss.view(target.shape)
    extras = ([lse.view(target.shape)] if return_lse else []) + ([argmax.view(target.shape)] if return_argmax else [])
    return (loss, *extras) if extras else loss


def default_chunk_size(vocab: int, hidden_dim: int) -> int:
    budget = max(vocab * hidden_dim // _CHUNK_FRACTION, _MIN_CHUNK_ELEMENTS)
    return max(8, budget // vocab // 8 * 8)  # whole vectors of tokens for the cpu backend's vocab-major chunks


def _check_inputs(hidden, weight, target, bias) -> None:
    _checks.floating("hidden", hidden)
    _checks.floating("weight", weight)
    _checks.integer("target", target)
    _checks.same_device("weight", weight, "hidden", hidden)
    _checks.same_device("target", target, "hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape (N, H) or (B, T, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape (V, {hidden.shape[-1]}) to match hidden's last dimension, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one class, got V = 0")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected a hidden size of at least 1, got shape {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target: expected shape {tuple(hidden.shape[:-1])} (hidden's shape without H), got {tuple(target.shape)}"
        )
    if bias is not None:
        _checks.tensor("bias", bias)
        _checks.same_device("bias", bias, "hidden", hidden)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) to match weight's V, got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected hidden's dtype {hidden.dtype}, got {bias.dtype}")


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _run(hidden, weight, bias, target, grad_loss, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
         needs, return_argmax, backend):
    """Drop the ignored rows, run the backend on the rest, put the per-row results back in place.

    Returns (loss, lse, argmax, grad_hidden, grad_weight, grad_bias) per row of `hidden`, None where
    not asked for; ignored rows get loss = lse = 0, argmax = -1 and zero gradient rows.
    """
    forward = backends.kernel(_OP, backends.select(_OP, hidden.device, backend), "forward")
    _checks.class_indices("target", target, weight.shape[0], ignore_index)
    rows = (target != ignore_index).nonzero()[:, 0]
    if rows.numel() == target.numel():
        return forward(hidden, weight, bias, target, grad_loss, label_smoothing, z_loss, softcap,
                       chunk_size, *needs, return_argmax)
    stat_dtype = _stat_dtype(hidden)
    loss = hidden.new_zeros(target.shape, dtype=stat_dtype)
    lse = torch.zeros_like(loss)
    argmax = torch.full_like(target, -1) if return_argmax else None
    grads = grad_loss is not None
    grad_hidden = torch.zeros_like(hidden) if grads and needs[0] else None
    if rows.numel() == 0:
        grad_weight = torch.zeros_like(weight) if grads and needs[1] else None
        grad_bias = torch.zeros_like(bias) if grads and needs[2] else None
        return loss, lse, argmax, grad_hidden, grad_weight, grad_bias
    kept = forward(
        hidden.index_select(0, rows), weight, bias, target.index_select(0, rows),
        None if grad_loss is None else grad_loss.index_select(0, rows),
        label_smoothing, z_loss, softcap, chunk_size, *needs, return_argmax,
    )
    for full, part in zip((loss, lse, argmax, grad_hidden), kept):
        if full is not None:
            full.index_copy_(0, rows, part)
    return loss, lse, argmax, grad_hidden, kept[4], kept[5]


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("mmfast::linear_cross_entropy", mutates_args=())
def _forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    return_argmax: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    grad_loss = None
    if reduction != "none" and any(needs):
        # The gradient of the reduced loss up to the scalar the backward will bring.
        grad_loss = (target != ignore_index).to(_stat_dtype(hidden))
        if reduction == "mean":
            grad_loss = grad_loss / grad_loss.sum()
    loss, lse, argmax, *grads = _run(hidden, weight, bias, target, grad_loss, ignore_index, label_smoothing, z_loss,
                                     softcap, chunk_size, needs, return_argmax, backend)
    if reduction != "none":
        loss = loss.sum()
        if reduction == "mean":
            loss = loss / (target != ignore_index).sum()  # nan when every row is ignored, as in torch
    return (loss, lse, _empty_if_none(argmax, target), *(_empty_if_none(g, hidden) for g in grads))


@_forward.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size,
      need_grad_hidden, need_grad_weight, need_grad_bias, return_argmax, backend):
    stat = hidden.new_empty(hidden.shape[0], dtype=_stat_dtype(hidden))
    loss = stat if reduction == "none" else stat.new_empty(())
    grads_now = reduction != "none"
    return (
        loss,
        torch.empty_like(stat),
        target.new_empty(target.shape[0] if return_argmax else 0),
        torch.empty_like(hidden) if grads_now and need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grads_now and need_grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if grads_now and need_grad_bias and bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("mmfast::linear_cross_entropy_backward", mutates_args=())
def _backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    needs = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    *_, grad_hidden, grad_weight, grad_bias = _run(hidden, weight, bias, target, grad_loss, ignore_index,
                                                   label_smoothing, z_loss, softcap, chunk_size, needs, False, backend)
    return tuple(_empty_if_none(g, hidden) for g in (grad_hidden, grad_weight, grad_bias))


@_backward.register_fake
def _(hidden, weight, bias, target, grad_loss, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      need_grad_hidden, need_grad_weight, need_grad_bias, backend):
    return (
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if need_grad_bias and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size, *_, backend = inputs
    loss, lse, argmax, *grads = output
    ctx.mark_non_differentiable(lse, argmax, *grads)
    ctx.set_materialize_grads(False)  # else autograd makes zero "gradients" for the gradient outputs: one more of each
    ctx.reduction = reduction
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
        ctx.backend = backend
    else:
        # Not save_for_backward: the backward hands these over as the gradients themselves, and a saved
        # reference would make autograd copy each one (the weight gradient is the op's largest buffer).
        ctx.grads = grads


def _autograd_backward(ctx, grad_loss, *_):
    if grad_loss is None:  # only a non-differentiable output was used
        return (None,) * 15
    needs = ctx.needs_input_grad[:3]
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        grads = torch.ops.mmfast.linear_cross_entropy_backward(
            hidden, weight, bias, target, grad_loss.to(_stat_dtype(hidden)).contiguous(), *ctx.options, *needs,
            ctx.backend,
        )
    else:
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "linear_cross_entropy: the gradients computed during the forward were already handed to an "
                "earlier backward; with reduction 'mean' or 'sum' the graph can be backpropagated once "
                "(reduction='none' recomputes and allows more)"
            )
        del ctx.grads
        grads = [g.mul_(grad_loss) if need else None for g, need in zip(grads, needs)]
    return (*(g if need else None for g, need in zip(grads, needs)), *([None] * 12))


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
