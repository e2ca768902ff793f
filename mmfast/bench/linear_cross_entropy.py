"""Linear cross-entropy forward + backward, hidden (N, H) and weight (V, H): the loss of a language-model head.

A benchmark module for harness.py. Every variant computes the mean loss of hidden @ weight.T against
the targets and backpropagates it to both hidden and weight, as training a head does. Besides torch's
own ways and the fused libraries a user would pick, `limit` times the three matmuls alone (logits,
grad hidden, grad weight): a fused op does at least these, so it is the bar on time. The weight
gradient is the floor on memory: every variant must create it.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import mmfast
from mmfast import backends

from . import cross_entropy
from .harness import Workload

OP = "linear_cross_entropy"
LIMIT = "limit"
EAGER = cross_entropy.EAGER
TORCH_CHUNKED = "torch-chunked"
COMPILED = cross_entropy.COMPILED
CCE = "cce"
LIGER = "liger"
MMFAST = "mmfast-"
VARIANTS = (LIMIT, EAGER, TORCH_CHUNKED, COMPILED, CCE, LIGER, *(f"{MMFAST}{b}" for b in backends.BACKENDS))
BASELINES = (LIMIT, EAGER, TORCH_CHUNKED, CCE)
LEGEND = (
    "limit: the three matmuls alone (x @ W.T, G @ W, G.T @ x with a preallocated (N, V) G); "
    "eager: F.cross_entropy(x @ W.T, y) + backward; "
    "torch-chunked: F.linear_cross_entropy(x, W, y, options=LinearCrossEntropyOptions()), torch's auto pick "
    "(CPU fp32: aspect_ratio:2 chunks, compact; CPU bf16: aspect_ratio, accurate); "
    "compile: torch.compile of eager; "
    "cce: cut_cross_entropy.linear_cross_entropy, impl='torch_compile' on CPU, its Triton 'cce' on CUDA; "
    "liger: LigerFusedLinearCrossEntropyLoss (CUDA); third-party variants run when installed; "
    "mmfast-<backend>: mmfast.ops.linear_cross_entropy(x, W, y, backend=<backend>); "
    "floor: the weight gradient, V*H elements of W's dtype"
)

# One full-size step is about 3 TFLOP (three 4096 x 1024 x 128256 matmuls): about a minute on a
# 2-core CPU, so fewer steps than the harness's default, and time for the slowest variant's five.
ITERATIONS = {False: (1, 3), True: (1, 3)}
WORKER_TIMEOUT_S = 3600

_PACKAGES = {CCE: ("cut_cross_entropy", "cut-cross-entropy"), LIGER: ("liger_kernel", "liger-kernel")}


def skip_reason(variant: str, device: torch.device) -> str | None:
    if variant.startswith(MMFAST):
        if variant == f"{MMFAST}triton" and device.type == "cpu":
            return cross_entropy.skip_reason(variant, device)  # the same reason: the interpreter's time means nothing
        return backends.unavailable_reason(OP, variant.removeprefix(MMFAST), device)
    if variant == TORCH_CHUNKED and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    if variant == LIGER and device.type != "cuda":
        return "Liger's kernels are Triton kernels for CUDA tensors"
    if variant in _PACKAGES:
        module, package = _PACKAGES[variant]
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed"
    return None


def shape(quick: bool) -> dict:
    # Default: 4096 tokens through a head onto Llama 3's 128256-token vocabulary: 501 MiB of fp32
    # weight, and 2 GiB of fp32 logits for whoever materialises them.
    return {"N": 256, "H": 256, "V": 8192} if quick else {"N": 4096, "H": 1024, "V": 128256}


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # Read hidden and weight, write both gradients, once each. The op is matmul-bound, so this GB/s
    # says little; flops() is the measure to read.
    return 2 * (shape["N"] + shape["V"]) * shape["H"] * dtype.itemsize


def flops(shape: dict, dtype: torch.dtype) -> int:
    return 3 * 2 * shape["N"] * shape["H"] * shape["V"]  # the three matmuls; the softmax is O(N * V)


def memory_floor(shape: dict, dtype: torch.dtype) -> int:
    return shape["V"] * shape["H"] * dtype.itemsize


def eager_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return cross_entropy.eager_loss(hidden @ weight.T, target)


def loss_function(variant: str, device: torch.device):
    if variant == EAGER:
        return eager_loss
    if variant == COMPILED:
        return torch.compile(eager_loss)  # compiled lazily, on the first (warmup) step
    if variant == TORCH_CHUNKED:
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda hidden, weight, target: F.linear_cross_entropy(hidden, weight, target, options=options)
    if variant == CCE:
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"
        return lambda hidden, weight, target: linear_cross_entropy(hidden, weight, target, impl=impl)
    if variant == LIGER:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda hidden, weight, target: liger(weight, hidden, target)
    if variant.startswith(MMFAST) and variant in VARIANTS:
        backend = variant.removeprefix(MMFAST)
        return lambda hidden, weight, target: mmfast.ops.linear_cross_entropy(hidden, weight, target, backend=backend)
    raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")


def _limit(hidden: torch.Tensor, weight: torch.Tensor, generator: torch.Generator) -> Workload:
    # G stands for the logits' gradient; made once, so the step holds only the matmuls. Their outputs
    # are fresh tensors kept until refresh, as eager's logits and gradients are fresh every step.
    grad_logits = torch.randn(hidden.shape[0], weight.shape[0], generator=generator, device=hidden.device)
    grad_logits = grad_logits.to(hidden.dtype)
    outputs = []

    def step():
        outputs.extend((hidden @ weight.T, grad_logits @ weight, grad_logits.T @ hidden))

    return Workload(step=step, refresh=outputs.clear)


def build(variant: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Workload:
    generator = torch.Generator(device).manual_seed(0)
    n, h, v = shape["N"], shape["H"], shape["V"]
    hidden = torch.randn(n, h, generator=generator, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=generator, device=device) / h**0.5).to(dtype)  # logits of unit scale
    if variant == LIMIT:
        return _limit(hidden, weight, generator)
    loss_fn = loss_function(variant, device)
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()

    def refresh():
        hidden.grad = weight.grad = None

    def step():
        loss_fn(hidden, weight, target).backward()

    return Workload(step=step, refresh=refresh)
