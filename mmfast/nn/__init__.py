"""nn.Module drop-ins built on mmfast.ops."""

from .lora import LoRALinear
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "LoRALinear"]
