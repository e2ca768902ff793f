"""nn.Module drop-ins built on mmfast.ops."""

from .loss import CrossEntropyLoss

__all__ = ["CrossEntropyLoss"]
