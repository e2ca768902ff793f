"""PEFT drop-in: run PEFT's LoRA Linear layers through the fused op mmfast.ops.lora_linear.

    report = patch_peft_model(peft_model)   # every LoRA Linear layer it can take now runs fused
    print(report)                           # what was patched, what kept PEFT's forward and why
    unpatch_peft_model(peft_model)          # PEFT's own layers again
    patch_peft_layer(layer)                 # one layer, for code that builds them itself: None, or why not

Patching swaps the class of each layer it takes for FusedLoraLinear, a subclass of PEFT's Linear that
overrides forward only. No parameter, buffer or submodule is added, renamed or moved, so state_dict,
save_pretrained, merge_and_unload, set_adapter and the rest are PEFT's own code on PEFT's own tensors,
and a patched model deep-copies and pickles like any other.

Each call of a patched layer does what PEFT's forward does:
  - adapters disabled or merged, or no active adapter in this layer: PEFT's forward (the base layer);
  - one active plain-LoRA adapter: x @ W.T + b + scaling * dropout(x) @ A.T @ B.T in one fused op, with
    PEFT's scaling (rsLoRA included), the adapter's dropout (active when its module is in training mode),
    the base layer's bias and, with lora_bias, scaling * lora_B.bias;
  - anything else (a mixed-adapter batch through `adapter_names`, several active adapters at once, a
    LoRA variant such as DoRA added after patching, hooks on the layers the op bypasses, dtypes PEFT
    itself would reject): PEFT's forward for that call, counted in `report.fallbacks` and warned about.

Dtypes. PEFT computes the base part in x's dtype, casts x to lora_A's dtype for the low-rank part
(fp32 adapters on a bf16 model, PEFT's default) and casts the sum back to x's dtype. The fused op takes
a single dtype, so the adapters are cast to x's dtype instead: the kernels compute in fp32 anyway, and
what changes is the rounding of A and B (and of their gradients) to x's dtype, the usual mixed-precision
trade. Under torch.autocast both PEFT and the op compute in autocast's dtype.

The op draws one dropout seed from torch's default generator where nn.Dropout draws a mask, so random
numbers drawn later in a training step differ from an unpatched run (the masks follow the same law).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import layer as _lora_layer
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .. import ops

_PeftLinear = _lora_layer.Linear

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Keyword arguments PEFT's Linear.forward consumes itself (the rest go to the base layer).
_PEFT_KWARGS = frozenset(("adapter_names", *getattr(_lora_layer, "VARIANT_KWARG_KEYS", ())))


@dataclass
class PatchReport:
    """What patch_peft_model did, by module name (as model.named_modules() spells it).

    patched: the LoRA Linear layers that now run through the fused op.
    skipped: {name: reason} for every other PEFT LoRA layer; they keep PEFT's forward.
    fallbacks: {reason: calls} for calls of patched layers that ran PEFT's forward instead; it fills as
    the model runs.
    """

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fallbacks: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = [f"mmfast: {len(self.patched)} PEFT LoRA layers run fused, {len(self.skipped)} keep PEFT's forward"]
        lines += [f"  kept {name}: {reason}" for name, reason in self.skipped.items()]
        lines += [f"  {calls} call(s) fell back to PEFT's forward: {reason}"
                  for reason, calls in self.fallbacks.items()]
        return "\n".join(lines)


def patch_peft_model(model: nn.Module) -> PatchReport:
    """Route every PEFT LoRA Linear layer of `model` that the fused op can run through it; see the module doc.

    Raises ValueError when `model` has no PEFT LoRA layer or is already patched. Undo with unpatch_peft_model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ValueError("model: expected a model with PEFT LoRA layers (from peft.get_peft_model), found none")
    if any(isinstance(module, FusedLoraLinear) for _, module in layers):
        raise ValueError("model: already patched; call unpatch_peft_model(model) first")
    report = PatchReport()
    for name, module in layers:
        reason = patch_peft_layer(module, report.fallbacks)
        if reason is None:
            report.patched.append(name)
        else:
            report.skipped[name] = reason
    return report


def patch_peft_layer(module: nn.Module, fallbacks: Counter | None = None) -> str | None:
    """Route one PEFT LoRA layer through the fused op, as patch_peft_model does for each of a model's.

    Returns None when the layer now runs fused, else the reason it keeps PEFT's forward (the layer is then left
    as it was). `fallbacks` receives the calls that fall back, by reason (a new Counter when not given); a
    layer already patched is left as it is. For code that builds LoRA layers itself, one at a time.
    """
    if not isinstance(module, LoraLayer):
        raise TypeError(f"module: expected a PEFT LoRA layer (peft.tuners.lora.LoraLayer), got {_kind(module)}")
    if isinstance(module, FusedLoraLinear):
        return None
    reason = _layer_decline_reason(module)
    if reason is None:
        module.__class__ = FusedLoraLinear
        module._mmfast_fallbacks = Counter() if fallbacks is None else fallbacks
    return reason


def unpatch_peft_model(model: nn.Module) -> list[str]:
    """Give every patched layer of `model` PEFT's forward back; returns their names (none if unpatched)."""
    restored = []
    for name, module in model.named_modules():
        if isinstance(module, FusedLoraLinear):
            module.__class__ = _PeftLinear
            del module._mmfast_fallbacks
            restored.append(name)
    return restored


