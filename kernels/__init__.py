"""Triton kernels with thin launchers, one file per op; no autograd here (that is mmfast.ops)."""

from .attention import cross_modal_attention_backward, cross_modal_attention_forward
from .cross_entropy import cross_entropy_backward, cross_entropy_forward
from .linear_cross_entropy import linear_cross_entropy_forward
from .lora import lora_linear_backward, lora_linear_forward, lora_linear_mask

__all__ = [
    "cross_entropy_backward",
    "cross_entropy_forward",
    "cross_modal_attention_backward",
    "cross_modal_attention_forward",
    "linear_cross_entropy_forward",
    "lora_linear_backward",
    "lora_linear_forward",
    "lora_linear_mask",
]
