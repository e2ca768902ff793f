"""Fused cross-entropy on logits: validate → dispatch to a backend → save only the logsumexp.

The forward keeps one float per row (logsumexp); the backward recomputes softmax from it and writes
the gradient straight into a fresh buffer, or into the logits themselves with inplace_backward=True.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from . import _checks

_OP = "cross_entropy"


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy of `logits` (..., V) against class indices `target` (...).

    Matches torch.nn.functional.cross_entropy with class-index targets (ignored rows, mean over the
    rows not ignored, label smoothing; for 3-D input the classes are the last dimension), and adds
    `z_loss` · logsumexp² per row (PaLM) and `softcap` · tanh(logits / softcap) applied first (Gemma 2).

    inplace_backward=True writes the gradient into `logits` during backward: use it when nothing
    else needs the logits afterwards, as in a language-model head. It also means the graph can be
    backpropagated only once.

    Token-contiguous logits (unit stride over the rows: the transpose of a (V, N) buffer, as a
    vocab-major matmul writes them) are read in place by the cpu backend and copied for the others;
    the gradient comes back in the logits' layout.
    """
    _checks.floating("logits", logits)
    _checks.integer("target", target)
    _checks.same_device("target", target, "logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits: expected shape (N, V) or (B, T, V), got {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target: expected shape {tuple(logits.shape[:-1])} (logits' shape without V), got {tuple(target.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits: expected at least one class, got V = 0")
    _checks.loss_options(ignore_index, reduction, label_smoothing, z_loss, softcap)

    vocab = logits.shape[-1]
    loss, _ = torch.ops.mmfast.cross_entropy(
        logits.reshape(-1, vocab),
        target.reshape(-1).long().contiguous(),
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap or 0.0),
        bool(inplace_backward),
        backends.requested_backend(backend),
    )
    if reduction == "none":
        return loss.view(target.shape).to(logits.dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / (target != ignore_index).sum()  # nan when every row is ignored, as in torch
    return total.to(logits.dtype)


def _readable(backend: str, logits: Tensor) -> Tensor:
    """`logits` (N, V) in a layout `backend` reads, copied only when it does not read theirs.

    Every backend reads rows with unit stride over V. The cpu one also reads token-contiguous logits
    (unit stride over N, vocab rows at least N apart), as a vocab-major matmul writes them; the torch
    one reads any strides.
    """
    if backend == "torch" or logits.stride(1) == 1:
        return logits
    if backend == "cpu" and logits.stride(0) == 1 and logits.stride(1) >= logits.shape[0]:
        return logits
    return logits.contiguous()


@torch.library.custom_op("mmfast::cross_entropy", mutates_args=())
def _forward(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    name = backends.select(_OP, logits.device, backend)
    _checks.class_indices("target", target, logits.shape[1], ignore_index)
    forward = backends.kernel(_OP, name, "forward")
    return forward(_readable(name, logits), target, ignore_index, label_smoothing, z_loss, softcap)


@_forward.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss, softcap, inplace_backward, backend):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(logits.shape[0], dtype=dtype), logits.new_empty(logits.shape[0], dtype=dtype)


def _run_backward(logits, target, lse, grad_loss, grad_logits, ignore_index, label_smoothing, z_loss, softcap, backend):
    """grad_logits has logits' layout (it is logits, or empty_like it), so a backend reads both or neither."""
    name = backends.select(_OP, logits.device, backend)
    backward = backends.kernel(_OP, name, "backward")
    options = (ignore_index, label_smoothing, z_loss, softcap)
    rows = _readable(name, logits)
    if rows is logits:
        backward(logits, target, lse, grad_loss, grad_logits, *options)
        return
    backward(rows, target, lse, grad_loss, rows, *options)
    grad_logits.copy_(rows)


@torch.library.custom_op("mmfast::cross_entropy_backward", mutates_args=())
def _backward(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> Tensor:
    grad_logits = torch.empty_like(logits)
    _run_backward(logits, target, lse, grad_loss, grad_logits, ignore_index, label_smoothing, z_loss, softcap, backend)
    return grad_logits


@_backward.register_fake
def _(logits, target, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("mmfast::cross_entropy_backward_", mutates_args=("logits",))
def _backward_inplace(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> None:
    _run_backward(logits, target, lse, grad_loss, logits, ignore_index, label_smoothing, z_loss, softcap, backend)


@_backward_inplace.register_fake
def _(logits, target, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, z_loss, softcap, inplace_backward, backend = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, backend)
    ctx.inplace_backward = inplace_backward


def _autograd_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad_loss = grad_loss.to(lse.dtype).contiguous()
    if ctx.inplace_backward:
        torch.ops.mmfast.cross_entropy_backward_(logits, target, lse, grad_loss, *ctx.options)
        grad_logits = logits
    else:
        grad_logits = torch.ops.mmfast.cross_entropy_backward(logits, target, lse, grad_loss, *ctx.options)
    return grad_logits, None, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
