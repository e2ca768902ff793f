"""mmfast.patch / mmfast.unpatch on whole Hugging Face models (tiny, random, built from configs; no downloads).

Every comparison is against a reference model with the same weights built from its own deep copy of the
config, never patched. A second model built from the patched model's config object (the case where
transformers' sub-configs would be shared) must keep its implementation and forward. Tolerance as
tests/integrations/test_transformers.py: max |patched - reference| <= 1e-5 * max |reference| + 1e-7 (fp32).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import mmfast  # noqa: E402
from mmfast import backends, ops  # noqa: E402
from mmfast.integrations import transformers as mt  # noqa: E402
from mmfast.integrations.peft import FusedLoraLinear  # noqa: E402
from mmfast.ops import attention as attention_module  # noqa: E402
from tests.integrations.test_transformers import assert_close, blip2_config, llava_config, text_batch  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True)
def clean_report():
    mt.reset_report()
    yield
    mt.reset_report()


@pytest.fixture
def op_calls(monkeypatch):
    """Calls of the attention op and of the fused LoRA op, each with the backend requested at call time, and
    the gates the attention op was given."""
    seen = {"attention": [], "lora": [], "gated": []}
    real_attention, real_lora = attention_module.cross_modal_attention, ops.lora_linear

    def attention(*args, **kwargs):
        seen["attention"].append(backends.requested_backend(kwargs.get("backend")))
        if kwargs.get("gate") is not None:
            seen["gated"].append(kwargs["gate"])
        return real_attention(*args, **kwargs)

    def lora(*args, **kwargs):
        seen["lora"].append(backends.requested_backend(kwargs.get("backend")))
        return real_lora(*args, **kwargs)

    monkeypatch.setattr(attention_module, "cross_modal_attention", attention)
    monkeypatch.setattr(ops, "lora_linear", lora)
    return seen


def build(kind: str, config, with_peft: bool):
    torch.manual_seed(0)
    if kind == "llava":
        model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    else:
        model = transformers.Blip2ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    if with_peft:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           init_lora_weights=False))
    return model


def batch(kind: str):
    inputs = text_batch(12 if kind == "llava" else 10, 4, "right", pad_id=0 if kind == "llava" else 1)
    inputs["pixel_values"] = torch.randn(2, 3, 16, 16)
    return inputs


def step(model, inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


def assert_same_step(actual, expected):
    (out, grads), (ref_out, ref_grads) = actual, expected
    assert_close("logits", out.logits, ref_out.logits)
    assert_close("loss", out.loss, ref_out.loss)
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:
            assert grads[name] is None, name
        else:
            assert_close(f"grad {name}", grads[name], ref_grad)


def implementations(model) -> set:
    return {m.config._attn_implementation for m in model.modules() if "config" in vars(m)}


# kind -> attention modules (LLaVA: CLIP 2 + Llama 2; BLIP-2: vision 2 + Q-Former 2 x (self + cross) + OPT 2),
# LoRA layers on q_proj / v_proj (LLaVA: 4 CLIP + 4 Llama; BLIP-2: 4 OPT; BLIP-2's vision tower has a fused
# qkv and its Q-Former names them query / value), attention op calls in one forward with right padding
CASES = {"llava": (4, 8, 2 + 2 * 2), "blip2": (8, 4, 2 + 4 + 2 * 2)}


@pytest.mark.parametrize("with_peft", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("kind", list(CASES))
def test_patch_matches_unpatched_and_unpatch_restores(kind, with_peft, op_calls):
    config = llava_config() if kind == "llava" else blip2_config()
    reference = build(kind, copy.deepcopy(config), with_peft)
    model = build(kind, config, with_peft)
    model.load_state_dict(reference.state_dict())
    other = build(kind, config, False)  # shares `config` (and its sub-configs) with `model`
    n_attention, n_lora, n_calls = CASES[kind]
    inputs = batch(kind)
    expected = step(reference, inputs)
    assert not op_calls["attention"] and not op_calls["lora"]

    report = mmfast.patch(model, loss=False)
    assert len(report.attention.swapped) == n_attention and not report.attention.left_alone
    assert any("cross-attention" in detail for detail in report.attention.swapped.values()) == (kind == "blip2")
    if with_peft:
        assert len(report.lora.swapped) == n_lora and not report.lora.left_alone
        assert report.fallbacks["lora"] is report.peft.fallbacks
    else:
        assert not report.lora.swapped and report.lora.notes == ["no PEFT LoRA layer in the model"]
    assert report.loss is None
    text = str(report)
    assert "attention  mmfast" in text and "kind" in text.splitlines()[1]
    assert implementations(model) == {"mmfast"}
    assert implementations(other) == {"sdpa"} and other.config is config  # the patched model has its own copy

    assert_same_step(step(model, inputs), expected)
    assert len(op_calls["attention"]) == n_calls and not mt.report().fallbacks
    assert len(op_calls["lora"]) == (n_lora if with_peft else 0)

    op_calls["attention"].clear(), op_calls["lora"].clear()
    step(other, inputs)
    assert not op_calls["attention"] and not op_calls["lora"], "another instance went through mmfast"

    assert mmfast.unpatch(model) is report
    assert mmfast.unpatch(model) is None
    assert implementations(model) == {"sdpa"}
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())
    if with_peft:
        assert any(type(m) is peft.tuners.lora.layer.Linear for m in model.modules())
    out, grads = step(model, inputs)
    assert not op_calls["attention"] and not op_calls["lora"]
    torch.testing.assert_close(out.logits, expected[0].logits, rtol=0, atol=0)
    for name, grad in grads.items():
        assert (grad is None) == (expected[1][name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, expected[1][name], rtol=0, atol=0)


class LegacyAttention(transformers.models.clip.modeling_clip.CLIPAttention):
    """Computes attention itself, as models not yet on transformers' AttentionInterface do."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        b, n, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def test_unpatchable_reported_and_strict_raises():
    model = build("llava", llava_config(), True)
    legacy = "base_model.model.model.vision_tower.encoder.layers.0.self_attn"
    model.get_submodule(legacy).__class__ = LegacyAttention
    dora = peft.get_peft_model(build("llava", llava_config(), False),
                               peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))

    report = mmfast.patch(model, loss=False)
    assert "does not call transformers' AttentionInterface" in report.attention.left_alone[legacy]
    assert len(report.attention.swapped) == 3
    assert f"left alone  {legacy}" in str(report)
    mmfast.unpatch(model)

    with pytest.raises(ValueError, match="(?s)left alone.*attention .*layers.0.self_attn: LegacyAttention"):
        mmfast.patch(model, loss=False, strict=True)
    assert implementations(model) == {"sdpa"}  # strict unpatches before raising
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())
    with pytest.raises(ValueError, match="lora .*q_proj: .*LoRA variant"):
        mmfast.patch(dora, loss=False, strict=True)
    assert implementations(dora) == {"sdpa"}
    mmfast.patch(dora, attention=False, lora=False, loss=False, strict=True)  # nothing requested: nothing left


