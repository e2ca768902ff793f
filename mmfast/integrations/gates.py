"""Gated attention layers with the gate fused into mmfast's attention op, per model instance.

    rewired = []
    report = fuse_gates(model, swapped, rewired)   # swapped: names of attention modules now on "mmfast"
    unfuse_gates(rewired)                          # each layer's own class again

Flamingo-style layers (Mllama's cross-attention decoder layers and gated vision layers, Idefics v1's gated
cross-attention layers) compute residual + tanh(gate) * o_proj(attention). With a scalar gate and a
bias-free linear o_proj that equals residual + o_proj(tanh(gate) * attention), and the op computes
tanh(gate) * attention itself (its `gate` argument: the multiply in the kernel, the gate's gradient from
the backward pass it already runs). So such a layer instance gets a forward (its class swapped for a
subclass of the same name, made once per class: the class itself is untouched, other instances keep it, as
the LoRA patch does) that passes the gate to its attention module as `mmfast_gate=FusedGate(gate)`
(mmfast.integrations.transformers.attention_forward takes it from the module's **kwargs) and adds the
residual without multiplying again. Everything else in the layer is the model's own code, in the same order:
norms, the attention module itself (q/k norms, cache reads and updates at generation time), the MLP with
its own gate (a feed-forward gate, not an attention gate), Mllama's full_text_row_masked_out_mask, Idefics'
dropout and cross_attention_gate. Gradient checkpointing runs the fused forward again in the backward, so
the recomputation is fused too.

Known layers are matched by class (and subclasses), and the class's forward must be, statement for
statement, the one this module reimplements: its syntax tree, without docstring, annotations and
decorators, with the cache argument's name (past_key_values in transformers 5.17, cache in 5.24) made
the same, is compared with the forward of transformers 5.17 to 5.24 kept below. A layer that differs, whose
gate is not one scalar, whose o_proj is not a bias-free linear layer, whose attention module is not on
"mmfast", or whose forward is already replaced on the instance (accelerate's hooks do that) keeps its own
forward, and the report says why. At run time the rewired forward falls back to the layer's own forward
when its attention module is no longer on "mmfast" (set_attn_implementation after patch), and raises if
the attention module did not pass the gate through (the layer would otherwise be ungated, silently).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from .transformers import GATE_KWARG, NAME, FusedGate

__all__ = ["fuse_gates", "unfuse_gates"]

# The forwards reimplemented below, as transformers 5.24 writes them (5.17 differs in the cache argument's
# name and in decorators, which the comparison ignores). Used only to compare syntax trees.
_MLLAMA_CROSS = '''
def forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
            full_text_row_masked_out_mask, position_ids=None, cache=None, use_cache=False,
            position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)

    hidden_states, attn_weights = self.cross_attn(
        hidden_states=hidden_states,
        attention_mask=cross_attention_mask,
        cross_attention_states=cross_attention_states,
        cache=cache,
        **kwargs,
    )
    hidden_states = residual + self.cross_attn_attn_gate.tanh() * hidden_states

    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states  # type: ignore
    hidden_states = residual + self.cross_attn_mlp_gate.tanh() * hidden_states

    return hidden_states
'''

_MLLAMA_VISION = '''
def forward(self, hidden_states, attention_mask=None):
    # Self Attention
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, attn_weights = self.self_attn(hidden_states, attention_mask=attention_mask)
    if self.is_gated:
        hidden_states = self.gate_attn.tanh() * hidden_states
    hidden_states = residual + hidden_states

    # Feed forward
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    if self.is_gated:
        hidden_states = self.gate_ffn.tanh() * hidden_states
    hidden_states = residual + hidden_states

    return hidden_states
'''

_IDEFICS_CROSS = '''
def forward(self, hidden_states, attention_mask=None, image_hidden_states=None, image_attention_mask=None,
            cross_attention_gate=None, cache=None, **kwargs):
    if image_hidden_states is None:
        raise ValueError(
            "`image_hidden_states` is required for Idefics cross attention module which are visual features to be"
            " conditioned on."
        )

    if cross_attention_gate is None:
        raise ValueError(
            "`cross_attention_gate` is required for Idefics cross attention module to zero-out the cross-attention "
            "hidden_states attending to no images."
        )

    if cache is not None:
        raise NotImplementedError("Past key value states are not implemented for Idefics cross attention module.")

    residual = hidden_states

    hidden_states = self.input_layernorm(hidden_states)

    # Self Attention
    hidden_states, _ = self.cross_attn(
        hidden_states=hidden_states,
        key_value_states=image_hidden_states,
        attention_mask=image_attention_mask,
        **kwargs,
    )
    hidden_states = nn.functional.dropout(hidden_states, p=self.config, training=self.training)
    # Fill in zeros for cross_attention hidden_states of tokens attending to no images
    hidden_states = hidden_states.masked_fill((cross_attention_gate == 0)[:, :, None], 0.0)
    hidden_states = residual + self.act_cross_attn(self.alpha_cross_attn) * hidden_states

    # Fully Connected
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = nn.functional.dropout(hidden_states, p=self.config, training=self.training)
    hidden_states = residual + self.act_dense(self.alpha_dense) * hidden_states

    return hidden_states
'''


def _mllama_cross(layer, a: dict, extra: dict, cache_name: str):
    residual = a["hidden_states"]
    hidden_states = layer.input_layernorm(residual)
    gate = FusedGate(layer.cross_attn_attn_gate)
    hidden_states, _ = layer.cross_attn(hidden_states=hidden_states, attention_mask=a["cross_attention_mask"],
                                        cross_attention_states=a["cross_attention_states"],
                                        **{cache_name: a[cache_name]}, **extra, **{GATE_KWARG: gate})
    _check_applied(layer, "cross_attn", gate)
    hidden_states = residual + hidden_states  # tanh(gate) is in it already

    residual = hidden_states
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    if a["full_text_row_masked_out_mask"] is not None:
        hidden_states = a["full_text_row_masked_out_mask"][:, 0] * hidden_states
    return residual + layer.cross_attn_mlp_gate.tanh() * hidden_states


def _mllama_vision(layer, a: dict, extra: dict, cache_name: str):
    residual = a["hidden_states"]
    hidden_states = layer.input_layernorm(residual)
    gate = FusedGate(layer.gate_attn)
    hidden_states, _ = layer.self_attn(hidden_states, attention_mask=a["attention_mask"], **{GATE_KWARG: gate})
    _check_applied(layer, "self_attn", gate)
    hidden_states = residual + hidden_states

    residual = hidden_states
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    hidden_states = layer.gate_ffn.tanh() * hidden_states
    return residual + hidden_states


def _idefics_cross(layer, a: dict, extra: dict, cache_name: str):
    residual = a["hidden_states"]
    hidden_states = layer.input_layernorm(residual)
    gate = FusedGate(layer.alpha_cross_attn)
    hidden_states, _ = layer.cross_attn(hidden_states=hidden_states, key_value_states=a["image_hidden_states"],
                                        attention_mask=a["image_attention_mask"], **extra, **{GATE_KWARG: gate})
    _check_applied(layer, "cross_attn", gate)
    # dropout and the zero fill commute with the scalar tanh(gate) the attention already carries
    hidden_states = nn.functional.dropout(hidden_states, p=layer.config, training=layer.training)
    hidden_states = hidden_states.masked_fill((a["cross_attention_gate"] == 0)[:, :, None], 0.0)
    hidden_states = residual + hidden_states

    residual = hidden_states
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    hidden_states = nn.functional.dropout(hidden_states, p=layer.config, training=layer.training)
    return residual + layer.act_dense(layer.alpha_dense) * hidden_states


def _idefics_own_path(a: dict, cache_name: str) -> bool:
    """Calls the layer's own forward answers with an error: let it raise its own."""
    return a["image_hidden_states"] is None or a["cross_attention_gate"] is None or a[cache_name] is not None


