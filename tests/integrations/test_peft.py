"""mmfast.integrations.peft: patched PEFT models compute what PEFT computes, and all else stays PEFT's.

Every comparison is against an unpatched deep copy of the same PEFT model, and where precision is in
question against a float64 copy too (the tolerance rule of DESIGN.md). LoRA weights start random
(init_lora_weights=False): PEFT's default B = 0 would make the adapters invisible.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from mmfast import ops  # noqa: E402
from mmfast.integrations.peft import (  # noqa: E402
    FusedLoraLinear,
    patch_peft_layer,
    patch_peft_model,
    unpatch_peft_model,
)
from tests.helpers import DEVICE, assert_within_torch_error  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]


def lora_config(**overrides) -> LoraConfig:
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return LoraConfig(**(options | overrides))


def llama_config():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def clip_vision_config():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=8)


def llama_case():
    model = transformers.LlamaForCausalLM(llama_config())
    inputs = {"inputs_embeds": torch.randn(2, 7, 64)}
    return model, inputs, "inputs_embeds", lambda out: (out.logits,)


def clip_case():
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    config = transformers.CLIPConfig(text_config=text, vision_config=clip_vision_config().to_dict(), projection_dim=16)
    model = transformers.CLIPModel(config)
    inputs = {"input_ids": torch.randint(3, 128, (2, 5)), "pixel_values": torch.randn(2, 3, 16, 16)}
    # Both towers' hidden states rather than the 2 x 2 logits: the error of a maximum over 4 numbers is luck.
    return model, inputs, "pixel_values", lambda out: (out.text_model_output.last_hidden_state,
                                                        out.vision_model_output.last_hidden_state,
                                                        out.text_embeds, out.image_embeds)


def llava_case():
    image_token = 127
    config = transformers.LlavaConfig(vision_config=clip_vision_config(), text_config=llama_config(),
                                      image_token_id=image_token)
    model = transformers.LlavaForConditionalGeneration(config)
    input_ids = torch.randint(0, image_token, (2, 10))
    input_ids[:, 1:5] = image_token  # (16 / 8) ** 2 patches per image, CLS dropped
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(2, 3, 16, 16)}
    return model, inputs, "pixel_values", lambda out: (out.logits,)


CASES = {"llama": llama_case, "clip": clip_case, "llava": llava_case}


def peft_model(case: str = "llama", dtype=torch.float32, **lora):
    """A PEFT model of `case` (seeded), its float inputs, the input to differentiate and its outputs' picker."""
    torch.manual_seed(0)
    model, inputs, grad_key, pick = CASES[case]()
    with torch.no_grad():  # CLIP initialises its biases to zero, which would hide a dropped bias
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    model = get_peft_model(model.to(DEVICE, dtype), lora_config(**lora))
    return model.eval(), {k: v.to(DEVICE) for k, v in inputs.items()}, grad_key, pick


def run(model, inputs, grad_key, pick, dtype, autocast=False):
    """Outputs, and gradients of every parameter and of inputs[grad_key] for a fixed random cotangent."""
    model.zero_grad(set_to_none=True)
    kwargs = {k: v.detach().to(dtype).requires_grad_() if k == grad_key else v for k, v in inputs.items()}
    with torch.autocast(DEVICE, torch.bfloat16) if autocast else contextlib.nullcontext():
        outputs = pick(model(**kwargs))
    generator = torch.Generator().manual_seed(1)
    # bf16-exact cotangents, so that every run differentiates against the same values
    cotangents = [torch.randn(o.shape, generator=generator).bfloat16().to(DEVICE, o.dtype) for o in outputs]
    torch.autograd.backward(outputs, cotangents)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    grads["input"] = kwargs[grad_key].grad
    return [o.detach() for o in outputs], grads


@pytest.fixture
def fused_calls(monkeypatch):
    """Records each call of the fused op, so a test can tell the fused path ran rather than PEFT's."""
    calls = []
    original = ops.lora_linear

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear", spy)
    return calls


def assert_same_outputs(model, reference, x, **kwargs):
    with torch.no_grad():
        torch.testing.assert_close(model(x, **kwargs).logits, reference(x, **kwargs).logits, rtol=1e-5, atol=1e-6)


