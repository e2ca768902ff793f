"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update, run by mmfast.ops.lora_linear."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class LoRALinear(nn.Module):
    """y = x @ W.T + b + scaling * dropout(x) @ A.T @ B.T, with W and b frozen and A, B trained.

    Initialised as PEFT initialises LoRA: A Kaiming-uniform, B zeros, so a fresh layer computes the
    base linear exactly. scaling is alpha / r, or alpha / sqrt(r) with use_rslora (rank-stabilised).
    merge() folds the update into W for inference; unmerge() takes it back out.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0.0, 1.0), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, alpha
        self.dropout, self.use_rslora = float(dropout), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.merged = False
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRALinear:
        """A LoRALinear over `linear`'s own weight and bias (shared, not copied, and frozen); alpha defaults to r."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, r, r if alpha is None else alpha, dropout=dropout,
                    bias=False, use_rslora=use_rslora, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, **factory))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, **factory))
        layer.reset_lora_parameters()
        return layer

    def delta_weight(self) -> Tensor:
        """scaling * B @ A, in float32 at least, as merge() adds it."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return self.scaling * (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the update is already merged into the weight")
        self.weight.copy_(self.weight + self.delta_weight())  # summed in float32, then rounded once
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the update is not merged")
        self.weight.copy_(self.weight - self.delta_weight())
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                               dropout_p=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout}, bias={self.bias is not None}, use_rslora={self.use_rslora}, "
                f"merged={self.merged}")