def _kind(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _layer_decline_reason(module: LoraLayer) -> str | None:
    """Why the fused op cannot stand in for this layer's forward, or None when it can."""
    if type(module) is not _PeftLinear:
        # A subclass (torchao, ...) has methods of its own that swapping the class would drop.
        return f"{_kind(module)} is not PEFT's plain LoRA Linear layer"
    if module.fan_in_fan_out:
        return "fan_in_fan_out (a Conv1D base layer): the fused op takes an (out, in) weight"
    base = module.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"the base layer is a {_kind(base)}, not a torch.nn.Linear (quantised, custom or nested)"
    for label, tensor in (("weight", base.weight), ("bias", base.bias)):
        if tensor is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
            return f"the base layer's {label} is a {_kind(tensor)} (quantised or sharded)"
    if base.weight.dtype not in _DTYPES:
        return f"the base layer's dtype is {base.weight.dtype}; the fused op takes float32, float16 or bfloat16"
    for adapter in module.lora_A:
        reason = _adapter_decline_reason(module, adapter)
        if reason is not None:
            return reason
    return _hook_reason(module, module.lora_A)


def _adapter_decline_reason(module: LoraLayer, adapter: str) -> str | None:
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        return f"adapter {adapter!r} is a LoRA variant ({type(variant).__name__}: DoRA, aLoRA, ...)"
    if adapter not in module.lora_B or type(module.lora_A[adapter]) is not nn.Linear \
            or type(module.lora_B[adapter]) is not nn.Linear:
        return f"adapter {adapter!r} does not hold lora_A and lora_B as torch.nn.Linear"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return f"adapter {adapter!r} has dropout {_kind(dropout)}, not torch.nn.Dropout"
    if isinstance(dropout, nn.Dropout) and dropout.p >= 1:
        return f"adapter {adapter!r} has dropout p={dropout.p}; the fused op takes p < 1"
    return None


def _intercepted(module: nn.Module) -> bool:
    """Whether calling `module` does more than its class's forward (hooks, accelerate's forward wrapper)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _hook_reason(module: LoraLayer, adapters) -> str | None:
    """The op reads the weights of the base layer and of these adapters without calling their modules."""
    parts = [module.base_layer]
    for adapter in adapters:
        parts += [module.lora_A[adapter], module.lora_B[adapter], module.lora_dropout[adapter]]
    if any(_intercepted(part) for part in parts):
        return "hooks (or a replaced forward) on the base layer or the adapter modules, which the fused op bypasses"
    return None


class FusedLoraLinear(_PeftLinear):
    """PEFT's LoRA Linear whose forward runs the fused op where it computes what PEFT's forward would."""

    def _get_name(self) -> str:
        # nn.Module's repr prints this name: the layer reads as PEFT's ("lora.Linear(...)"), which it still
        # is in every respect but the forward.
        return _PeftLinear.__name__

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base, lora_A, lora_B = self.base_layer, self.lora_A[adapter], self.lora_B[adapter]
        dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
        bias = base.bias
        if lora_B.bias is not None:  # lora_bias: PEFT adds scaling * lora_B.bias along with the low-rank product
            bias = scaling * lora_B.bias if bias is None else bias + scaling * lora_B.bias
        # One dtype for the op: x's (the adapters' may differ, see the module doc), or autocast's, to which
        # PEFT's linears cast everything.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x, weight, weight_A, weight_B = (t.to(dtype) for t in (x, base.weight, lora_A.weight, lora_B.weight))
        bias = None if bias is None else bias.to(dtype)
        dropout_p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return ops.lora_linear(x, weight, bias, weight_A, weight_B, scaling, dropout_p=dropout_p,
                               training=dropout.training)

    def _fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one adapter the fused op computes this call with, or None where PEFT's forward must run."""
        if self.disable_adapters or self.merged:
            return None
        if kwargs.get("adapter_names") is not None:
            return self._fall_back("adapter_names given (a batch mixing adapters)")
        if args or any(key not in _PEFT_KWARGS or value is not None for key, value in kwargs.items()):
            return self._fall_back("extra forward arguments, which PEFT passes on to the base layer")
        active = [adapter for adapter in self.active_adapters if adapter in self.lora_A]
        if not active:
            return None
        if len(active) > 1:
            return self._fall_back("several adapters active at once")
        adapter = active[0]
        reason = _adapter_decline_reason(self, adapter) or _hook_reason(self, active)
        if reason is not None:
            return self._fall_back(reason)
        if not torch.is_autocast_enabled(x.device.type):
            base = self.base_layer
            if x.dtype != base.weight.dtype or (base.bias is not None and base.bias.dtype != x.dtype):
                return self._fall_back("x's dtype differs from the base layer's (and autocast is off)")
            if self.lora_A[adapter].weight.dtype != x.dtype and not getattr(self, "cast_input_dtype_enabled", True):
                return self._fall_back("the adapter's dtype differs from x's and PEFT's input casting is disabled")
        return adapter

    def _fall_back(self, reason: str) -> None:
        self._mmfast_fallbacks[reason] += 1
        warnings.warn(f"mmfast: a patched PEFT LoRA layer ran PEFT's forward: {reason}", stacklevel=3)
        return None
