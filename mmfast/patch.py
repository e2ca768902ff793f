"""mmfast.patch(model) / mmfast.unpatch(model): one call that puts a Hugging Face model instance on mmfast's ops.

    report = mmfast.patch(model)          # a transformers PreTrainedModel, or a PEFT PeftModel around one
    print(report)                         # a table: what now runs on mmfast, what was left alone and why
    mmfast.unpatch(model)                 # the model's own implementations again

Three kinds, each on by default:
  attention  every attention layer of the model and of its sub-models (vision tower, Q-Former, language
             model; self- and cross-attention) runs the "mmfast" attention implementation
             (mmfast.integrations.transformers, registered on first use) through transformers'
             set_attn_implementation;
  lora       every PEFT LoRA Linear layer the fused op can run: mmfast.integrations.peft.patch_peft_model;
  loss       the model's loss heads: mmfast.integrations.losses.patch_loss.

Only this instance changes. transformers keeps the attention implementation on the (sub-)configs, and models
built from one config object share those objects (from_config / _from_config do not copy them; a LLaVA's
language model holds config.text_config itself). So patch() first gives the instance its own deep copy of
every config its modules hold (model.config, text_config, vision_config, qformer_config, ..., swapped
wherever a module refers to them) and switches the copies: another model built from the same config keeps
its implementation. After patch(), `model.config is config` no longer holds for the config you built it from;
unpatch() restores the implementation on the copies (the model keeps them). No class, function or
registry entry is replaced globally: LoRA layers and gated layers change class per instance, loss heads
their forward per instance.

What the attention report says, per attention module (a module whose forward calls transformers'
AttentionInterface, or whose class name says Attention without any such module inside):
  swapped     its config now names "mmfast": the op runs it (calls the op cannot run as transformers asks
              fall back to SDPA at run time, counted in mmfast.integrations.transformers.report());
  left alone  its forward computes attention itself (does not call the AttentionInterface), or its sub-model
              would not switch (transformers' set_attn_implementation skips classes that don't use the
              interface), with the reason.
Gated attention (Flamingo / Idefics v1 / Mllama: residual + tanh(gate) * o_proj(attention), the gate a
scalar parameter of the layer): the gate is fused into the op where the layer is one mmfast knows
(mmfast.integrations.gates: Mllama's cross-attention decoder layers and gated vision layers, Idefics v1's
gated cross-attention layers) and its o_proj is bias-free: that layer instance's class is swapped for a
subclass whose forward hands the gate to the op (tanh(gate) * attention in the kernel, the gate's gradient
from its backward) and adds the residual; everything else in it is the model's own code. The report then says
"gate NAME fused into the op"; a known layer that cannot be fused (its forward differs from transformers
5.17-5.24's, a per-channel gate, an o_proj with a bias, ...) says "gate NAME applied by the model's layer,
not fused: REASON"; gate-like parameters of any other enclosing layer are named as applied by the model's
layer, not fused. unpatch() gives the layers their own class back.

backend. Losses get it as patch_loss(backend=...). The attention interface and patch_peft_model take no
backend, so patch() pins it with forward hooks on each patched attention module and LoRA layer that enter
`mmfast.use_backend(backend)` for the module's call (and leave it, even on an exception). The op records the
backend when it runs forward, so the backward uses the same one; under gradient checkpointing the
recomputed forward calls the module again and so is pinned too. An op call's own backend= still wins, and
the hooks also pin any other mmfast op called inside those modules. A backend that cannot run raises
mmfast.BackendUnavailable at the first forward, not at patch().

strict=True raises ValueError listing every module of a requested kind that was left alone (the model is
unpatched first, so it is as it was). The live counters stay reachable: report.fallbacks["attention"] is
mmfast.integrations.transformers.report().fallbacks (process-wide: every model on "mmfast" counts there),
report.fallbacks["lora"] is the PEFT patch's own Counter (this model only).
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass, field

from torch import nn

from . import backends
from .nn import CrossModalAttention

__all__ = ["KindReport", "PatchReport", "patch", "unpatch"]

KINDS = ("attention", "lora", "loss")


@dataclass
class KindReport:
    """One kind of patch: swapped {module name: what it runs now}, left_alone {module name: reason}, notes."""

    swapped: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PatchReport:
    """What mmfast.patch did to one model, per kind ("attention", "lora", "loss"); module names as the
    patched model's named_modules() spells them. Kinds not requested are None."""

    model: str = ""
    backend: str | None = None
    attention: KindReport | None = None
    lora: KindReport | None = None
    loss: KindReport | None = None
    peft: object | None = None  # mmfast.integrations.peft.PatchReport, with its live fallbacks Counter

    def kinds(self) -> dict[str, KindReport]:
        return {kind: getattr(self, kind) for kind in KINDS if getattr(self, kind) is not None}

    @property
    def swapped(self) -> dict[str, dict[str, str]]:
        return {kind: report.swapped for kind, report in self.kinds().items()}

    @property
    def left_alone(self) -> dict[str, dict[str, str]]:
        return {kind: report.left_alone for kind, report in self.kinds().items()}

    @property
    def fallbacks(self) -> dict:
        """Live counters of calls that ran the model's own code instead of the op, by reason."""
        result = {}
        if self.attention is not None:
            from .integrations.transformers import report as attention_report
            result["attention"] = attention_report().fallbacks
        if self.peft is not None:
            result["lora"] = self.peft.fallbacks
        return result

    def __str__(self) -> str:
        rows = []
        for kind, report in self.kinds().items():
            rows += [(kind, "mmfast", name, detail) for name, detail in report.swapped.items()]
            rows += [(kind, "left alone", name, reason) for name, reason in report.left_alone.items()]
            rows += [(kind, "note", "", note) for note in report.notes]
        header = ("kind", "status", "module", "detail")
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(3)]
        lines = [f"mmfast.patch({self.model}), backend {self.backend or 'automatic'}"]
        for row in [header, *rows]:
            lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
        lines.append("; ".join(f"{kind}: {len(r.swapped)} on mmfast, {len(r.left_alone)} left alone"
                               for kind, r in self.kinds().items()))
        fallbacks = {kind: sum(counter.values()) for kind, counter in self.fallbacks.items()}
        if fallbacks:
            lines.append("run-time fallbacks so far: " + ", ".join(f"{k} {v}" for k, v in fallbacks.items())
                         + " (report.fallbacks; attention's are process-wide)")
        return "\n".join(lines)


