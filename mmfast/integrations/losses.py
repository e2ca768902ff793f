"""Model losses on mmfast's fused ops: causal-LM heads never build their (tokens × vocab) logits.

    patch_loss(model, backend=None) -> (patched names, {name: reason} for heads left alone)
    unpatch_loss(model) -> restored names

Causal-LM and conditional-generation heads (LLaVA, Idefics3, BLIP-2 with a decoder-only language
model, Llama / Qwen2 / Mistral / OPT causal LMs) compute their loss with
`mmfast.ops.linear_cross_entropy(hidden, lm_head.weight, shifted labels)` when `labels` are given.
CLIP's contrastive loss goes through `mmfast.ops.cross_entropy`.

How: the instance's `forward` is replaced (types.MethodType on that instance only, never the class)
by a wrapper that runs the model's *own* forward, with two things swapped for the length of the call:

  * `lm_head.forward` returns its input (the hidden states, after the model's own `logits_to_keep`
    slicing), so no logits are computed;
  * the model's `loss_function` (an instance-settable property in transformers) is a fused loss that
    receives those hidden states where the model passes "logits" — after the model's own slicing
    (BLIP-2 keeps the last `labels.size(1)` positions, past the query-token prefix) — and reproduces
    transformers' `ForCausalLMLoss`: labels padded with `ignore_index` and shifted by one (or
    `shift_labels` used as given), mean over the non-ignored tokens, or sum / `num_items_in_batch`
    when that is given (gradient accumulation).

So argument handling, sub-module calls, image-token merging and the output class are the model's own,
in every transformers version that keeps the `lm_head` → `loss_function` shape (5.17 … 5.24 checked
by reading; 5.24 tested). The wrapper then drops the stand-in `logits` (hidden states) from the output,
nested outputs included: with labels, `logits` is None.

Forward kwarg `return_logits=True` (accepted only by patched heads): run the model's forward unchanged
— logits returned, the model's own loss. Use it where logits are needed with labels (evaluation with
metrics). Without labels the patched forward is exactly the model's forward.

Differences from the unfused loss, by design: the scalar loss has the hidden states' dtype rounded to
float32 (`ForCausalLMLoss` upcasts the logits to float32 first, so for bf16 models the two losses
differ by bf16 rounding of the scalar; gradients are computed in float32 by the op either way).
A mean/sum loss from linear_cross_entropy can be backpropagated once (the op computes its gradients
in the forward).
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

_STATE = "_mmfast_loss_state"

# Classes whose forward was read and checked to follow `hidden → slice → lm_head → loss_function`.
_CAUSAL_LM = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "OPTForCausalLM",
    "LlavaForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "MllamaForConditionalGeneration",
}
# lm_head inside `language_model`, loss computed by the outer forward.
_NESTED_LM = {"Blip2ForConditionalGeneration"}
_CONTRASTIVE_CE = {"CLIPModel"}
_SKIP_REASONS = {
    "SiglipModel": "SigLIP's sigmoid loss is a binary cross-entropy over all pairs, not a softmax "
                   "cross-entropy: nothing in mmfast.ops fuses it",
    "Siglip2Model": "SigLIP 2's sigmoid loss is a binary cross-entropy over all pairs, not a softmax "
                    "cross-entropy: nothing in mmfast.ops fuses it",
}


def patch_loss(model: nn.Module, *, backend: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Patch every supported loss head in `model` (a PreTrainedModel or a PeftModel around one).

    Returns the names (as in model.named_modules(), "" for the model itself) of the modules whose
    forward now uses a fused loss, and {name: reason} for heads found but left alone. Patching twice
    is harmless (the module is reported again, with the new backend).
    """
    patched: list[str] = []
    skipped: dict[str, str] = {}
    covered: list[str] = []  # prefixes of patched heads: heads nested inside them are theirs
    for name, module in model.named_modules():
        if hasattr(type(module), "fused_loss"):  # mmfast's own models (mmfast.train.fusion) switch by a flag
            module.__dict__[_STATE] = {"flag": True}
            module.fused_loss = backend or True
            patched.append(name)
            continue
        if any(name.startswith(p + ".") or p == "" for p in covered):
            if _is_head(module):
                owner = next(p for p in covered if p == "" or name.startswith(p + "."))
                skipped[name] = f"inside {owner or 'the model'}, whose patched forward computes the loss"
            continue
        if not _is_head(module):
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            skipped[name] = reason
            continue
        _patch(module, backend)
        patched.append(name)
        covered.append(name)
    return patched, skipped