def test_patch_twice_and_bad_arguments():
    model = build("llava", llava_config(), False)
    with pytest.raises(TypeError, match="model: expected a transformers PreTrainedModel"):
        mmfast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend: expected one of"):
        mmfast.patch(model, backend="nope")
    mmfast.patch(model, loss=False)
    with pytest.raises(ValueError, match="already patched"):
        mmfast.patch(model, loss=False)
    mmfast.unpatch(model)


def test_from_pretrained_bf16_gradient_checkpointing_backend_pinned(tmp_path, op_calls):
    """Saved and loaded from a local directory, bf16, PEFT LoRA, gradient checkpointing, train and eval;
    backend="torch" reaches every op call, the recomputed forward of checkpointing included."""
    build("llava", llava_config(), False).save_pretrained(tmp_path)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    report = mmfast.patch(model, loss=False, backend="torch")
    assert len(report.attention.swapped) == 4 and len(report.lora.swapped) == 8
    inputs = batch("llava")
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    model.train()
    out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    forward_calls = len(op_calls["attention"])
    out.loss.backward()
    assert len(op_calls["attention"]) > forward_calls  # checkpointing ran the layers' forward again
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # LLaVA does not use the vision tower's last layer (vision_feature_layer=-2): only its adapters get none
    assert all(g is not None for n, g in grads.items() if "language_model" in n or "layers.0" in n)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    assert op_calls["lora"] and set(op_calls["attention"]) == set(op_calls["lora"]) == {"torch"}
    assert backends.requested_backend(None) == ""  # nothing left pinned outside the modules
    mmfast.unpatch(model)
    # (transformers adds output-recording hooks of its own at the first forward)
    assert not [hook for m in model.modules() for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                if "_pin_backend" in getattr(hook, "__qualname__", "")]