def token_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_peft(case, mode, fused_calls):
    """bf16: a bf16 base model, whose adapters PEFT keeps in fp32. autocast: an fp32 model under bf16 autocast."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    fused, inputs, grad_key, pick = peft_model(case, dtype)
    if mode == "bf16":
        assert {p.dtype for n, p in fused.named_parameters() if "lora_" in n} == {torch.float32}
    unpatched, reference = copy.deepcopy(fused), copy.deepcopy(fused).double()
    report = patch_peft_model(fused)
    assert len(report.patched) == sum(isinstance(m, PeftLinear) for m in unpatched.modules()) > 0
    assert report.skipped == {}

    input_dtype = torch.float32 if mode == "autocast" else dtype
    got = run(fused, inputs, grad_key, pick, input_dtype, autocast=mode == "autocast")
    peft = run(unpatched, inputs, grad_key, pick, input_dtype, autocast=mode == "autocast")
    exact = run(reference, {k: v.to(input_dtype) if v.is_floating_point() else v for k, v in inputs.items()},
                grad_key, pick, torch.float64)
    assert len(fused_calls) >= len(report.patched) and not report.fallbacks

    tolerance_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    for index, (out, out_peft, out_exact) in enumerate(zip(got[0], peft[0], exact[0])):
        assert out.dtype == out_peft.dtype
        assert_within_torch_error(f"output {index}", out, out_peft, out_exact, tolerance_dtype)
    assert got[1].keys() == peft[1].keys() == exact[1].keys()
    lora = [name for name in got[1] if "lora_" in name]
    unused = 6 if case == "llava" else 0  # llava reads the vision tower's second-to-last layer
    assert len(lora) == 2 * (len(report.patched) - unused)
    for name, grad in got[1].items():
        assert grad.dtype == peft[1][name].dtype, name
        if mode == "fp32":
            scale = max(1.0, exact[1][name].abs().max().item())
            assert_within_torch_error(f"grad {name}", grad, peft[1][name], exact[1][name], tolerance_dtype, scale)
    if mode != "fp32":
        # Back through a whole bf16 model the largest error of one gradient is noise: PEFT itself, given
        # bf16 adapters instead of fp32 ones, lands up to 4x off its own error on some. The rule holds
        # on norms, of all LoRA gradients together and of the input's.
        def flat(grads):
            return torch.cat([grads[name].double().flatten() for name in lora])

        assert_norm_within_peft_error("LoRA gradients", flat(got[1]), flat(peft[1]), flat(exact[1]))
        assert_norm_within_peft_error("input gradient", got[1]["input"], peft[1]["input"], exact[1]["input"])


def assert_norm_within_peft_error(name, actual, peft, exact):
    """The relative error (in norm) vs float64 is at most 2x PEFT's plus bf16's unit roundoff."""
    def error(tensor):
        return ((tensor.double() - exact).norm() / exact.norm()).item()

    assert error(actual) <= 2 * error(peft) + 2**-8, f"{name}: error {error(actual):.2e}, PEFT's {error(peft):.2e}"


def test_dropout_applies_one_keep_mask_in_forward_and_backward():
    """With A = B = I the low-rank branch is scaling * dropout(x), so the mask can be read off the output."""
    features, p, scaling = 16, 0.5, 2.0
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(features, features)).to(DEVICE),
                           lora_config(r=features, lora_alpha=scaling * features, lora_dropout=p, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(features))
        layer.lora_B["default"].weight.copy_(torch.eye(features))
    unpatched = copy.deepcopy(model)
    patch_peft_model(model)
    weight, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x = torch.randn(64, features, device=DEVICE, requires_grad=True)

    model.train()
    torch.manual_seed(3)
    y = model(x)
    lora_part = (y - F.linear(x, weight, bias)).detach() / scaling
    kept = (lora_part - x / (1 - p)).abs() < lora_part.abs()
    torch.testing.assert_close(lora_part, kept * x.detach() / (1 - p), rtol=1e-5, atol=1e-5)
    assert 0.4 < kept.float().mean().item() < 0.6

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    dropped_x = kept * x.detach() / (1 - p)
    torch.testing.assert_close(x.grad, grad_out @ weight + scaling * kept * grad_out / (1 - p))
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, scaling * grad_out.T @ dropped_x)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, scaling * grad_out.T @ dropped_x)

    torch.manual_seed(3)
    assert torch.equal(model(x), y), "the same seed must give the same mask"
    assert not torch.equal(model(x), y), "a new draw must give a new mask"
    model.eval()
    unpatched.eval()
    torch.testing.assert_close(model(x), unpatched(x))
    torch.testing.assert_close(model(x), F.linear(x, weight, bias) + scaling * x)


def test_dropout_in_a_model_trains_only_in_training_mode(fused_calls):
    fused, inputs, grad_key, pick = peft_model("llama", lora_dropout=0.3)
    unpatched = copy.deepcopy(fused)
    patch_peft_model(fused)
    ids = token_ids()
    assert_same_outputs(fused, unpatched, ids)  # eval: no dropout, as in PEFT
    assert {call["training"] for call in fused_calls} == {False}

    eval_logits = fused(ids).logits.detach()
    fused.train()
    torch.manual_seed(5)
    logits = fused(ids).logits
    assert {call["dropout_p"] for call in fused_calls} == {0.3} and fused_calls[-1]["training"]
    assert not torch.allclose(logits, eval_logits)
    torch.manual_seed(5)
    assert torch.equal(fused(ids).logits, logits)
    logits.square().mean().backward()
    lora = [p for name, p in fused.named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0 for p in lora)


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward, as quantised and custom layers have."""

    def forward(self, x):
        return 2 * super().forward(x)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.conv1d = Conv1D(16, 16)  # GPT-2's transposed linear
        self.scaled = ScaledLinear(16, 16)
        self.linear = nn.Linear(16, 16)
        self.no_bias = nn.Linear(16, 16, bias=False)

    def forward(self, ids):
        return self.no_bias(self.linear(self.scaled(self.conv1d(self.embed(ids)))))


