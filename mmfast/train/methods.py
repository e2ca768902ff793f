"""Fine-tuning methods: which parameters train, and the modules some methods add.

    model, summary = apply_method(bundle_or_model, cfg.method)     # print(summary): trainable / total parameters
    save_model(model, directory)                                   # base weights (+ PEFT adapter files)
    model = restore(Model.from_pretrained(directory), directory)   # + bottleneck adapters, + PEFT adapters

Every model is split into the "head" and the backbone. The head is what the task adds on top of the
pretrained parts, freshly initialised: for the fusion model the projections, the fusion blocks with their
queries, and the classifier (fusion.HEAD_MODULES); for other models Bundle.head_modules, else modules named
like a task head (multi_modal_projector, visual_projection / text_projection + logit_scale, classifier,
score). The backbone's "layer stacks" are its ModuleLists named layers / layer / h / blocks (the encoders'
transformer layers; the fusion blocks belong to the head).

    full           everything trains
    head           the head only
    top_k          the head + the last k layers of every layer stack
    bitfit         the head + every bias
    lora           PEFT LoRA (r, alpha, dropout) on the backbone's attention/MLP nn.Linear layers (those inside
                   the layer stacks, or method.lora_targets); the head trains fully as PEFT modules_to_save
    adapters       Houlsby bottleneck adapters (down-project, GELU, up-project, residual; up-projection zero at
                   init, so the model is unchanged at the start) after every layer of every stack; adapters +
                   head train
    prompt_tuning  fusion model: method.prompt_tokens learned embeddings prepended to the text encoder's input
                   (to the fusion queries when the model has no text): PEFT's prompt tuning cannot wrap it (it
                   guesses the word embeddings from the first PreTrainedModel inside, which may be the image
                   encoder, and needs inputs_embeds on the outer forward); prompts + head train.
                   Causal LMs / LLaVA-style models: PEFT PromptTuningConfig (CAUSAL_LM); prompts + head train.
                   Other models (CLIP): ValueError.

The head trains under every method, because it is randomly initialised. (A fusion model's fusion blocks are
part of it: frozen at their zero-initialised gates they would pass no image or audio through at all.)
Frozen parameters have requires_grad False, so the optimizer skips them and they stay exactly as they were.

Saving: bottleneck adapters are submodules of the layers they follow (`<layer>.mmfast_adapter`, applied by a
forward hook), so their weights are in the model's own state dict; config.mmfast_adapters records where they
are, and restore() re-inserts them and loads their weights after from_pretrained. PEFT models: save_model
writes the base model without PEFT's injected layers (as the plain architecture, modules_to_save with their
trained values) plus PEFT's adapter_config.json / adapter_model.safetensors in adapter/; restore() wraps the
model again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["METHODS", "BottleneckAdapter", "MethodSummary", "add_adapters", "apply_method", "base_state_dict",
           "head_parameter_names", "layer_stacks", "restore", "save_model", "share_configs", "summarize"]

METHODS = ("full", "top_k", "head", "lora", "adapters", "prompt_tuning", "bitfit")
ADAPTER = "mmfast_adapter"
PEFT_DIR = "adapter"  # PEFT's adapter files, in a subdirectory of the model directory (see save_model)
STACK_NAMES = ("layers", "layer", "h", "blocks")
HEAD_NAMES = ("multi_modal_projector", "visual_projection", "text_projection", "classifier", "score")
HEAD_PARAMETERS = ("logit_scale", "logit_bias")


@dataclass
class MethodSummary:
    method: str
    trainable: int
    total: int
    details: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        text = (f"method {self.method}: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({self.percent:.2f}%)")
        return text + (f"; {self.details}" if self.details else "")


def _get(cfg, key, default=None):
    return getattr(cfg, key, default) if not isinstance(cfg, dict) else cfg.get(key, default)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft(model) else model


# ------------------------------------------------------------------------------------------------ structure


def head_parameter_names(model: nn.Module, head_modules=None) -> set[str]:
    """Names (as model.named_parameters() spells them) of the head's parameters; see the module doc."""
    from .fusion import HEAD_MODULES, FusionModel

    base = _base(model)
    if head_modules is None:
        head_modules = list(getattr(base, "_mmfast_head_modules", []) or [])
    if not head_modules and isinstance(base, FusionModel):
        head_modules = list(HEAD_MODULES)
    prefixes = list(head_modules)
    if not prefixes:
        prefixes = [name for name, _ in base.named_modules() if name.rpartition(".")[2] in HEAD_NAMES]
        prefixes += [name for name, _ in base.named_parameters() if name.rpartition(".")[2] in HEAD_PARAMETERS
                     and "." not in name]
    names = set()
    for name, _ in base.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            names.add(name)
    return names


