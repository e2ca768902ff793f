"""Shared test machinery: the tolerance rule of DESIGN.md and the backends that can run here."""

from __future__ import annotations

import torch

from mmfast import backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Absolute slack on top of "2x torch's own error", per dtype: covers the last-bit rounding of the
# output when torch happens to land exactly on the reference.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def runnable_backends(op: str, device: str = DEVICE) -> list[str]:
    """Every backend that can run `op` here; the tests assert below that the native ones are among them."""
    return [b for b in backends.BACKENDS if backends.unavailable_reason(op, b, torch.device(device)) is None]


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (actual.double() - reference.double()).abs()
    return diff.nan_to_num(nan=float("inf")).max().item() if diff.numel() else 0.0


def assert_within_torch_error(name: str, actual, torch_result, reference, dtype, scale: float = 1.0) -> None:
    """The backend's error vs the float64 reference is at most 2x plain torch's in the same dtype, plus atol."""
    err = max_error(actual, reference)
    err_torch = max_error(torch_result, reference)
    bound = 2 * err_torch + ATOL[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > 2 x torch's {err_torch:.3e} + atol ({bound:.3e})"
