"""Argument checks shared by the ops: each error names the argument, what was expected and what came."""

from __future__ import annotations

import math

import torch


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32, float16, bfloat16), got {value.dtype}")
    return value


def integer(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class indices (int64), got {value.dtype}")
    return value


def same_device(name: str, value: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(f"{name}: expected a tensor on the device of {reference_name} ({reference.device}), got {value.device}")


def one_of(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def in_range(name: str, value, low: float, high: float, *, high_inclusive: bool = True) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name}: expected a value in [{low}, {high}{bracket}, got {value}")


def loss_options(ignore_index, reduction: str, label_smoothing, z_loss, softcap) -> None:
    """The options the cross-entropy ops share."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:  # the kernels compare it with int64 targets
        raise ValueError(f"ignore_index: expected an int64, got {ignore_index}")
    one_of("reduction", reduction, ("mean", "sum", "none"))
    in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    in_range("z_loss", z_loss, 0.0, math.inf, high_inclusive=False)
    if softcap is not None:
        # An infinite cap would compute inf * tanh(0) = nan; no cap at all is softcap=None.
        in_range("softcap", softcap, 0.0, math.inf, high_inclusive=False)
        if softcap == 0:
            raise ValueError("softcap: expected a positive number or None, got 0")


def class_indices(name: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Data-dependent check, run where the op executes (inside the custom op, so it never breaks a graph)."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        found = target[bad]
        raise ValueError(
            f"{name}: expected class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got {found.numel()} outside, e.g. {found[0].item()}"
        )