def layer_stacks(model: nn.Module, exclude: set[str] | None = None) -> dict[str, list[str]]:
    """{stack name: [layer names]} of the backbone: outermost ModuleLists named layers / layer / h / blocks whose
    parameters are not in `exclude` (the head)."""
    base = _base(model)
    exclude = exclude or set()
    stacks: dict[str, list[str]] = {}
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or name.rpartition(".")[2] not in STACK_NAMES:
            continue
        if any(name.startswith(s + ".") for s in stacks):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and all(p in exclude for p in params):
            continue
        stacks[name] = [f"{name}.{i}" for i in range(len(module))]
    return stacks


def summarize(model: nn.Module, method: str, details: str = "") -> MethodSummary:
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return MethodSummary(method, trainable, total, details)


def _set_trainable(model: nn.Module, names: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def _within(names, prefixes) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


# ------------------------------------------------------------------------------------------------ adapters


class BottleneckAdapter(nn.Module):
    """Houlsby adapter: h + up(gelu(down(h))), up zero-initialised so a fresh adapter is the identity."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.up(F.gelu(self.down(hidden)))


def _adapter_hook(module: nn.Module, args, output):
    # The adapter is looked up on the module (no closure), so copies of the model carry their own adapters.
    adapter = module._modules[ADAPTER]
    if isinstance(output, Tensor):
        return adapter(output)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (adapter(output[0]), *output[1:])
    if hasattr(output, "last_hidden_state") and output.last_hidden_state is not None:
        output.last_hidden_state = adapter(output.last_hidden_state)
        return output
    raise TypeError(f"bottleneck adapter after {type(module).__name__}: cannot find the hidden states in its output "
                    f"of type {type(output).__name__}")


def _layer_width(layer: nn.Module, name: str) -> int:
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"method adapters: layer {name} ({type(layer).__name__}) has no nn.Linear to read its "
                         "width from")
    return linears[-1].out_features  # the MLP's output projection: the layer's hidden size


def add_adapters(model: nn.Module, size: int, layers: list[str]) -> list[str]:
    """Insert a BottleneckAdapter after each named layer (skipping layers that already have one); records them in
    config.mmfast_adapters. Returns the adapter parameter names."""
    base = _base(model)
    modules = dict(base.named_modules())
    ref = next(base.parameters())
    for name in layers:
        if name not in modules:
            raise ValueError(f"method adapters: no layer {name!r} in {type(base).__name__}")
        layer = modules[name]
        if ADAPTER in layer._modules:
            continue
        adapter = BottleneckAdapter(_layer_width(layer, name), size).to(device=ref.device, dtype=ref.dtype)
        layer.add_module(ADAPTER, adapter)
        layer.register_forward_hook(_adapter_hook)
    base.config.mmfast_adapters = {"size": int(size), "layers": list(layers)}
    return [n for n, _ in base.named_parameters() if f".{ADAPTER}." in n]


# ------------------------------------------------------------------------------------------------ apply


def apply_method(target, method_cfg):
    """(model, MethodSummary): `target` (a Bundle, or a model) prepared for method_cfg.name; see the module doc.

    method_cfg: the method section (name, top_k, lora_r, lora_alpha, lora_dropout, lora_targets, adapter_size,
    prompt_tokens). With a Bundle, bundle.model becomes the returned model (PEFT methods wrap it) and
    bundle.head_modules names the head. A PEFT model (a saved LoRA / prompt-tuned model loaded for
    re-fine-tuning) keeps its adapters under the same method; another method merges LoRA into the weights first.
    """
    bundle = target if hasattr(target, "model") and hasattr(target, "collate") else None
    model = bundle.model if bundle is not None else target
    head_modules = (getattr(bundle, "head_modules", None) or None) if bundle is not None else None
    name = _get(method_cfg, "name")
    if name not in METHODS:
        raise ValueError(f"method.name: expected one of {', '.join(METHODS)}, got {name!r}")
    if _is_peft(model):
        model = _reuse_peft(model, name)
        if _is_peft(model):
            head = head_parameter_names(model, head_modules)
            peft_names = {n for n, p in model.named_parameters() if p.requires_grad}
            for n, p in _base(model).named_parameters():
                if n in head:
                    p.requires_grad_(True)
            summary = summarize(model, name, f"continuing the saved PEFT {name} adapters ({len(peft_names)} tensors)")
            if bundle is not None:
                bundle.model = model
            return model, summary

    head = head_parameter_names(model, head_modules)
    all_names = {n for n, _ in model.named_parameters()}
    if name != "full" and not head:
        raise ValueError(f"method.name {name}: no head modules found in {type(model).__name__} (set "
                         "Bundle.head_modules or model._mmfast_head_modules to the names of its task head)")
    details = ""
    if name == "full":
        _set_trainable(model, all_names)
    elif name == "head":
        _set_trainable(model, head)
        details = "head only"
    elif name == "top_k":
        k = int(_get(method_cfg, "top_k", 1))
        if k < 1:
            raise ValueError(f"method.top_k: expected >= 1, got {k}")
        stacks = layer_stacks(model, head)
        top = [layer for layers in stacks.values() for layer in layers[-k:]]
        _set_trainable(model, head | _within(all_names, top))
        details = f"head + top {k} layer(s) of {len(stacks)} stack(s)"
    elif name == "bitfit":
        biases = {n for n in all_names if n.rpartition(".")[2] == "bias"}
        _set_trainable(model, head | biases)
        details = "head + biases"
    elif name == "adapters":
        size = int(_get(method_cfg, "adapter_size", 16))
        if size < 1:
            raise ValueError(f"method.adapter_size: expected >= 1, got {size}")
        stacks = layer_stacks(model, head)
        layers = [layer for stack in stacks.values() for layer in stack]
        if not layers:
            raise ValueError(f"method adapters: {type(model).__name__} has no layer stack (ModuleList named "
                             f"{' / '.join(STACK_NAMES)}) outside its head")
        adapters = set(add_adapters(model, size, layers))
        _set_trainable(model, head | adapters)
        details = f"{len(layers)} bottleneck adapters of size {size} + head"
    elif name == "lora":
        model, details = _lora(model, method_cfg, head)
    else:
        model, details = _prompt_tuning(model, method_cfg, head)
    summary = summarize(model, name, details)
    if bundle is not None:
        bundle.model = model
    return model, summary


def _reuse_peft(model, name: str):
    """A loaded PEFT model: kept for its own method; LoRA merged into the base for another method."""
    peft_type = str(getattr(model.peft_config[model.active_adapter], "peft_type", "")).upper()
    same = (name == "lora" and "LORA" in peft_type) or (name == "prompt_tuning" and "PROMPT_TUNING" in peft_type)
    if same:
        return model
    if "LORA" in peft_type:
        return model.merge_and_unload()
    raise ValueError(f"method.name {name}: the model carries PEFT {peft_type} adapters, which cannot be merged into "
                     f"its weights; re-fine-tune it with method.name prompt_tuning")


def _is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) and hasattr(model, "generate")


def _module_names(model: nn.Module, head_params: set[str]) -> list[str]:
    """Top-most modules that hold exactly head parameters (modules_to_save); parameters directly on the model
    (CLIP's logit_scale) are not modules and are returned separately by the caller."""
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for param in sorted(head_params):
        owner = param.rpartition(".")[0]
        if not owner:
            continue
        # climb while the parent's parameters are all head parameters
        while "." in owner:
            parent = owner.rpartition(".")[0]
            names = {f"{parent}.{n}" for n, _ in modules[parent].named_parameters()}
            if not names <= head_params:
                break
            owner = parent
        if owner not in chosen and not any(owner.startswith(c + ".") for c in chosen):
            chosen = [c for c in chosen if not c.startswith(owner + ".")] + [owner]
    return chosen


def _lora(model: nn.Module, method_cfg, head: set[str]):
    from peft import LoraConfig, get_peft_model

    targets = _get(method_cfg, "lora_targets")
    if targets:
        targets = list(targets)
    else:
        stacks = layer_stacks(model, head)
        inside = [layer for stack in stacks.values() for layer in stack]
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and any(n.startswith(layer + ".") for layer in inside) and ADAPTER not in n]
        if not targets:
            raise ValueError(f"method lora: no nn.Linear inside {type(model).__name__}'s layer stacks; set "
                             "method.lora_targets")
    to_save = _module_names(model, head)
    loose = {n for n in head if "." not in n}  # parameters on the model itself (logit_scale)
    config = LoraConfig(r=int(_get(method_cfg, "lora_r", 8)), lora_alpha=_get(method_cfg, "lora_alpha", 16),
                        lora_dropout=float(_get(method_cfg, "lora_dropout", 0.0)), target_modules=targets,
                        modules_to_save=to_save or None, task_type="CAUSAL_LM" if _is_causal_lm(model) else None)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"method.lora_targets {targets if _get(method_cfg, 'lora_targets') else '(default)'}: "
                         f"{exc}") from None
    share_configs(wrapped)
    for n, p in _base(wrapped).named_parameters():
        if n in loose:
            p.requires_grad_(True)  # saved with the base weights (save_model writes their current values)
    return wrapped, f"LoRA r={config.r} on {len(targets)} linear layer(s); head trained fully ({', '.join(to_save)})"