def toy_peft(**lora):
    torch.manual_seed(0)
    with warnings.catch_warnings():  # PEFT warns as it flips fan_in_fan_out for the Conv1D layer
        warnings.simplefilter("ignore")
        targets = ["embed", "conv1d", "scaled", "linear", "no_bias"]
        return get_peft_model(Toy().to(DEVICE), lora_config(**({"target_modules": targets} | lora)))


def toy_ids():
    return torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)


def test_report_lists_the_layers_it_declines(fused_calls):
    model = toy_peft()
    unpatched = copy.deepcopy(model)
    report = patch_peft_model(model)
    prefix = "base_model.model."
    assert report.patched == [prefix + "linear", prefix + "no_bias"]
    assert report.skipped.keys() == {prefix + "embed", prefix + "conv1d", prefix + "scaled"}
    assert "not PEFT's plain LoRA Linear" in report.skipped[prefix + "embed"]
    assert "fan_in_fan_out" in report.skipped[prefix + "conv1d"]
    assert "ScaledLinear, not a torch.nn.Linear" in report.skipped[prefix + "scaled"]
    text = str(report)
    assert "2 PEFT LoRA layers run fused, 3 keep PEFT's forward" in text
    assert all(name in text for name in report.skipped)
    ids = toy_ids()
    torch.testing.assert_close(model(ids), unpatched(ids))
    assert len(fused_calls) == 2


def test_hooks_on_bypassed_modules_keep_peft_forward(fused_calls):
    """The fused op reads the base layer's and the adapters' weights without calling those modules."""
    model = toy_peft(target_modules=["linear", "no_bias"])
    model.base_model.model.linear.base_layer.register_forward_pre_hook(lambda module, args: None)
    unpatched = copy.deepcopy(model)
    report = patch_peft_model(model)
    assert report.patched == ["base_model.model.no_bias"]
    assert "hooks" in report.skipped["base_model.model.linear"]
    hook = model.base_model.model.no_bias.lora_B["default"].register_forward_hook(lambda *args: None)
    ids = toy_ids()
    with pytest.warns(UserWarning, match="hooks"):
        torch.testing.assert_close(model(ids), unpatched(ids))
    assert fused_calls == [] and sum(report.fallbacks.values()) == 1 and "1 call(s) fell back" in str(report)
    hook.remove()
    torch.testing.assert_close(model(ids), unpatched(ids))
    assert len(fused_calls) == 1