@dataclass(frozen=True)
class _Spec:
    module: str  # transformers module defining the class
    cls: str
    attention: str  # the attention child
    gate: str  # the attention gate parameter
    template: str
    fused: object
    applies: object = None  # layer -> bool: whether the layer has an attention gate at all
    own_path: object = None  # (arguments, cache name) -> bool: run the layer's own forward for this call
    activation: str | None = None  # the child module applying tanh to the gate, where the layer has one


_SPECS = (
    _Spec("transformers.models.mllama.modeling_mllama", "MllamaCrossAttentionDecoderLayer", "cross_attn",
          "cross_attn_attn_gate", _MLLAMA_CROSS, _mllama_cross),
    _Spec("transformers.models.mllama.modeling_mllama", "MllamaVisionEncoderLayer", "self_attn", "gate_attn",
          _MLLAMA_VISION, _mllama_vision, applies=lambda layer: getattr(layer, "is_gated", False) is True),
    _Spec("transformers.models.idefics.modeling_idefics", "IdeficsGatedCrossAttentionLayer", "cross_attn",
          "alpha_cross_attn", _IDEFICS_CROSS, _idefics_cross, own_path=_idefics_own_path,
          activation="act_cross_attn"),
)

# Keyword arguments transformers' deprecate_kwarg decorators rename before the forward sees them.
_RENAMED = {"past_key_values": "cache", "hidden_state": "hidden_states"}