def _prompt_tuning(model: nn.Module, method_cfg, head: set[str]):
    from .fusion import FusionModel

    count = int(_get(method_cfg, "prompt_tokens", 8))
    if isinstance(model, FusionModel):
        if model.prompt_embeddings is None:
            model.enable_prompts(count)
        names = {n for n, _ in model.named_parameters() if n.startswith("prompt_embeddings.")}
        _set_trainable(model, head | names)
        where = "the text encoder's input" if "text" in model.encoders else "the fusion queries"
        return model, f"{model.config.prompt_tokens} prompt tokens before {where} (mmfast) + head"
    if not _is_causal_lm(model):
        raise ValueError(f"method.name prompt_tuning: {type(model).__name__} takes no inputs_embeds with prompts "
                         "(PEFT prompt tuning needs a causal LM); use lora, adapters, bitfit, top_k, head or full")
    from peft import PromptTuningConfig, get_peft_model

    wrapped = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=count))
    for n, p in _base(wrapped).named_parameters():
        if n in head:
            p.requires_grad_(True)  # saved with the base weights (save_model writes their current values)
    return wrapped, f"PEFT prompt tuning, {count} virtual tokens + head"


def share_configs(model: nn.Module) -> None:
    """Point the modules of PEFT's modules_to_save copies back at the configs their originals use.

    PEFT deep-copies each modules_to_save module, and with it every config object its submodules refer to (an
    attention layer's `config`). The copy is the one that runs, and set_attn_implementation (so mmfast.patch)
    only switches the model's own configs: without this the trained copy would stay on SDPA when patched.
    """
    from peft.utils import ModulesToSaveWrapper
    from transformers import PretrainedConfig

    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        originals = dict(wrapper.original_module.named_modules())
        for copy_module in wrapper.modules_to_save.values():
            for name, module in copy_module.named_modules():
                original = originals.get(name)
                for key, value in list(vars(module).items()):
                    if isinstance(value, PretrainedConfig) and original is not None:
                        shared = vars(original).get(key)
                        if isinstance(shared, PretrainedConfig):
                            module.__dict__[key] = shared