@dataclass
class _State:
    report: PatchReport
    configs: list = field(default_factory=list)  # (config copy, its _attn_implementation_internal before)
    hooks: list = field(default_factory=list)
    gates: list = field(default_factory=list)  # gated layers rewired by mmfast.integrations.gates
    lora: bool = False
    loss: bool = False


_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def patch(model: nn.Module, *, attention: bool = True, lora: bool = True, loss: bool = True,
          backend: str | None = None, strict: bool = False) -> PatchReport:
    """Put this model instance's attention, PEFT LoRA layers and loss on mmfast's ops; see the module doc.

    model: a transformers PreTrainedModel or a PEFT PeftModel around one. Gives the instance its own copies
    of its configs (so other instances built from the same config object are unaffected). Raises ValueError
    when the model is already patched, or with strict=True when a requested module was left alone.
    """
    base = _transformers_model(model)
    if backend is not None:
        backends.check_name(backend)
    if model in _STATE or base in _STATE:
        raise ValueError("model: already patched by mmfast.patch; call mmfast.unpatch(model) first")
    state = _State(PatchReport(model=type(model).__name__, backend=backend))
    _STATE[model] = state
    try:
        if attention:
            _patch_attention(model, base, state)
        if lora:
            _patch_lora(model, state)
        if loss:
            _patch_loss(model, state)
    except BaseException:
        unpatch(model)
        raise
    report = state.report
    if strict:
        left = [f"  {kind} {name}: {reason}" for kind, r in report.kinds().items() for name, reason in
                r.left_alone.items()]
        if left:
            unpatch(model)
            raise ValueError("mmfast.patch(strict=True): left alone (the model is unpatched again):\n" + "\n".join(left))
    return report