def unpatch_loss(model: nn.Module) -> list[str]:
    """Restore the forward of every module patch_loss patched; returns their names."""
    restored = []
    for name, module in model.named_modules():
        state = module.__dict__.get(_STATE)
        if state is None:
            continue
        if state.get("flag"):
            del module.fused_loss  # the class's default again: the plain loss
        elif state["had_instance_forward"]:
            module.forward = state["original"]
        else:
            del module.forward
        del module.__dict__[_STATE]
        restored.append(name)
    return restored


# --------------------------------------------------------------------------------------------- finding heads

def _class_name(module) -> str:
    return type(module).__name__


def _is_head(module) -> bool:
    if type(module).__module__.split(".")[0] == "peft":  # PeftModelForCausalLM & co. wrap the head, are not one
        return False
    name = _class_name(module)
    if name in _CAUSAL_LM | _NESTED_LM | _CONTRASTIVE_CE or name in _SKIP_REASONS:
        return True
    if name.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")):
        return True
    if not hasattr(module, "config") or not hasattr(module, "_modules"):
        return False
    if isinstance(module._modules.get("lm_head"), nn.Module):  # a language-model head under another name
        return True
    # Another contrastive image-text model (CLIP-like: a learned logit scale and a return_loss argument).
    return "logit_scale" in module._parameters and "return_loss" in inspect.signature(module.forward).parameters


def _unsupported_reason(module) -> str | None:
    name = _class_name(module)
    if name in _SKIP_REASONS:
        return _SKIP_REASONS[name]
    if name in _CONTRASTIVE_CE:
        return None
    if name not in _CAUSAL_LM | _NESTED_LM and "logit_scale" in module._parameters:
        return f"{name}'s contrastive loss has not been checked against CLIP's; left unfused"
    if name not in _CAUSAL_LM | _NESTED_LM:
        return (f"{name}'s forward has not been checked to compute lm_head then loss_function unchanged "
                "(logit scaling or softcapping, a different loss); left unfused")
    if name in _NESTED_LM and not getattr(module.config, "use_decoder_only_language_model", False):
        return f"{name} with an encoder-decoder language model computes its loss inside the decoder (T5); left unfused"
    lm_head = _lm_head(module)
    if type(lm_head) is not nn.Linear:
        return (f"{name}'s lm_head is a {type(lm_head).__name__}, not a plain nn.Linear (an adapter or wrapper "
                "on the head changes its output); left unfused")
    if "_loss_function" in module.__dict__:
        return f"{name} has a custom loss_function set on the instance; left as it is"
    source = _forward_source(module)
    if source is not None and ("self.loss_function(" not in source or "self.lm_head(" not in source
                               and name not in _NESTED_LM):
        return (f"this transformers version's {name}.forward does not compute lm_head then self.loss_function; "
                "left unfused")
    loss = _model_loss_function(module)
    if loss is not _causal_lm_loss():
        return f"{name}'s loss_function is {getattr(loss, '__name__', loss)!r}, not ForCausalLMLoss; left unfused"
    return None


def _forward_source(module) -> str | None:
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None


def _model_loss_function(module):
    prop = getattr(type(module), "loss_function", None)
    return prop.fget(module) if isinstance(prop, property) else getattr(module, "loss_function", None)


def _causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss
    return ForCausalLMLoss


def _lm_head(module) -> nn.Module:
    if _class_name(module) in _NESTED_LM:
        return module.language_model.lm_head
    return module.lm_head


# --------------------------------------------------------------------------------------------- patching

def _patch(module: nn.Module, backend: str | None) -> None:
    state = module.__dict__.get(_STATE)
    if state is not None:  # already patched: only the backend changes
        state["backend"] = backend
        return
    had_instance_forward = "forward" in module.__dict__
    original = module.forward
    state = {"original": original, "had_instance_forward": had_instance_forward, "backend": backend}
    impl = _contrastive_forward if _class_name(module) in _CONTRASTIVE_CE else _causal_lm_forward

    def forward(self, *args, return_logits: bool = False, **kwargs):
        return impl(self, self.__dict__[_STATE], args, kwargs, return_logits)

    # Same signature as the model's forward (Trainer reads it to pick dataset columns and to decide on
    # num_items_in_batch), plus return_logits before **kwargs.
    sig = inspect.signature(original)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, extra)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = sig.replace(parameters=[self_param, *params])
    forward.__doc__ = getattr(original, "__doc__", None)
    forward.__name__ = "forward"
    forward.__qualname__ = f"{type(module).__qualname__}.forward (mmfast fused loss)"

    module.__dict__[_STATE] = state
    module.forward = types.MethodType(forward, module)