@pytest.mark.parametrize("kind", list(CASES))
def test_everything_patched_with_loss_and_restored(kind, op_calls):
    """patch() with its defaults (attention, lora and loss), against mmfast.integrations.losses:
    patch_loss(model, backend=) -> (patched names, {name: reason}). A fused loss may return no logits."""
    config = llava_config() if kind == "llava" else blip2_config()
    reference = build(kind, copy.deepcopy(config), True)
    model = build(kind, config, True)
    model.load_state_dict(reference.state_dict())
    inputs = batch(kind)
    expected = step(reference, inputs)
    report = mmfast.patch(model)
    assert report.attention.swapped and report.lora.swapped
    assert report.loss.swapped or report.loss.left_alone or report.loss.notes
    assert "loss" in str(report)
    out, grads = step(model, inputs)
    assert op_calls["attention"] and op_calls["lora"]
    assert_close("loss", out.loss, expected[0].loss)
    if out.logits is not None:
        assert_close("logits", out.logits, expected[0].logits)
    for name, ref_grad in expected[1].items():
        assert (grads[name] is None) == (ref_grad is None), name
        if ref_grad is not None:
            assert_close(f"grad {name}", grads[name], ref_grad)
    mmfast.unpatch(model)
    assert implementations(model) == {"sdpa"}
    out, _ = step(model, inputs)
    torch.testing.assert_close(out.logits, expected[0].logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected[0].loss, rtol=0, atol=0)


def test_import_mmfast_stays_light():
    code = "import sys, mmfast; print(callable(mmfast.patch), 'transformers' in sys.modules, 'peft' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False", "False"]


# ------------------------------------------------------------------------------ gated attention, fused


GATED_LAYERS = ("MllamaCrossAttentionDecoderLayer", "MllamaVisionEncoderLayer", "IdeficsGatedCrossAttentionLayer")


def gated_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ in GATED_LAYERS and getattr(m, "is_gated", True)]


def rewired(model) -> list:
    """The layers mmfast.patch gave the fused subclass of their class."""
    return [m for m in model.modules() if type(m).__module__ == "mmfast.integrations.gates"]


@pytest.fixture(scope="module")
def mllama():
    from tests.test_patch_convergence import build as build_model

    return build_model("mllama")  # its gates opened to 0.5, so the attention gets gradients


def mllama_inputs(labels: bool = True):
    from tests.test_patch_convergence import mllama_batches

    inputs = mllama_batches(steps=1)[0]
    return inputs if labels else {k: v for k, v in inputs.items() if k != "labels"}