def unpatch(model: nn.Module) -> PatchReport | None:
    """Undo mmfast.patch on this model: LoRA layers, loss heads and attention implementations as they were.

    Returns the report of the patch it undid, or None when the model was not patched.
    """
    state = _STATE.pop(model, None)
    if state is None:
        return None
    for handle in state.hooks:
        handle.remove()
    if state.gates:
        from .integrations.gates import unfuse_gates
        unfuse_gates(state.gates)
    if state.loss:
        from .integrations.losses import unpatch_loss
        unpatch_loss(model)
    if state.lora:
        from .integrations.peft import unpatch_peft_model
        unpatch_peft_model(model)
    for config, previous in state.configs:
        config._attn_implementation_internal = previous
    return state.report


# --------------------------------------------------------------------------------------------------- internals


def _transformers_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers PreTrainedModel or a PEFT PeftModel, got "
                        f"{type(model).__name__}")
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:
        raise TypeError(f"model: expected a transformers model, and transformers cannot be imported ({exc})") from None
    base = model
    if not isinstance(base, PreTrainedModel) and hasattr(base, "get_base_model"):
        base = base.get_base_model()  # PeftModel
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel or a PEFT PeftModel around one, got "
                        f"{type(model).__name__}")
    return base


def _own_configs(model: nn.Module, base) -> list:
    """Deep-copy every config the model's modules hold (with its sub-configs) and point the modules at the copies."""
    from transformers import PretrainedConfig

    mapping: dict[int, object] = {}

    def pair(old, new):
        mapping[id(old)] = new
        for key in getattr(old, "sub_configs", {}) or {}:
            old_sub, new_sub = getattr(old, key, None), getattr(new, key, None)
            if isinstance(old_sub, PretrainedConfig) and isinstance(new_sub, PretrainedConfig):
                pair(old_sub, new_sub)

    pair(base.config, copy.deepcopy(base.config))
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig):
                if id(value) not in mapping:
                    pair(value, copy.deepcopy(value))
                module.__dict__[key] = mapping[id(value)]
    return list({id(c): c for c in mapping.values()}.values())


_INTERFACE_CACHE: dict[type, bool | None] = {}


def _calls_interface(cls: type) -> bool | None:
    """Whether cls.forward looks its attention function up in transformers' AttentionInterface (None: unknown)."""
    if cls not in _INTERFACE_CACHE:
        forward = inspect.unwrap(cls.forward)
        code = getattr(forward, "__code__", None)
        answer = None
        if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
            answer = True
        else:
            try:
                answer = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
            except (OSError, TypeError):
                answer = False if code is not None else None
        _INTERFACE_CACHE[cls] = answer
    return _INTERFACE_CACHE[cls]


