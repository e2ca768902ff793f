"""Fine-tuning methods: the right parameters train, the rest stay frozen and unchanged, adapters start as the
identity, and saved models come back with their adapters; on the fusion model and on standard transformers
models (LLaVA-style generation, CLIP)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import mmfast
from mmfast.train import methods
from mmfast.train.fusion import FusionModel

from .test_fusion import one_thread, open_gates, tiny_bundle  # noqa: F401 (one_thread: autouse fixture)

HEAD = ("projections.", "fusion.", "head.")


def method(name, **kw):
    base = dict(name=name, top_k=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=None, adapter_size=4,
                prompt_tokens=3)
    return types.SimpleNamespace(**{**base, **kw})


def two_layer_bundle():
    """The tiny fusion bundle with 2 layers per built-in encoder (so top_k=1 leaves one frozen)."""
    bundle, samples = tiny_bundle()
    config = copy.deepcopy(bundle.model.config)
    for spec in config.encoders.values():
        spec["layers"] = 2
    torch.manual_seed(0)
    bundle.model = FusionModel(config).eval()
    open_gates(bundle.model)
    return bundle, samples


def expected_trainable(name, names):
    head = {n for n in names if n.startswith(HEAD)}
    return {
        "full": set(names),
        "head": head,
        "top_k": head | {n for n in names if ".layers.1." in n},
        "bitfit": head | {n for n in names if n.endswith(".bias")},
        "adapters": head | {n for n in names if ".mmfast_adapter." in n},
        "prompt_tuning": head | {"prompt_embeddings.weight"},
    }[name]


def step(model, batch):
    """One AdamW step (with weight decay, which would move any parameter it is given) on the trainable ones."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("name", ["full", "head", "top_k", "bitfit", "adapters", "lora", "prompt_tuning"])
def test_fusion_methods(name):
    bundle, samples = two_layer_bundle()
    batch = bundle.collate(samples[:6])
    before = bundle.model(**batch).logits.detach()
    original = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}

    model, summary = methods.apply_method(bundle, method(name))
    assert bundle.model is model
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert summary.trainable == sum(params[n].numel() for n in trainable)
    assert summary.total == sum(p.numel() for p in params.values()) and summary.method == name
    assert f"{summary.trainable:,} trainable" in str(summary)
    if name == "lora":
        assert type(model).__name__ == "PeftModel"
        lora = {n for n in trainable if ".lora_" in n}
        assert lora and all(".encoders." in n and n.split(".lora_")[0].rsplit(".", 1)[-1] in
                            ("q_proj", "k_proj", "v_proj", "o_proj", "0", "2") for n in lora)
        saved = {n for n in trainable if ".modules_to_save." in n}
        assert trainable == lora | saved
        assert {n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in saved} \
            == {"fusion", "head"}  # the built-in encoders need no projection
    else:
        assert trainable == expected_trainable(name, params)

    after_init = model(**batch).logits.detach()
    if name == "prompt_tuning":
        assert after_init.shape == before.shape
    else:  # adapters and LoRA start as the identity
        torch.testing.assert_close(after_init, before, rtol=1e-6, atol=1e-6)

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and changed <= trainable
    assert {n for n in trainable if "lora_A" not in n and "prompt" not in n} <= changed | {
        n for n in trainable if not n.endswith(("weight", "bias"))}
    if name != "full":  # frozen backbone weights: exactly the originals
        base = methods.base_state_dict(model)
        for n, value in original.items():
            if n.startswith("encoders.") and n not in trainable and n in base:
                assert torch.equal(base[n], value), n


@pytest.mark.parametrize("name", ["lora", "adapters", "prompt_tuning"])
def test_saved_methods_restore(name, tmp_path):
    from mmfast.train.bundle import load_bundle

    bundle, samples = tiny_bundle()
    open_gates(bundle.model)
    methods.apply_method(bundle, method(name))
    batch = bundle.collate(samples[:6])
    step(bundle.model, batch)
    logits = bundle.model(**batch).logits.detach()
    bundle.save(str(tmp_path / "m"))
    if name == "lora":
        assert (tmp_path / "m" / "adapter" / "adapter_config.json").exists()
        plain = FusionModel.from_pretrained(str(tmp_path / "m"))  # the root holds the plain base model
        assert not hasattr(plain, "peft_config") and type(plain.head).__name__ == "Sequential"

    loaded = load_bundle(str(tmp_path / "m"))
    model = loaded.model.eval()
    torch.testing.assert_close(model(**batch).logits, logits, rtol=0, atol=0)
    base = methods._base(model)
    if name == "adapters":
        assert base.config.mmfast_adapters["size"] == 4 and hasattr(base.encoders.text.layers[0], "mmfast_adapter")
    if name == "prompt_tuning":
        assert base.config.prompt_tokens == 3
    # re-fine-tuning the loaded model with the same method continues its adapters
    model, summary = methods.apply_method(loaded, method(name))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and summary.trainable < summary.total
    if name == "lora":
        assert any(".lora_B." in n for n in trainable)
        # another method merges the LoRA weights into the base first: same function, plain model
        merged, _ = methods.apply_method(loaded, method("full"))
        assert not hasattr(merged, "peft_config") and isinstance(merged, FusionModel)
        torch.testing.assert_close(merged.eval()(**batch).logits, logits, rtol=1e-5, atol=1e-6)


