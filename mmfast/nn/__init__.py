"""nn.Module drop-ins built on mmfast.ops."""

from .attention import CrossModalAttention, GatedCrossAttentionBlock
from .lora import LoRALinear
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "CrossEntropyLoss",
    "CrossModalAttention",
    "GatedCrossAttentionBlock",
    "LinearCrossEntropyLoss",
    "LoRALinear",
]