def test_mllama_gates_fused_match_unpatched_and_unpatch_restores(mllama, op_calls):
    """Mllama's cross-attention layer and gated global vision layer: tanh(gate) goes into the op (counted per
    call, as the very gate parameter), the layer adds the residual; loss, logits and every gradient, the
    gates' included, as the unpatched model's; with gradient checkpointing too; unpatch gives each layer its
    own class back and the model's own results bit for bit."""
    reference, model = copy.deepcopy(mllama), copy.deepcopy(mllama)
    inputs = mllama_inputs()
    expected = step(reference, inputs)
    layers = gated_layers(model)
    classes = [type(layer) for layer in layers]
    assert len(layers) == 2 and not rewired(model)
    gates = {id(layer.cross_attn_attn_gate if hasattr(layer, "cross_attn") else layer.gate_attn) for layer in layers}

    report = mmfast.patch(model, loss=False, backend="cpu")
    assert rewired(model) == layers and all(isinstance(layer, cls) for layer, cls in zip(layers, classes))
    assert not rewired(reference) and not rewired(mllama)  # the class itself is untouched
    fused = [name for name, detail in report.attention.swapped.items() if "fused into the op" in detail]
    assert len(fused) == 2, report
    assert_same_step(step(model, inputs), expected)
    # 3 op calls: the vision layer's mask has two key sets (one call each), the cross-attention's one form
    assert len(op_calls["gated"]) == 3 and {id(g) for g in op_calls["gated"]} == gates
    assert mt.report().gated == 2 and not mt.report().fallbacks

    # Checkpointing: the decoder layer's forward runs again in the backward, fused again.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    op_calls["gated"].clear()
    assert_same_step(step(model, inputs), expected)
    assert len(op_calls["gated"]) == 3 + 1
    model.gradient_checkpointing_disable()

    # Switched back to SDPA after patch: the rewired layers run their own forward, gate and all.
    model.set_attn_implementation("sdpa")
    op_calls["attention"].clear()
    assert_same_step(step(model, inputs), expected)
    assert not op_calls["attention"]

    mmfast.unpatch(model)
    assert [type(layer) for layer in layers] == classes
    op_calls["attention"].clear()
    out, grads = step(model, inputs)
    assert not op_calls["attention"]
    torch.testing.assert_close(out.logits, expected[0].logits, rtol=0, atol=0)
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grad, expected[1][name], rtol=0, atol=0)


def test_mllama_generate_with_fused_gates(mllama, op_calls):
    """Greedy decoding: the decode step's cross-attention reads its keys from the cache, gate still fused."""
    reference, model = copy.deepcopy(mllama).eval(), copy.deepcopy(mllama).eval()
    mmfast.patch(model, backend="cpu")
    inputs = mllama_inputs(labels=False)
    options = dict(max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        expected = reference.generate(**inputs, **options)
        assert not op_calls["attention"]
        out = model.generate(**inputs, **options)
    assert torch.equal(out.sequences, expected.sequences)
    for scores, ref_scores in zip(out.scores, expected.scores):
        assert_close("scores", scores, ref_scores)
    assert mt.report().gated == 1 + 2  # the vision layer once, the cross-attention layer per step
    assert len(op_calls["gated"]) == 2 + 2  # the vision layer's two key sets
    assert not mt.report().fallbacks


class ReorderedCrossLayer(transformers.models.mllama.modeling_mllama.MllamaCrossAttentionDecoderLayer):
    """A subclass whose forward is not the one mmfast reimplements (the MLP gate applied twice, say)."""

    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states, *args, **kwargs) * 1.0