# ------------------------------------------------------------------------------------------------ save / restore


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's state dict with its own parameter names: without PEFT's injected tensors (lora_A/B, prompt
    encoder), base_layer unwrapped, modules_to_save as their trained copies. A plain model: its state_dict()."""
    if not _is_peft(model):
        return model.state_dict()
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    modules = dict(base.named_modules())
    tuners = [n for n, m in modules.items() if isinstance(m, BaseTunerLayer)]
    wrapped = {n: m for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper)}
    state = {}
    for key, value in base.state_dict().items():
        owner = next((w for w in wrapped if key.startswith(w + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            trained = f"modules_to_save.{wrapped[owner].active_adapter}."
            if isinstance(wrapped[owner].active_adapter, list):
                trained = f"modules_to_save.{wrapped[owner].active_adapter[0]}."
            if rest.startswith(trained):
                state[f"{owner}.{rest[len(trained):]}"] = value
            continue
        owner = next((t for t in tuners if key.startswith(t + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if not rest.startswith("base_layer."):
                continue  # an adapter tensor: in PEFT's adapter file
            key = f"{owner}.{rest[len('base_layer.'):]}"
        state[key] = value
    return state


def save_model(model: nn.Module, directory) -> None:
    """config.json + model.safetensors of the base model (bottleneck adapters included, recorded in the config),
    plus PEFT's adapter_config.json + adapter_model.safetensors in directory/adapter/ when the model is a
    PeftModel. Not at the root: there transformers' from_pretrained(directory) would inject the adapters into the
    base model itself (its PEFT integration looks for adapter_config.json), and restore() would wrap them twice."""
    directory = Path(directory)
    base = _base(model)
    base.save_pretrained(str(directory), state_dict=base_state_dict(model))
    if _is_peft(model):
        model.save_pretrained(str(directory / PEFT_DIR))


def restore(model: nn.Module, directory) -> nn.Module:
    """A model loaded with from_pretrained(directory), completed with what save_model wrote beside the base
    weights: bottleneck adapters (config.mmfast_adapters; weights from the checkpoint) and PEFT adapters
    (adapter/adapter_config.json; trainable, so --init-from can continue training them)."""
    directory = Path(directory)
    record = getattr(model.config, "mmfast_adapters", None)
    if record:
        names = add_adapters(model, record["size"], record["layers"])
        state = _read_checkpoint(directory, names)
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"{directory}: config.mmfast_adapters lists adapters whose weights are not in the "
                             f"checkpoint: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(state[n])
    if (directory / PEFT_DIR / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        adapter = str(directory / PEFT_DIR)
        # PEFT refuses is_trainable=True for prompt-learning adapters; their prompt encoder is made trainable
        # by hand instead, so that --init-from continues training them too.
        prompt_learning = PeftConfig.from_pretrained(adapter).is_prompt_learning
        model = PeftModel.from_pretrained(model, adapter, is_trainable=not prompt_learning)
        if prompt_learning:
            for parameter in model.prompt_encoder.parameters():
                parameter.requires_grad_(True)
        share_configs(model)
    return model


def _read_checkpoint(directory: Path, names: list[str]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():  # a sharded checkpoint
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    wanted, state = set(names), {}
    for file in files:
        path = directory / file
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (the model's weights)")
        state.update({k: v for k, v in load_file(str(path)).items() if k in wanted})
    return state
