"""Cross-entropy forward + backward on (N, V) logits: torch eager, torch.compile, mmfast per backend.

A benchmark module for harness.py. Every variant computes the mean loss and backpropagates it to the
logits, as a language-model head does. mmfast runs with inplace_backward=True (the gradient
overwrites the logits), so the logits are restored from a pristine copy before every step, outside
the timing; the other variants get the same refresh so that all do identical untimed work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmfast
from mmfast import backends

from .harness import Workload

EAGER = "eager"
COMPILED = "compile"
VARIANTS = (EAGER, COMPILED, *(f"mmfast-{b}" for b in backends.BACKENDS))
BASELINES = (EAGER, COMPILED)
LEGEND = (
    "eager: F.cross_entropy(logits, target) + backward; compile: torch.compile of the same; "
    "mmfast-<backend>: mmfast.ops.cross_entropy(..., inplace_backward=True, backend=<backend>)"
)


def skip_reason(variant: str, device: torch.device) -> str | None:
    if not variant.startswith("mmfast-"):
        return None
    backend = variant.removeprefix("mmfast-")
    if backend == "triton" and device.type == "cpu":
        # Even under TRITON_INTERPRET=1, where it would run, the interpreter is a test tool: its time means nothing.
        return "triton runs on CUDA tensors; on CPU only in its interpreter, which is not benchmarked"
    return backends.unavailable_reason("cross_entropy", backend, device)


def shape(quick: bool) -> dict:
    # Default: 4096 tokens of a 32k vocabulary (Llama 2), 500 MiB of fp32 logits.
    return {"N": 512, "V": 8192} if quick else {"N": 4096, "V": 32000}


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # The least any implementation can do: read the logits for the forward, read them again for the
    # backward, write the gradient once.
    return 3 * shape["N"] * shape["V"] * dtype.itemsize


def eager_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def loss_function(variant: str):
    if variant == EAGER:
        return eager_loss
    if variant == COMPILED:
        return torch.compile(eager_loss)  # compiled lazily, on the first (warmup) step
    if variant in VARIANTS:
        backend = variant.removeprefix("mmfast-")
        return lambda logits, target: mmfast.ops.cross_entropy(logits, target, inplace_backward=True, backend=backend)
    raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")


def build(variant: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Workload:
    loss_fn = loss_function(variant)
    generator = torch.Generator(device).manual_seed(0)
    pristine = torch.randn(shape["N"], shape["V"], generator=generator, device=device).to(dtype)
    target = torch.randint(0, shape["V"], (shape["N"],), generator=generator, device=device)
    logits = torch.empty_like(pristine).requires_grad_()

    def refresh():
        logits.grad = None  # frees eager's gradient; for inplace_backward it is the logits themselves
        with torch.no_grad():
            logits.copy_(pristine)

    def step():
        loss_fn(logits, target).backward()

    return Workload(step=step, refresh=refresh)