def test_lora_runs_on_the_fused_kernels():
    bundle, samples = tiny_bundle()
    open_gates(bundle.model)
    model, _ = methods.apply_method(bundle, method("lora"))
    with torch.no_grad():  # non-zero LoRA B, so the low-rank path matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    batch = bundle.collate(samples[:6])
    model.eval()
    logits = model(**batch).logits.detach()
    report = mmfast.patch(model)
    assert len(report.lora.swapped) == 18  # q, k, v, o + 2 MLP linears in each of the 3 encoders
    # 3 encoders + the fusion block twice: PEFT's trained copy (modules_to_save) and the frozen original
    assert len(report.attention.swapped) == 5 and not report.attention.left_alone
    assert "base_model.model.fusion.modules_to_save.default.blocks.0.cross_attn" in report.attention.swapped
    torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-5, atol=1e-6)
    mmfast.unpatch(model)


def test_bad_method_options():
    bundle, _ = tiny_bundle()
    with pytest.raises(ValueError, match="method.name: expected one of"):
        methods.apply_method(bundle, method("dora"))
    with pytest.raises(ValueError, match="method.top_k: expected >= 1"):
        methods.apply_method(bundle, method("top_k", top_k=0))
    with pytest.raises(ValueError, match="method.lora_targets"):
        methods.apply_method(bundle, method("lora", lora_targets=["no_such_layer"]))


# ------------------------------------------------------------------------------------------------ C2's models


def tiny_llava():
    import transformers as T

    vision = T.CLIPVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                image_size=16, patch_size=8)
    text = T.LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64)
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=39,
                           vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, 39, 39, 39, 39, 5, 6, 7], [1, 39, 39, 39, 39, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.rand(2, 3, 16, 16),
             "labels": ids.masked_fill(ids == 39, -100)}
    return model, batch


def tiny_clip():
    import transformers as T

    config = T.CLIPConfig(text_config=dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=32),
                          vision_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=32, image_size=16, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    model = T.CLIPModel(config).eval()
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.rand(2, 3, 16, 16),
             "return_loss": True}
    return model, batch


def output(model, batch):
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.logits_per_image


@pytest.mark.parametrize("build", [tiny_llava, tiny_clip])
@pytest.mark.parametrize("name", ["head", "top_k", "bitfit", "adapters", "lora"])
def test_methods_on_transformers_models(build, name):
    model, batch = build()
    head_prefix = ("model.multi_modal_projector.",) if build is tiny_llava else \
        ("visual_projection.", "text_projection.", "logit_scale")
    stacks = ("model.vision_tower.", "model.language_model.") if build is tiny_llava else \
        ("vision_model.", "text_model.")
    before = output(model, batch).detach()
    model, summary = methods.apply_method(model, method(name))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    head = {n for n in params if n.startswith(head_prefix)}
    if name == "lora":
        lora = {n for n in trainable if ".lora_" in n}
        assert lora and all(any(n.startswith("base_model.model." + s) for s in stacks) for n in lora)
        assert all(".modules_to_save." in n or n.endswith("logit_scale") for n in trainable - lora)
    else:
        extra = {"head": set(), "top_k": {n for n in params if n.startswith(stacks) and ".layers.1." in n},
                 "bitfit": {n for n in params if n.endswith(".bias")},
                 "adapters": {n for n in params if ".mmfast_adapter." in n}}[name]
        assert trainable == head | extra and head
        if name == "adapters":
            assert len({n.split(".mmfast_adapter.")[0] for n in extra}) == 4  # 2 layers x 2 stacks
    torch.testing.assert_close(output(model, batch), before, rtol=1e-6, atol=1e-6)
    assert summary.trainable == sum(params[n].numel() for n in trainable)

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and changed <= trainable


def test_prompt_tuning_on_transformers_models():
    model, batch = tiny_llava()
    wrapped, summary = methods.apply_method(model, method("prompt_tuning"))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert "prompt_encoder.default.embedding.weight" in trainable
    assert all("prompt_encoder" in n or "multi_modal_projector" in n for n in trainable)
    out = wrapped(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] + 3  # the virtual tokens come first
    out.loss.backward()
    assert wrapped.prompt_encoder.default.embedding.weight.grad.abs().sum() > 0

    clip, _ = tiny_clip()
    with pytest.raises(ValueError, match="method.name prompt_tuning: CLIPModel"):
        methods.apply_method(clip, method("prompt_tuning"))


def test_adapters_on_transformers_models_save_and_restore(tmp_path):
    from transformers import CLIPModel

    model, batch = tiny_clip()
    methods.apply_method(model, method("adapters"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mmfast_adapter.up." in n:
                p.normal_(std=0.1)
    logits = output(model, batch).detach()
    methods.save_model(model, tmp_path / "m")
    loaded = methods.restore(CLIPModel.from_pretrained(str(tmp_path / "m")), tmp_path / "m").eval()
    torch.testing.assert_close(output(loaded, batch), logits, rtol=0, atol=0)
