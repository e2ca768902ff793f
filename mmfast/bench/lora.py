"""LoRA linear forward + backward: x (N, in) through a frozen base (out, in) + bias and a rank-r adapter.

A benchmark module for harness.py, set up as LoRA fine-tuning runs: the base weight and bias are frozen,
lora_A (r, in) and lora_B (out, r) train, and x requires grad, being the output of the layer below.
Every variant computes out = x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T and backpropagates one
fixed random gradient of out. lora_B starts non-zero (PEFT starts it at zero) so that outputs and
gradients are those of an adapter in training. `base`, the frozen linear alone, is inside every LoRA
layer: it is the bar on time. Each workload also measures what autograd keeps for the backward
(harness.saved_tensor_bytes), the measure of the target "saved activations at most half of PEFT's".
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import mmfast
from mmfast import backends

from . import cross_entropy
from .harness import Workload, saved_tensor_bytes

OP = "lora_linear"
BASE = "base"
PEFT = "peft"
PEFT_COMPILED = "peft-compile"
MMFAST = "mmfast-"
VARIANTS = (BASE, PEFT, PEFT_COMPILED, *(f"{MMFAST}{b}" for b in backends.BACKENDS))
BASELINES = (BASE, PEFT)
# The targets are overheads over the base linear of a few percent, less than this machine's drift
# between one variant's run and the next: each variant is also timed step by step against the base.
PAIRED = BASE
LEGEND = (
    "base: the frozen F.linear(x, W, b) alone + backward to x; "
    "peft: peft.tuners.lora.layer.Linear from get_peft_model(LoraConfig(r, lora_alpha=2r, lora_dropout)); "
    "peft-compile: torch.compile of that layer; "
    "mmfast-<backend>: mmfast.ops.lora_linear(x, W, b, A, B, 2.0, dropout_p, backend=<backend>); "
    "flops: the base's two GEMMs and the adapter's six low-rank ones (base does only the two); "
    "floor: the output and the gradient of x; "
    "saved: what autograd keeps for the backward, parameters excluded, x counted only in 'saved w/ x' "
    "(on CPU torch's dropout keeps a mask of x's dtype, on CUDA a bool one)"
)

# Named shapes (`mmfast bench lora --shape NAME`). square: a 4096-wide projection (Llama 2 7B's
# attention) over 4096 tokens, without and with dropout; tall-dropout: a 1024-wide model over 8192
# tokens, where activations weigh more against the weights.
SHAPES = {
    "square": {"N": 4096, "in": 4096, "out": 4096, "r": 16, "dropout": 0.0},
    "square-dropout": {"N": 4096, "in": 4096, "out": 4096, "r": 16, "dropout": 0.1},
    "tall-dropout": {"N": 8192, "in": 1024, "out": 1024, "r": 16, "dropout": 0.1},
}
QUICK = {"N": 256, "in": 256, "out": 256, "r": 8, "dropout": 0.1}
ALPHA_OVER_R = 2  # PEFT's scaling is lora_alpha / r


def skip_reason(variant: str, device: torch.device) -> str | None:
    if variant.startswith(MMFAST):
        if variant == f"{MMFAST}triton" and device.type == "cpu":
            return cross_entropy.skip_reason(variant, device)  # the same reason: the interpreter's time means nothing
        return backends.unavailable_reason(OP, variant.removeprefix(MMFAST), device)
    if variant in (PEFT, PEFT_COMPILED) and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    return None


def shape(quick: bool) -> dict:
    return QUICK if quick else SHAPES["square"]


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # Forward: read x and W, write out; backward: read the gradient and W, write x's gradient. The
    # adapter's tensors are r/in of these. The op is matmul-bound, so flops() is the measure to read.
    n, i, o = shape["N"], shape["in"], shape["out"]
    return 2 * (n * i + n * o + o * i) * dtype.itemsize


def flops(shape: dict, dtype: torch.dtype) -> int:
    n, i, o, r = shape["N"], shape["in"], shape["out"], shape["r"]
    # x @ W.T and grad @ W; x @ A.T, xa @ B.T, grad @ B, (grad @ B) @ A, and the gradients of A and B.
    return 2 * 2 * n * i * o + 6 * 2 * n * r * (i + o)


def memory_floor(shape: dict, dtype: torch.dtype) -> int:
    return shape["N"] * (shape["in"] + shape["out"]) * dtype.itemsize


def _peft_layer(weight, bias, lora_A, lora_B, dropout: float):
    """PEFT's own LoRA Linear around an nn.Linear holding `weight` and `bias`, its adapter set to lora_A, lora_B."""
    import peft

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    r = lora_A.shape[0]
    config = peft.LoraConfig(r=r, lora_alpha=ALPHA_OVER_R * r, lora_dropout=dropout, target_modules=["proj"])
    # get_peft_model adapts layers of a model; the smallest model is a dict holding the one layer. Its
    # default would upcast a bf16 adapter to fp32: the benchmark's dtype is for every tensor.
    model = peft.get_peft_model(torch.nn.ModuleDict({"proj": linear}), config, autocast_adapter_dtype=False)
    layer = model.base_model.model["proj"]
    with torch.no_grad():
        for parameter, value in ((layer.base_layer.weight, weight), (layer.base_layer.bias, bias),
                                 (layer.lora_A["default"].weight, lora_A), (layer.lora_B["default"].weight, lora_B)):
            parameter.copy_(value)
    return layer.train()


def build(variant: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Workload:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    generator = torch.Generator(device).manual_seed(0)
    n, i, o, r, dropout = shape["N"], shape["in"], shape["out"], shape["r"], shape["dropout"]

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    x = randn(n, i).requires_grad_()
    grad = randn(n, o)
    weight, bias = randn(o, i, scale=i**-0.5), randn(o, scale=0.1)  # outputs of unit scale
    lora_A, lora_B = randn(r, i, scale=i**-0.5), randn(o, r, scale=0.01)

    if variant == BASE:
        parameters = [weight, bias]

        def forward():
            return F.linear(x, weight, bias)
    elif variant in (PEFT, PEFT_COMPILED):
        layer = _peft_layer(weight, bias, lora_A, lora_B, dropout)
        parameters = list(layer.parameters())
        module = torch.compile(layer) if variant == PEFT_COMPILED else layer  # compiled on the first (warmup) step

        def forward():
            return module(x)
    else:
        backend = variant.removeprefix(MMFAST)
        lora_A.requires_grad_()
        lora_B.requires_grad_()
        parameters = [weight, bias, lora_A, lora_B]
        scaling = float(ALPHA_OVER_R)

        def forward():
            return mmfast.ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout, backend=backend)

    def refresh():
        x.grad = None
        for parameter in parameters:
            parameter.grad = None

    def step():
        forward().backward(grad)

    return Workload(step=step, refresh=refresh, saved=lambda: saved_tensor_bytes(forward, parameters, x))
