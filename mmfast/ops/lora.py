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
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., in) with in >= 1, got {tuple(x.shape)}")
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
    seed = draw_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    weights, biases, lora_As, lora_Bs = _per_projection(flat, 4)
    # torch.library differentiates a list of tensors only when none is None: a missing bias is an empty tensor.
    has_bias = [bias is not None for bias in biases]
    biases = [x.new_empty(0) if bias is None else bias for bias in biases]
    results = torch.ops.mmfast.lora_linear(
        x.reshape(-1, x.shape[-1]).contiguous(), weights, biases, has_bias, lora_As, lora_Bs, scalings, dropout_p,
        seed, backends.requested_backend(backend),
    )
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in results[:len(projections)]]


def draw_seed() -> Tensor:
    """The dropout seed of one call, an int64 CPU scalar; projection i of the call uses seed + i. Drawn
    from torch's CPU generator, so torch.manual_seed reproduces the masks; a tensor, so that
    torch.compile keeps the draw in its graph."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64)


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


# Backends that keep the dropout mask packed (uint8 (N, ceil(K / 8))); the others redraw it from the seed.
_PACKED_MASK = ("cpu",)


def _per_projection(flat: list, count: int) -> list[list]:
    return [flat[i::count] for i in range(count)]


@torch.library.custom_op("mmfast::lora_linear", mutates_args=())
def _forward(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    has_bias: list[bool],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scalings: list[float],
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> list[Tensor]:
    """The outputs, then each projection's xa, then each one's mask (empty where it is redrawn from the seed)."""
    forward = backends.kernel(_OP, backends.select(_OP, x.device, backend), "forward")
    first_seed = int(seed)
    # The inputs already have autocast's dtype; kernels that compute in another (cpu: float32 for bf16) keep it.
    with torch.autocast(x.device.type, enabled=False):
        results = [forward(x, weight, bias if has else None, lora_A.contiguous(), lora_B.contiguous(), scaling,
                           dropout_p, first_seed + i)
                   for i, (weight, bias, has, lora_A, lora_B, scaling)
                   in enumerate(zip(weights, biases, has_bias, lora_As, lora_Bs, scalings))]
    return [t for part in zip(*results) for t in part]


@_forward.register_fake
def _(x, weights, biases, has_bias, lora_As, lora_Bs, scalings, dropout_p, seed, backend):
    rows, features = x.shape
    packed = dropout_p > 0 and backends.select(_OP, x.device, backend) in _PACKED_MASK
    mask_shape = (rows, (features + 7) // 8) if packed else (0,)
    return ([x.new_empty(rows, w.shape[0]) for w in weights] + [x.new_empty(rows, a.shape[0]) for a in lora_As]
            + [x.new_empty(mask_shape, dtype=torch.uint8) for _ in weights])


@torch.library.custom_op("mmfast::lora_linear_backward", mutates_args=())
def _backward(
    grad_outs: list[Tensor],
    x: Tensor,
    weights: list[Tensor],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    xas: list[Tensor],
    masks: list[Tensor],
    scalings: list[float],
    dropout_p: float,
    seed: Tensor,
    needs: list[bool],
    backend: str,
) -> list[Tensor]:
    """[grad_x] + (grad_weight, grad_bias, grad_A, grad_B) per projection; empty where `needs` says no.

    needs: x's, then weight's, bias's, lora_A's and lora_B's per projection. x's gradient is summed
    over the projections in one buffer.
    """
    backward = backends.kernel(_OP, backends.select(_OP, x.device, backend), "backward")
    with torch.autocast(x.device.type, enabled=False):
        grad_x, grads = _run_backward(backward, grad_outs, x, weights, lora_As, lora_Bs, xas, masks, scalings,
                                      dropout_p, int(seed), needs)
    return [x.new_empty(0) if g is None else g for g in (grad_x, *grads)]  # one empty each: outputs may not alias


def _run_backward(backward, grad_outs, x, weights, lora_As, lora_Bs, xas, masks, scalings, dropout_p, first_seed,
                  needs):
    grad_x, grads = None, []
    for i, (grad_out, weight, lora_A, lora_B, xa, mask, scaling) in enumerate(
            zip(grad_outs, weights, lora_As, lora_Bs, xas, masks, scalings)):
        need = (needs[0], *needs[1 + 4 * i:5 + 4 * i])
        grad_x, *projection_grads = backward(grad_out.contiguous(), x, weight, lora_A.contiguous(),
                                             lora_B.contiguous(), scaling, xa, mask, dropout_p, first_seed + i,
                                             grad_x, *need)
        grads.extend(projection_grads)
    return grad_x, grads


@_backward.register_fake
def _(grad_outs, x, weights, lora_As, lora_Bs, xas, masks, scalings, dropout_p, seed, needs, backend):
    shapes = [x.shape]
    for weight, lora_A, lora_B in zip(weights, lora_As, lora_Bs):
        shapes += [weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape]
    return [x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weights, biases, has_bias, lora_As, lora_Bs, scalings, dropout_p, seed, backend = inputs
    count = len(weights)
    ctx.save_for_backward(x, seed, *weights, *lora_As, *lora_Bs, *output[count:])
    ctx.count, ctx.options = count, (scalings, dropout_p, backend)
    needs = [x.requires_grad]
    for weight, bias, has, lora_A, lora_B in zip(weights, biases, has_bias, lora_As, lora_Bs):
        needs += [weight.requires_grad, has and bias.requires_grad, lora_A.requires_grad, lora_B.requires_grad]
    ctx.needs = needs


def _autograd_backward(ctx, grad_results):
    count, (scalings, dropout_p, backend) = ctx.count, ctx.options
    x, seed, *saved = ctx.saved_tensors
    weights, lora_As, lora_Bs, xas, masks = (saved[i * count:(i + 1) * count] for i in range(5))
    grad_outs = [torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device) if g is None else g
                 for g, w in zip(grad_results[:count], weights)]
    grads = torch.ops.mmfast.lora_linear_backward(grad_outs, x, weights, lora_As, lora_Bs, xas, masks, scalings,
                                                  dropout_p, seed, ctx.needs, backend)
    grads = [g if need else None for g, need in zip(grads, ctx.needs)]
    grad_weights, grad_biases, grad_As, grad_Bs = _per_projection(grads[1:], 4)
    return grads[0], grad_weights, grad_biases, None, grad_As, grad_Bs, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
