"""Autograd ops: validate arguments, pick a backend, save the minimum for backward."""

from .attention import cross_modal_attention
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .lora import lora_linear, lora_linear_multi

__all__ = ["cross_entropy", "cross_modal_attention", "linear_cross_entropy", "lora_linear", "lora_linear_multi"]