def test_dora_layers_keep_peft_forward(fused_calls):
    model, *_ = peft_model("llama", use_dora=True, target_modules=["q_proj", "v_proj"])
    unpatched = copy.deepcopy(model)
    report = patch_peft_model(model)
    assert report.patched == [] and len(report.skipped) == 4
    assert all("DoraLinearVariant" in reason for reason in report.skipped.values())
    ids = token_ids()
    assert torch.equal(model(ids).logits, unpatched(ids).logits)
    assert fused_calls == []


def test_lora_bias_matches_peft():
    model = toy_peft(lora_bias=True, target_modules=["linear", "no_bias"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                param.normal_()
    unpatched = copy.deepcopy(model)
    assert patch_peft_model(model).skipped == {}
    ids = toy_ids()
    got, expected = model(ids), unpatched(ids)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    expected.sum().backward()
    grads = dict(unpatched.named_parameters())
    bias_grads = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name].grad, msg=name)
            bias_grads += "lora_B" in name and name.endswith("bias")
    assert bias_grads == 2


def test_switching_and_combining_adapters_as_peft_does(fused_calls):
    fused, *_ = peft_model("llama")
    fused.add_adapter("second", lora_config(r=8, lora_alpha=4, use_rslora=True))
    unpatched = copy.deepcopy(fused)
    report = patch_peft_model(fused)
    ids = token_ids()
    logits = {}
    for adapter in ("default", "second"):
        fused.set_adapter(adapter)
        unpatched.set_adapter(adapter)
        assert_same_outputs(fused, unpatched, ids)
        logits[adapter] = fused(ids).logits
    assert not torch.allclose(logits["default"], logits["second"])
    assert not report.fallbacks and len(fused_calls) == 4 * len(report.patched)

    for model in (fused, unpatched):
        model.base_model.set_adapter(["default", "second"])  # summed, as PEFT does: not fused
    with pytest.warns(UserWarning, match="several adapters active at once"):
        assert_same_outputs(fused, unpatched, ids)
    assert report.fallbacks == {"several adapters active at once": len(report.patched)}

    for model in (fused, unpatched):
        model.set_adapter("default")
    report.fallbacks.clear()
    with pytest.warns(UserWarning, match="adapter_names"):
        assert_same_outputs(fused, unpatched, ids, adapter_names=["second", "__base__"])
    assert report.fallbacks == {"adapter_names given (a batch mixing adapters)": len(report.patched)}

    for model in (fused, unpatched):  # a variant added after patching: the layer falls back per call
        torch.manual_seed(7)
        model.add_adapter("dora", lora_config(use_dora=True, target_modules=["q_proj"]))
        model.set_adapter("dora")
    report.fallbacks.clear()
    with pytest.warns(UserWarning, match="DoraLinearVariant"):
        assert_same_outputs(fused, unpatched, ids)
    assert sum(report.fallbacks.values()) == 2


def test_merged_and_disabled_adapters_behave_as_peft(fused_calls):
    fused, *_ = peft_model("llama")
    unpatched = copy.deepcopy(fused)
    report = patch_peft_model(fused)
    ids = token_ids()
    fused_logits = fused(ids).logits.detach()
    calls = len(fused_calls)

    for model in (fused, unpatched):
        model.merge_adapter()
    assert torch.equal(fused(ids).logits, unpatched(ids).logits)
    torch.testing.assert_close(fused(ids).logits, fused_logits, rtol=1e-4, atol=1e-5)
    for model in (fused, unpatched):
        model.unmerge_adapter()
    assert len(fused_calls) == calls
    with fused.disable_adapter(), unpatched.disable_adapter():
        assert torch.equal(fused(ids).logits, unpatched(ids).logits)
    assert len(fused_calls) == calls
    torch.testing.assert_close(fused(ids).logits, fused_logits)
    assert len(fused_calls) == calls + len(report.patched) and not report.fallbacks


