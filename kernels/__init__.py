"""Triton kernels with thin launchers, one file per op; no autograd here (that is mmfast.ops)."""

from .cross_entropy import cross_entropy_backward, cross_entropy_forward

__all__ = ["cross_entropy_backward", "cross_entropy_forward"]