def _spec(layer: nn.Module) -> _Spec | None:
    for cls in type(layer).__mro__:
        for spec in _SPECS:
            if cls.__name__ == spec.cls and cls.__module__ == spec.module:
                return spec
    return None


def fuse_gates(model: nn.Module, swapped: set[str], rewired: list) -> dict[str, tuple[str, str | None]]:
    """Rewire every known gated layer of `model` whose attention module (by name) is in `swapped`.

    Appends a record per rewired layer to `rewired` (for unfuse_gates, as soon as the layer changes); returns
    {attention module name: (gate parameter name, None if fused, else the reason it is not)} for every known
    layer with an attention gate."""
    report = {}
    for name, layer in model.named_modules():
        spec = _spec(layer)
        if spec is None or (spec.applies is not None and not spec.applies(layer)):
            continue
        attention_name = f"{name}.{spec.attention}" if name else spec.attention
        reason = _refusal(layer, spec, attention_name in swapped)
        report[attention_name] = (spec.gate, reason)
        if reason is not None:
            continue
        original = type(layer)
        layer.__class__ = _fused_class(original, spec)
        rewired.append((layer, original))
    return report


def unfuse_gates(rewired: list) -> None:
    """Give each rewired layer its own class back."""
    for layer, original in rewired:
        if type(layer) is _FUSED.get(original):
            layer.__class__ = original


_FUSED: dict[type, type] = {}


def _fused_class(cls: type, spec: _Spec) -> type:
    """A subclass of the layer's class (same name) whose forward fuses the gate; made once per class. A
    subclass rather than a forward set on the instance: transformers 5.24 checkpoints a
    GradientCheckpointingLayer through a wrapper of its class's forward (made in __init_subclass__), which
    an instance attribute would bypass and a subclass gets too (5.17 checkpoints in __call__: either works)."""
    fused = _FUSED.get(cls)
    if fused is None:
        def forward(self, *args, **kwargs):
            return _fused_forward(spec, cls, self, *args, **kwargs)

        fused = type(cls.__name__, (cls,), {
            "forward": forward, "__module__": __name__, "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__name__} with its attention gate ({spec.gate}) fused into mmfast's attention op "
                       f"(mmfast.integrations.gates); set on instances by mmfast.patch, undone by mmfast.unpatch."})
        _FUSED[cls] = fused
    return fused


