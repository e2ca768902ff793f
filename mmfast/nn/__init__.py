"""nn.Module drop-ins built on mmfast.ops."""

from .loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
