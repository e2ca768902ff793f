"""Fused LoRA linear: x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T in one op, forward and backward.

What is saved for the backward: x (once, however many projections read it), the small (N, r) product
xa = dropout(x) @ A.T per projection, and the dropout mask as the backend keeps it: a seed (triton,
cuda, torch) or a bit-packed mask (cpu). dropout(x) is never kept. Gradients are computed only for
the tensors that require them; a frozen base weight, the usual case, costs no weight gradient.

Several projections of one input (q, k and v of the same hidden states) go through one call of
lora_linear_multi: x is saved once and their input gradients are summed into one buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from . import _checks

_OP = "lora_linear"

Projection = tuple  # (weight, bias | None, lora_A, lora_B, scaling)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str | None = None,
) -> Tensor:
    """x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T.

    x (..., in); weight (out, in) and bias (out,) as in nn.Linear; lora_A (r, in) and lora_B (out, r)
    as PEFT holds them. Dropout (probability dropout_p, applied only when training) touches the
    low-rank branch only, as in PEFT. Under torch.autocast the inputs are cast to its dtype.
    """
    return lora_linear_multi(x, [(weight, bias, lora_A, lora_B, scaling)], dropout_p=dropout_p,
                             training=training, backend=backend)[0]


def lora_linear_multi(
    x: Tensor,
    projections: list[Projection] | tuple[Projection, ...],
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str | None = None,
) -> list[Tensor]:
    """lora_linear of one input through several (weight, bias, lora_A, lora_B, scaling) projections.

    Each projection draws its own dropout mask, as separate PEFT layers do. x is saved once for all of
    them, and the gradient of x is accumulated in one buffer. Projections of different inputs (queries
    from text, keys and values from image features) are separate calls, one per input.
    """
    _checks.floating("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape (..., in), got {tuple(x.shape)}")
    if not isinstance(projections, (list, tuple)) or not projections:
        raise ValueError("projections: expected a non-empty list of (weight, bias, lora_A, lora_B, scaling)")
    _checks.in_range("dropout_p", dropout_p, 0.0, 1.0, high_inclusive=False)
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    flat = []
    for index, projection in enumerate(projections):
        flat.extend(_check_projection(index, x, projection, dtype, autocast))
    x = x.to(dtype)
    scalings = [float(p[4]) for p in projections]

    dropout_p = float(dropout_p) if training else 0.0
    seed = draw_seed() if dropout_p > 0 else 0
    request = backends.requested_backend(backend)
    outputs = _LoRALinear.apply(x.reshape(-1, x.shape[-1]), scalings, dropout_p, seed, request, *flat)
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outputs]


def draw_seed() -> int:
    """The dropout seed of one call; projection i of the call uses seed + i. Drawn from torch's CPU
    generator, so torch.manual_seed reproduces the masks."""
    return int(torch.randint(0, 1 << 62, ()))


def _check_projection(index: int, x: Tensor, projection, dtype: torch.dtype, autocast: bool) -> list:
    """The projection's four tensors (bias may be None), cast to `dtype`, after checking them against x."""
    if not isinstance(projection, (list, tuple)) or len(projection) != 5:
        raise ValueError(f"projections[{index}]: expected (weight, bias, lora_A, lora_B, scaling), got {projection!r}")
    weight, bias, lora_A, lora_B, scaling = projection
    name = "" if index == 0 else f"projections[{index}]."
    for arg, value in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _checks.floating(name + arg, value)
        _checks.same_device(name + arg, value, "x", x)
        if value.dim() != 2:
            raise ValueError(f"{name}{arg}: expected a 2-D tensor, got shape {tuple(value.shape)}")
    features = x.shape[-1]
    out_features, rank = weight.shape[0], lora_A.shape[0]
    if weight.shape[1] != features:
        raise ValueError(f"{name}weight: expected shape (out, {features}) to match x's last dimension, "
                         f"got {tuple(weight.shape)}")
    if lora_A.shape[1] != features:
        raise ValueError(f"{name}lora_A: expected shape (r, {features}) to match x's last dimension, "
                         f"got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"{name}lora_B: expected shape ({out_features}, {rank}) (weight's out, lora_A's rank), "
                         f"got {tuple(lora_B.shape)}")
    if rank == 0:
        raise ValueError(f"{name}lora_A: expected a rank of at least 1, got shape {tuple(lora_A.shape)}")
    if bias is not None:
        _checks.floating(name + "bias", bias)
        _checks.same_device(name + "bias", bias, "x", x)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"{name}bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"{name}scaling: expected a number, got {type(scaling).__name__}")
    tensors = [weight, bias, lora_A, lora_B]
    if not autocast:  # every tensor must already be x's dtype
        for arg, value in zip(("weight", "bias", "lora_A", "lora_B"), tensors):
            if value is not None and value.dtype != x.dtype:
                raise TypeError(f"{name}{arg}: expected x's dtype {x.dtype}, got {value.dtype}")
    return [None if t is None else t.to(dtype) for t in tensors]


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scalings, dropout_p, seed, backend, *flat):
        name = backends.select(_OP, x.device, backend)
        forward = backends.kernel(_OP, name, "forward")
        x = x.contiguous()
        outputs, saved = [], [x]
        for index in range(len(scalings)):
            weight, bias, lora_A, lora_B = (None if t is None else t.contiguous() for t in flat[4 * index:4 * index + 4])
            # The inputs already have autocast's dtype; kernels that compute in another keep it.
            with torch.autocast(x.device.type, enabled=False):
                out, xa, mask = forward(x, weight, bias, lora_A, lora_B, scalings[index], dropout_p, seed + index)
            outputs.append(out)
            saved.extend((weight, lora_A, lora_B, xa, mask))
        ctx.save_for_backward(*saved)
        ctx.options = (name, scalings, dropout_p, seed, [flat[4 * i + 1] is not None for i in range(len(scalings))])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        name, scalings, dropout_p, seed, has_bias = ctx.options
        backward = backends.kernel(_OP, name, "backward")
        x, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grads = None, []
        for index, grad_out in enumerate(grad_outputs):
            weight, lora_A, lora_B, xa, mask = saved[5 * index:5 * index + 5]
            first = 5 + 4 * index  # this projection's weight among forward's inputs
            need = (needs[0], needs[first], needs[first + 1] and has_bias[index], needs[first + 2], needs[first + 3])
            with torch.autocast(x.device.type, enabled=False):
                grad_x, *projection_grads = backward(
                    grad_out.contiguous(), x, weight, lora_A, lora_B, scalings[index], xa, mask, dropout_p,
                    seed + index, grad_x, *need,
                )
            grads.extend(projection_grads)
        return (grad_x, None, None, None, None, *grads)