def _refusal(layer: nn.Module, spec: _Spec, on_mmfast: bool) -> str | None:
    cls = type(layer).__name__
    attention = getattr(layer, spec.attention, None)
    if not isinstance(attention, nn.Module):
        return f"{cls} has no attention module {spec.attention!r}"
    if not on_mmfast:
        return f"its attention module {spec.attention} is not on the mmfast attention"
    if "forward" in vars(layer):
        return f"this {cls}'s forward is already replaced on the instance (e.g. by accelerate's hooks)"
    if _syntax(inspect.unwrap(type(layer).forward)) != _syntax(spec.template):
        return (f"{type(layer).__module__}.{type(layer).__qualname__}.forward is not the forward mmfast "
                f"reimplements (transformers 5.17 to 5.24)")
    gate = layer._parameters.get(spec.gate)
    if gate is None:
        return f"{cls} has no parameter {spec.gate}"
    if gate.numel() != 1:
        return (f"{spec.gate} has shape {tuple(gate.shape)}: the op fuses one scalar gate on the attention, this "
                f"one is applied per channel after o_proj")
    if spec.activation is not None and type(getattr(layer, spec.activation, None)) is not nn.Tanh:
        return f"{spec.activation} is {type(getattr(layer, spec.activation, None)).__name__}, not torch.nn.Tanh"
    return _o_proj_refusal(attention, spec.attention)


def _o_proj_refusal(attention: nn.Module, attention_name: str) -> str | None:
    """None when o_proj is linear without a bias, so that o_proj(tanh(gate) * x) = tanh(gate) * o_proj(x)."""
    o_proj = getattr(attention, "o_proj", None)
    base = getattr(o_proj, "base_layer", None) if hasattr(o_proj, "lora_A") else o_proj  # PEFT LoRA: linear too
    if not isinstance(base, nn.Linear):
        return f"{attention_name}.o_proj is {type(o_proj).__name__}, not a linear layer"
    if base.bias is not None or any(getattr(o_proj, "lora_bias", {}).values()):
        return (f"{attention_name}.o_proj has a bias: tanh(gate) * o_proj(x) = o_proj(tanh(gate) * x) only "
                f"without one")
    return None


def _syntax(source) -> str:
    """The function's syntax tree without docstring, annotations and decorators, cache argument as `cache`."""
    if not isinstance(source, str):
        try:
            source = inspect.getsource(source)
        except (OSError, TypeError):
            return "<no source>"
    tree = ast.parse(textwrap.dedent(source))
    function = tree.body[0]
    if not isinstance(function, ast.FunctionDef):
        return "<not a function>"
    function.decorator_list, function.returns, function.name = [], None, "forward"
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        function.body = body[1:]
    for node in ast.walk(function):
        if isinstance(node, ast.arg):
            node.annotation = None
            if node.arg == "past_key_values":
                node.arg = "cache"
        elif isinstance(node, ast.Name) and node.id == "past_key_values":
            node.id = "cache"
        elif isinstance(node, ast.keyword) and node.arg == "past_key_values":
            node.arg = "cache"
    return ast.dump(function, include_attributes=False)


def _fused_forward(spec: _Spec, cls: type, layer: nn.Module, *args, **kwargs):
    own = cls.forward  # called from inside the fused class's forward: transformers' checkpointing wraps that one
    attention = getattr(layer, spec.attention)
    if getattr(getattr(attention, "config", None), "_attn_implementation", None) != NAME \
            or _o_proj_refusal(attention, spec.attention) is not None \
            or (spec.applies is not None and not spec.applies(layer)):
        return own(layer, *args, **kwargs)  # no longer fusable: the model's own layer, gate and all
    signature = _signature(own)
    cache_name = "cache" if "cache" in signature.parameters else "past_key_values"
    for old, new in _RENAMED.items():
        if old in kwargs and old not in signature.parameters and new in signature.parameters:
            kwargs[new] = kwargs.pop(old)
    bound = signature.bind(layer, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    extra = {}
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = arguments.pop(parameter.name, {})
    if spec.own_path is not None and spec.own_path(arguments, cache_name):
        return own(layer, *args, **kwargs)
    return spec.fused(layer, arguments, extra, cache_name)


@lru_cache(maxsize=None)
def _signature(forward) -> inspect.Signature:
    return inspect.signature(inspect.unwrap(forward))


def _check_applied(layer: nn.Module, attention: str, gate: FusedGate) -> None:
    if not gate.applied:
        raise RuntimeError(f"mmfast gate fusion: {type(layer).__name__}.{attention} did not pass {GATE_KWARG} "
                           f"to the attention function, so its gate was applied nowhere; call mmfast.unpatch(model)")