def test_gates_not_fused_say_why(mllama):
    """Each refusal leaves the layer's own forward and says why in the report; the attention is still swapped."""
    cross, vision = "model.language_model.layers.1", "model.vision_model.global_transformer.layers.0"
    model = copy.deepcopy(mllama)
    model.get_submodule(cross).__class__ = ReorderedCrossLayer
    attention = model.get_submodule(vision).self_attn
    attention.o_proj = torch.nn.Linear(attention.o_proj.in_features, attention.o_proj.out_features)  # a bias
    report = mmfast.patch(model, loss=False)
    text = report.attention.swapped
    assert text[f"{cross}.cross_attn"].endswith(
        "gate cross_attn_attn_gate applied by the model's layer, not fused: tests.test_patch.ReorderedCrossLayer."
        "forward is not the forward mmfast reimplements (transformers 5.17 to 5.24)"), text
    assert text[f"{vision}.self_attn"].endswith(
        "gate gate_attn applied by the model's layer, not fused: self_attn.o_proj has a bias: tanh(gate) * "
        "o_proj(x) = o_proj(tanh(gate) * x) only without one"), text
    assert not rewired(model)
    mmfast.unpatch(model)

    model = copy.deepcopy(mllama)
    layer = model.get_submodule(cross)
    own = layer.forward
    layer.forward = own  # as accelerate's hooks do
    report = mmfast.patch(model, loss=False)
    assert "forward is already replaced on the instance" in report.attention.swapped[f"{cross}.cross_attn"]
    assert layer.__dict__["forward"] is own and rewired(model) == [model.get_submodule(
        "model.vision_model.global_transformer.layers.0")]
    mmfast.unpatch(model)
    assert layer.__dict__["forward"] is own  # unpatch leaves what it did not set


def idefics_config(alpha_type: str = "float"):
    vision = {"embed_dim": 32, "image_size": 16, "intermediate_size": 64, "patch_size": 8, "num_hidden_layers": 2,
              "num_attention_heads": 4}
    return transformers.IdeficsConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, vision_config=vision,
                                      cross_layer_interval=1, alpha_initializer="ones", alpha_type=alpha_type,
                                      freeze_text_layers=False, freeze_vision_layers=False)


def test_idefics_v1_gate_fused_and_per_channel_gate_refused(op_calls):
    """Idefics v1's gated cross-attention: a float alpha is fused (training step as the unpatched model's,
    rows with no image zeroed by the layer as before); a per-channel ("vector") alpha cannot be, and says so."""
    torch.manual_seed(0)
    reference = transformers.IdeficsForVisionText2Text._from_config(idefics_config(), attn_implementation="sdpa")
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "alpha" in name:
                parameter.fill_(0.3)
    model = copy.deepcopy(reference)
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    image_mask = torch.ones(2, 10, 1, dtype=torch.long)
    image_mask[:, 0] = 0  # the first token attends no image: the layer zeroes its attention
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 1, 3, 16, 16),
              "image_attention_mask": image_mask, "labels": ids.masked_fill(mask == 0, -100)}
    expected = step(reference, inputs)
    report = mmfast.patch(model, loss=False, backend="cpu")
    fused = [name for name, detail in report.attention.swapped.items() if "alpha_cross_attn fused into" in detail]
    assert fused == ["model.gated_cross_attn_layers.0.cross_attn", "model.gated_cross_attn_layers.1.cross_attn"], report
    assert_same_step(step(model, inputs), expected)
    # one fused layer call each (the rows that see the image: the varlen form's two groups, so 2 op calls each)
    assert mt.report().gated == 2 and len(op_calls["gated"]) == 4 and not mt.report().fallbacks
    assert {id(gate) for gate in op_calls["gated"]} == {id(layer.alpha_cross_attn) for layer in rewired(model)}
    assert len(rewired(model)) == 2
    mmfast.unpatch(model)
    assert not rewired(model)

    vector = transformers.IdeficsForVisionText2Text._from_config(idefics_config("vector"), attn_implementation="sdpa")
    report = mmfast.patch(vector, loss=False)
    assert report.attention.swapped["model.gated_cross_attn_layers.0.cross_attn"].endswith(
        "gate alpha_cross_attn applied by the model's layer, not fused: alpha_cross_attn has shape (1, 1, 64): the "
        "op fuses one scalar gate on the attention, this one is applied per channel after o_proj")
    assert not rewired(vector)
