"""mmfast.integrations.losses: patched heads compute the model's own loss without building logits.

Each case is a tiny random model built from a config (no downloads). Patched and unpatched copies share
the same weights (model AND config deep-copied: sub-configs can be shared between models built from one
config object); the same batch (labels with -100 and padding) must give the same loss and the same
gradient for every parameter, to fp32 precision.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from mmfast import ops  # noqa: E402
from mmfast.integrations.losses import patch_loss, unpatch_loss  # noqa: E402

V = 151  # odd vocabulary, distinct from every token count below
B, T = 2, 11


def text_config(cls=transformers.LlamaConfig, **extra):
    options = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return cls(**(options | extra))


def clip_vision_config():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=16, patch_size=8)


def text_batch(generator, image_token=None, n_image=0):
    input_ids = torch.randint(3, V - 5, (B, T), generator=generator)
    if n_image:
        input_ids[:, 1:1 + n_image] = image_token
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding on the second row
    input_ids[1, -3:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[:, : 1 + n_image] = -100  # prompt and image positions
    labels[0, 7] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def causal_case(cls_name, config_cls):
    def build(generator):
        model = getattr(transformers, cls_name)(text_config(config_cls))
        return model, text_batch(generator)
    return build


def llava_case(generator):
    image_token = V - 2
    config = transformers.LlavaConfig(vision_config=clip_vision_config(), text_config=text_config(),
                                      image_token_index=image_token, vision_feature_layer=-1)
    model = transformers.LlavaForConditionalGeneration(config)
    batch = text_batch(generator, image_token, n_image=4)  # (16 / 8)² patches, CLS dropped
    batch["pixel_values"] = torch.randn(B, 3, 16, 16, generator=generator)
    return model, batch


def blip2_case(generator, language_config=None):
    """BLIP-2 with an OPT decoder, or with `language_config` (a Llama one) in its place."""
    image_token = V - 2
    n_query = 3
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8),
        qformer_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, encoder_hidden_size=32),
        text_config=(language_config or transformers.OPTConfig(
            vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
            word_embed_proj_dim=32, pad_token_id=0, max_position_embeddings=64)).to_dict(),
        num_query_tokens=n_query, image_token_index=image_token)
    model = transformers.Blip2ForConditionalGeneration(config)
    batch = text_batch(generator, image_token, n_image=n_query)
    # Labels as long as input_ids (query-token positions -100): transformers 5.24 slices the logits to the
    # last labels.size(1) positions and then .view()s them, which fails for shorter labels with B > 1.
    batch["pixel_values"] = torch.randn(B, 3, 16, 16, generator=generator)
    return model, batch


def idefics3_case(generator):
    image_token = V - 2
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8),
        text_config=text_config().to_dict(), image_token_id=image_token, scale_factor=1)
    model = transformers.Idefics3ForConditionalGeneration(config)
    n_image = (16 // 8) ** 2  # patches per image / scale_factor²
    batch = text_batch(generator, image_token, n_image=n_image)
    batch["pixel_values"] = torch.randn(B, 1, 3, 16, 16, generator=generator)
    return model, batch


CASES = {
    "llama": causal_case("LlamaForCausalLM", transformers.LlamaConfig),
    "qwen2": causal_case("Qwen2ForCausalLM", transformers.Qwen2Config),
    "mistral": causal_case("MistralForCausalLM", transformers.MistralConfig),
    "llava": llava_case,
    "blip2-opt": blip2_case,
    "blip2-llama": lambda generator: blip2_case(generator, text_config()),
    "idefics3": idefics3_case,
}


def twins(case):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, batch = CASES[case](generator)
    model.eval()  # no dropout; gradients still flow
    other = copy.deepcopy(model)
    other.config = copy.deepcopy(model.config)
    return model, other, batch


def loss_and_grads(model, batch, **extra):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_rel(actual, expected, rel=1e-5, what="", floor=1e-12):
    err = (actual.double() - expected.double()).norm()
    assert err <= rel * expected.double().norm() + floor, f"{what}: relative error {err / expected.double().norm():.3g}"


def assert_grads_close(grads, expected, rel=1e-5):
    """Each parameter's gradient within `rel` of its norm, with a floor of `rel` × the whole gradient's norm:
    gradients that are zero in exact arithmetic (a key bias under softmax) are pure rounding noise."""
    assert grads.keys() == expected.keys()
    total = torch.stack([g.double().norm() for g in expected.values()]).norm()
    for name, grad in grads.items():
        assert_close_rel(grad, expected[name], rel, name, floor=rel * float(total))


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_matches_model(case, monkeypatch):
    reference, patched_model, batch = twins(case)
    patched, skipped = patch_loss(patched_model)
    assert patched == [""], (patched, skipped)

    calls = []
    real = ops.linear_cross_entropy
    monkeypatch.setattr(ops, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))

    detector = ShapeRecorder()
    with detector:
        expected, expected_grads = loss_and_grads(reference, batch)
    tokens = batch["input_ids"].numel()
    assert any(V in s and tokens in s for s in detector.shapes)  # the detector sees the unfused logits
    recorder = ShapeRecorder()
    with recorder:
        out, grads = loss_and_grads(patched_model, batch)
    assert calls == [1]
    assert out.logits is None
    big = [s for s in recorder.shapes if V in s and (tokens in s or tokens - B in s)]
    assert not big, f"(tokens, vocab) tensors were built: {big}"
    assert_close_rel(out.loss, expected.loss, what="loss")
    assert out.loss.dtype == expected.loss.dtype
    assert_grads_close(grads, expected_grads)
    assert type(out) is type(expected)

    # Gradient accumulation: sum / num_items_in_batch.
    n = torch.tensor(37)
    expected, expected_grads = loss_and_grads(reference, batch, num_items_in_batch=n)
    out, grads = loss_and_grads(patched_model, batch, num_items_in_batch=n)
    assert_close_rel(out.loss, expected.loss, what="loss with num_items_in_batch")
    assert_grads_close(grads, expected_grads)

    # No labels: exactly the model's forward.
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(patched_model(**no_labels).logits, reference(**no_labels).logits, rtol=0, atol=0)
        # return_logits=True: the model's own forward, logits and loss.
        full = patched_model(**batch, return_logits=True)
        ref = reference(**batch)
        torch.testing.assert_close(full.logits, ref.logits, rtol=0, atol=0)
        torch.testing.assert_close(full.loss, ref.loss, rtol=0, atol=0)
        # return_dict=False: the same tuple the model gives, without logits.
        as_tuple = patched_model(**batch, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], ref.loss, rtol=1e-5, atol=0)

    # Only this instance was patched; unpatch restores the class's forward.
    assert "forward" not in reference.__dict__
    assert unpatch_loss(patched_model) == [""]
    assert "forward" not in patched_model.__dict__
    with torch.no_grad():
        assert patched_model(**batch).logits is not None


def test_logits_to_keep_and_shift_labels():
    reference, patched_model, batch = twins("llama")
    patch_loss(patched_model)
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    keep = 6  # loss over the last 6 positions, labels given already shifted
    extra = dict(logits_to_keep=keep, shift_labels=shift[:, -keep:].contiguous())
    expected, expected_grads = loss_and_grads(reference, batch, **extra)
    out, grads = loss_and_grads(patched_model, batch, **extra)
    assert out.logits is None
    assert_close_rel(out.loss, expected.loss, what="loss")
    assert_grads_close(grads, expected_grads)


def test_positional_labels_and_signature():
    import inspect
    reference, patched_model, batch = twins("llama")
    patch_loss(patched_model)
    params = inspect.signature(patched_model.forward).parameters
    assert list(inspect.signature(reference.forward).parameters) == [p for p in params if p != "return_logits"]
    assert params["return_logits"].kind is inspect.Parameter.KEYWORD_ONLY
    with torch.no_grad():
        out = patched_model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        assert out.logits is None
        torch.testing.assert_close(out.loss, reference(**batch).loss, rtol=1e-5, atol=0)


def test_clip_contrastive_loss_uses_cross_entropy(monkeypatch):
    text = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    config = transformers.CLIPConfig(text_config=text, vision_config=clip_vision_config().to_dict(),
                                     projection_dim=16)
    torch.manual_seed(0)
    reference = transformers.CLIPModel(config).eval()
    model = copy.deepcopy(reference)
    model.config = copy.deepcopy(reference.config)
    assert patch_loss(model) == ([""], {})
    calls = []
    real = ops.cross_entropy
    monkeypatch.setattr(ops, "cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = {"input_ids": torch.randint(3, V, (3, 7)), "pixel_values": torch.randn(3, 3, 16, 16), "return_loss": True}
    expected, expected_grads = loss_and_grads(reference, batch)
    out, grads = loss_and_grads(model, batch)
    assert len(calls) == 2
    assert_close_rel(out.loss, expected.loss, what="loss")
    assert_grads_close(grads, expected_grads)
    torch.testing.assert_close(out.logits_per_image, expected.logits_per_image)
    tup = model(**batch, return_dict=False)
    assert len(tup) == len(expected.to_tuple())
    assert unpatch_loss(model) == [""]


def test_siglip_and_unknown_heads_are_reported():
    siglip = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8)))
    patched, skipped = patch_loss(siglip)
    assert patched == [] and "sigmoid" in skipped[""]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4))
    patched, skipped = patch_loss(gpt2)
    assert patched == [] and "not been checked" in skipped[""]
    assert "forward" not in gpt2.__dict__


def test_blip2_nested_language_model_is_reported_not_patched():
    _, model, _ = twins("blip2-opt")
    patched, skipped = patch_loss(model)
    assert patched == [""]
    assert "language_model" in skipped and "patched forward" in skipped["language_model"]
    assert "forward" not in model.language_model.__dict__


def test_peft_model_and_other_instances():
    peft = pytest.importorskip("peft")
    reference, model, batch = twins("llama")
    untouched = copy.deepcopy(reference)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_ref = peft.get_peft_model(reference, config)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(model, copy.deepcopy(config))
    peft_model.load_state_dict(peft_ref.state_dict())
    patched, skipped = patch_loss(peft_model)
    assert (patched, skipped) == (["base_model.model"], {})
    expected, expected_grads = loss_and_grads(peft_ref, batch)
    out, grads = loss_and_grads(peft_model, batch)
    assert out.logits is None
    assert_close_rel(out.loss, expected.loss, what="loss")
    assert_grads_close(grads, expected_grads)
    # Another instance of the same class is unaffected.
    assert untouched(**batch).logits is not None
    assert "forward" not in untouched.__dict__
    assert unpatch_loss(peft_model) == ["base_model.model"]


def test_lora_on_lm_head_is_left_alone():
    peft = pytest.importorskip("peft")
    _, model, _ = twins("llama")
    config = peft.LoraConfig(r=4, target_modules=["lm_head"])
    peft_model = peft.get_peft_model(model, config)
    patched, skipped = patch_loss(peft_model)
    assert patched == [] and "nn.Linear" in skipped["base_model.model"]