def _bound(state, args, kwargs, name):
    try:
        return inspect.signature(state["original"]).bind_partial(*args, **kwargs).arguments.get(name)
    except TypeError:
        return kwargs.get(name)


def _causal_lm_forward(self, state, args, kwargs, return_logits):
    original = state["original"]
    labels = _bound(state, args, kwargs, "labels")
    if labels is None or return_logits:
        return original(*args, **kwargs)

    lm_head = _lm_head(self)
    captured: list[torch.Tensor] = []

    def head(hidden):  # lm_head's forward for the length of the call: no logits
        hidden = hidden.contiguous()
        captured.append(hidden)
        return hidden

    calls: list[int] = []

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **_):
        calls.append(1)
        hidden = logits  # what the model passes as logits is (a slice of) the hidden states
        if not captured or not _shares_storage(hidden, captured[-1]):
            raise RuntimeError(
                f"mmfast fused loss: {type(self).__name__} changed the logits between lm_head and its loss "
                "function; this head cannot be fused (call unpatch_loss)")
        if vocab_size != lm_head.out_features:
            raise ValueError(f"vocab_size: expected lm_head's {lm_head.out_features}, got {vocab_size}")
        if shift_labels is None:
            padded = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = padded[..., 1:]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        shift_labels = shift_labels.reshape(-1).to(hidden.device)
        if shift_labels.shape[0] != hidden.shape[0]:
            raise ValueError(f"labels: expected {hidden.shape[0]} positions to match the logits kept, "
                             f"got {shift_labels.shape[0]}")
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = ops.linear_cross_entropy(hidden, lm_head.weight, shift_labels, bias=lm_head.bias,
                                        ignore_index=ignore_index, reduction=reduction,
                                        backend=state["backend"]).float()
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    head_had = "forward" in lm_head.__dict__
    head_prev = lm_head.__dict__.get("forward")
    loss_had = "_loss_function" in self.__dict__
    loss_prev = self.__dict__.get("_loss_function")
    lm_head.forward = head
    self.loss_function = loss_function  # the property's setter stores it on the instance
    try:
        output, want_tuple = _dict_call(self, original, args, kwargs)
    finally:
        if head_had:
            lm_head.forward = head_prev
        else:
            del lm_head.forward
        if loss_had:
            self._loss_function = loss_prev
        else:
            del self._loss_function
    if len(calls) != 1:
        raise RuntimeError(f"mmfast fused loss: {type(self).__name__}.forward called its loss_function {len(calls)} "
                           "times with labels given, not once; this head cannot be fused (call unpatch_loss)")
    output = _drop_captured(output, captured)
    return output.to_tuple() if want_tuple else output


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _drop_captured(output, captured):
    """`output` without the stand-in logits (hidden states from the patched lm_head), nested outputs too.

    Only fields named `logits` are looked at: the hidden states themselves may also be in `hidden_states`.
    """
    if not captured:
        return output

    def clean(value):
        if not _is_model_output(value):
            return value
        fields = {}
        for key, item in value.items():
            if key == "logits" and torch.is_tensor(item) and any(_shares_storage(item, c) for c in captured):
                continue
            fields[key] = clean(item)
        return type(value)(**fields)

    return clean(output)


def _is_model_output(value) -> bool:
    return isinstance(value, dict) and hasattr(value, "to_tuple")


def _dict_call(self, original, args, kwargs):
    """Call `original` asking for a ModelOutput; returns it and whether the caller wanted a tuple.

    As transformers' can_return_tuple: an explicit return_dict wins, else config.return_dict.
    """
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(getattr(self, "config", None), "return_dict", True)
    if return_dict:
        return original(*args, **kwargs), False
    return original(*args, **{**kwargs, "return_dict": True}), True


# --------------------------------------------------------------------------------------------- CLIP

def _contrastive_forward(self, state, args, kwargs, return_logits):
    """CLIP: the model's forward without its loss, then the same loss through mmfast.ops.cross_entropy."""
    original = state["original"]
    return_loss = _bound(state, args, kwargs, "return_loss")
    if not return_loss:
        return original(*args, **kwargs)
    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    bound.arguments["return_loss"] = False
    output, want_tuple = _dict_call(self, original, bound.args, bound.kwargs)
    logits_per_text = output.logits_per_text
    target = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    caption_loss = ops.cross_entropy(logits_per_text, target, backend=state["backend"])
    image_loss = ops.cross_entropy(logits_per_text.t(), target, backend=state["backend"])
    loss = (caption_loss + image_loss) / 2.0
    output = type(output)(**{**dict(output.items()), "loss": loss})
    return output.to_tuple() if want_tuple else output