def _attention_like(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() or _calls_interface(type(module)) is True


def _patch_attention(model: nn.Module, base, state: _State) -> None:
    from transformers import PreTrainedModel

    from .integrations.transformers import NAME, register_attention

    register_attention()
    report = state.report.attention = KindReport()
    configs = _own_configs(model, base)
    state.configs = [(config, config._attn_implementation_internal) for config in configs]
    base.set_attn_implementation(NAME)

    modules = dict(model.named_modules())
    names = [name for name, module in modules.items()
             if _attention_like(module) and not isinstance(module, PreTrainedModel)]
    # Leaves only: a module calling the interface, or an attention-named module with no attention inside it
    # (containers such as Blip2QFormerAttention are reported through the module they hold).
    leaves = [name for name in names
              if _calls_interface(type(modules[name])) is True
              or not any(other.startswith(name + ".") for other in names if other != name)]
    leaves = [name for name in leaves if not any(_calls_interface(type(modules[other])) is True
                                                 and name.startswith(other + ".") for other in leaves)]
    for name in leaves:
        module = modules[name]
        cls = type(module).__name__
        interface = _calls_interface(type(module))
        if interface is not True:
            report.left_alone[name] = (f"{cls}.forward computes attention itself (it does not call transformers' "
                                       f"AttentionInterface)" if interface is False else
                                       f"{cls}.forward's code cannot be inspected")
            continue
        config = _module_config(name, module, modules)
        implementation = getattr(config, "_attn_implementation", None)
        if implementation != NAME:
            report.left_alone[name] = (f"{cls} stays on attn_implementation={implementation!r}: transformers' "
                                       f"set_attn_implementation did not switch its (sub-)model")
            continue
        report.swapped[name] = _describe(name, module)
        if state.report.backend is not None:
            _pin_backend(module, state.report.backend, state.hooks)
    if not leaves:
        report.notes.append("no attention module found")
    from .integrations.gates import fuse_gates

    gates = fuse_gates(model, set(report.swapped), state.gates)
    for name in report.swapped:
        if name in gates:
            gate, reason = gates[name]
            report.swapped[name] += (f"; gate {gate} fused into the op (tanh(gate) * attention, before the bias-free "
                                     f"o_proj)" if reason is None else
                                     f"; gate {gate} applied by the model's layer, not fused: {reason}")
        elif isinstance(modules[name], CrossModalAttention) and modules[name].gated:
            report.swapped[name] += "; gate fused into the op (mmfast.nn.CrossModalAttention)"
        else:
            report.swapped[name] += _gate_note(name, modules)


def _module_config(name: str, module: nn.Module, modules: dict):
    config = vars(module).get("config")
    while config is None and name:
        name = name.rpartition(".")[0]
        config = vars(modules[name]).get("config")
    return config


def _describe(name: str, module: nn.Module) -> str:
    cls = type(module).__name__
    cross = bool(getattr(module, "is_cross_attention", False)) or "cross" in cls.lower() \
        or any("cross" in part.lower() for part in name.split(".")[-2:])
    return f"{cls}, {'cross' if cross else 'self'}-attention"


def _gate_note(name: str, modules: dict) -> str:
    """For an enclosing layer mmfast.integrations.gates does not know: its gate-like parameters, if any (they
    may gate the attention or the MLP; either way the model's layer applies them)."""
    parent = modules.get(name.rpartition(".")[0]) if "." in name else modules.get("")
    if parent is None:
        return ""
    gates = [key for key, value in parent._parameters.items()
             if value is not None and ("gate" in key.lower() or "alpha" in key.lower())]
    if not gates:
        return ""
    return f"; gate-like parameters of the enclosing layer ({', '.join(gates)}) applied by the model's layer, not fused"


def _pin_backend(module: nn.Module, backend: str, hooks: list) -> None:
    """Forward hooks that run the module's call inside mmfast.use_backend(backend)."""
    active = []

    def enter(_module, _args):
        context = backends.use_backend(backend)
        context.__enter__()
        active.append(context)

    def leave(_module, _args, _output):
        if active:
            active.pop().__exit__(None, None, None)

    hooks.append(module.register_forward_pre_hook(enter))
    hooks.append(module.register_forward_hook(leave, always_call=True))


def _patch_lora(model: nn.Module, state: _State) -> None:
    report = state.report.lora = KindReport()
    if not any(type(module).__module__.startswith("peft.") and hasattr(module, "lora_A") for module in model.modules()):
        report.notes.append("no PEFT LoRA layer in the model")
        return
    from .integrations import peft as mp

    if "backend" in inspect.signature(mp.patch_peft_model).parameters:
        peft_report = mp.patch_peft_model(model, backend=state.report.backend)
        pin = False
    else:
        peft_report = mp.patch_peft_model(model)
        pin = state.report.backend is not None
    state.lora = True
    state.report.peft = peft_report
    modules = dict(model.named_modules())
    for name in peft_report.patched:
        report.swapped[name] = "fused LoRA linear (mmfast.ops.lora_linear)"
        if pin:
            _pin_backend(modules[name], state.report.backend, state.hooks)
    report.left_alone.update(peft_report.skipped)


def _patch_loss(model: nn.Module, state: _State) -> None:
    from .integrations.losses import patch_loss

    report = state.report.loss = KindReport()
    swapped, left_alone = patch_loss(model, backend=state.report.backend)
    state.loss = True
    report.swapped.update({name: "mmfast loss" for name in swapped})
    report.left_alone.update(left_alone)
    if not swapped and not left_alone:
        report.notes.append("no loss head found")