def test_state_dict_and_saved_adapter_are_peft_s(tmp_path):
    fused, *_ = peft_model("llama", lora_dropout=0.1)
    unpatched = copy.deepcopy(fused)
    patch_peft_model(fused)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in unpatched.named_parameters()]
    state, expected = fused.state_dict(), unpatched.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)

    fused.save_pretrained(tmp_path / "fused")
    unpatched.save_pretrained(tmp_path / "peft")
    assert ((tmp_path / "fused" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fused", "peft")]
    for config in configs:
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM(llama_config()).to(DEVICE), tmp_path / "fused")
    assert_same_outputs(fused, loaded.eval(), token_ids())


def test_merge_and_unload_is_peft_s():
    fused, *_ = peft_model("llama")
    unpatched = copy.deepcopy(fused)
    patch_peft_model(fused)
    merged, expected = fused.merge_and_unload(), unpatched.merge_and_unload()
    assert not any(isinstance(m, FusedLoraLinear) for m in merged.modules())
    state, expected_state = merged.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state)
    assert all(torch.equal(state[k], expected_state[k]) for k in state)


def test_unpatch_restores_peft_layers(fused_calls):
    fused, *_ = peft_model("llama")
    unpatched = copy.deepcopy(fused)
    names = patch_peft_model(fused).patched
    layers = dict(fused.named_modules())
    assert unpatch_peft_model(fused) == names
    for name in names:
        layer, original = layers[name], dict(unpatched.named_modules())[name]
        assert type(layer) is PeftLinear and layer.forward.__func__ is PeftLinear.forward
        assert layer.__dict__.keys() == original.__dict__.keys()
    ids = token_ids()
    calls = len(fused_calls)
    assert torch.equal(fused(ids).logits, unpatched(ids).logits)
    assert len(fused_calls) == calls and unpatch_peft_model(fused) == []
    patch_peft_model(fused)  # patchable again


def test_patched_model_copies_and_pickles(fused_calls):
    fused, *_ = peft_model("llama")
    report = patch_peft_model(fused)
    ids = token_ids()
    expected = fused(ids).logits
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert sum(isinstance(m, FusedLoraLinear) for m in copied.modules()) == len(report.patched)
        calls = len(fused_calls)
        assert torch.equal(copied(ids).logits, expected)
        assert len(fused_calls) == calls + len(report.patched)


def test_patch_rejects_what_it_cannot_patch():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        patch_peft_model("model")
    with pytest.raises(ValueError, match="found none"):
        patch_peft_model(nn.Linear(2, 2))
    fused, *_ = peft_model("llama")
    patch_peft_model(fused)
    with pytest.raises(ValueError, match="already patched"):
        patch_peft_model(fused)


def test_patched_layer_reads_as_peft_s():
    """A patched layer prints as PEFT's own (PEFT's tests check that repr starts with "lora.Linear")."""
    fused, *_ = peft_model("llama")
    unpatched = copy.deepcopy(fused)
    patch_peft_model(fused)
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear)
    assert repr(layer).startswith("lora.Linear(")
    assert repr(fused) == repr(unpatched)


def test_patch_peft_layer_patches_one_layer_or_says_why_not(fused_calls):
    model = toy_peft()
    unpatched = copy.deepcopy(model)
    layers = model.base_model.model
    assert patch_peft_layer(layers.linear) is None and type(layers.linear) is FusedLoraLinear
    assert patch_peft_layer(layers.linear) is None  # already patched: left as it is
    assert "fan_in_fan_out" in patch_peft_layer(layers.conv1d) and type(layers.conv1d) is not FusedLoraLinear
    with pytest.raises(TypeError, match=r"module: expected a PEFT LoRA layer .*, got torch\.nn\.modules\.linear\.Linear"):
        patch_peft_layer(layers.linear.base_layer)
    ids = toy_ids()
    torch.testing.assert_close(model(ids), unpatched(ids))
    assert len(fused_calls) == 1  # linear only; no_bias was not handed over
    layers.linear.base_layer.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="hooks"):
        model(ids)
    assert sum(layers.linear._mmfast_fallbacks.values()) == 1  # a counter of its own when none is given
