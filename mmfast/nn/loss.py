"""Loss modules built on mmfast.ops."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import _reduction

from .. import ops


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss with class-index targets, on mmfast's fused kernel.

    Takes torch's arguments in torch's order, plus the fused op's keyword options. Class weights
    and probability targets are not supported and are refused rather than ignored.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        if weight is not None:
            raise ValueError("weight: class weights are not supported by mmfast's cross-entropy; expected None")
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(
            input,
            target,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class LinearCrossEntropyLoss(nn.Module):
    """Cross-entropy of a linear head's logits, fused so that the logits never exist: forward(hidden, weight, target).

    Takes mmfast.ops.linear_cross_entropy's options. `from_linear(lm_head)` makes a module that owns
    the head, for a forward(hidden, target) that replaces `cross_entropy(lm_head(hidden), target)`.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "LinearHeadCrossEntropyLoss":
        return LinearHeadCrossEntropyLoss(linear, cls(**options))

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return ops.linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class LinearHeadCrossEntropyLoss(nn.Module):
    """A linear head and its fused loss: forward(hidden, target) is the loss of head(hidden), without the logits.

    The head is shared, not copied: training this module trains the model's head.
    """

    def __init__(self, head: nn.Linear, loss: LinearCrossEntropyLoss):
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head: expected an nn.Linear, got {type(head).__name__}")
        self.head = head
        self.loss = loss

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        return self.loss(hidden, self.head.weight, target, self.head.bias)
