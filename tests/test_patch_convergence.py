"""Mini-model convergence (as Liger-Kernel's): mmfast.patch changes the speed of training, not its course.

Each tiny, randomly initialised model (built from a config: no downloads) trains 20 AdamW steps twice from
the same weights on the same fixed ragged batches (images + padded text, labels -100 on padding and image
tokens): once as transformers and PEFT wrote it, once patched (cpu backend). The loss at every step and
every parameter at the end must agree, and the fused paths must have run (attention op calls counted by
mmfast.integrations.transformers.report(), LoRA layers and loss heads listed by the patch report). No
attention call may fall back to SDPA except those a model lists in FALLBACKS, by exact reason and count
(none at present), and what the report says of gated attention (GATES: Mllama's gates fused into the op,
counted per call in GATED_CALLS) and of loss heads left alone (LOSS_LEFT_ALONE, none at present) is checked
word for word.

Tolerances. fp32: every op reassociates sums (blocked softmax, fused GEMMs), so the two runs differ by
rounding from the first step (~1e-7 relative) and AdamW, which divides by sqrt(v), turns a near-zero
gradient's rounding into a step of up to 2 x lr; over 20 steps that bounds parameter drift at a few
lr (lr 1e-3 here, so atol 1e-4 would be met only where no gradient component sits near zero). Measured
drift is far below the bounds chosen: loss rtol 1e-4, parameters atol 1e-4 + rtol 1e-3 (see FP32).
bf16: Liger's mini-model tolerances, loss 5e-2, parameters 1e-2. bf16 rounding makes the unpatched run drift
from exact arithmetic too, so an element outside that tolerance is judged against a float32 run of the
unpatched model from the same weights (DESIGN's rule: compare against a more precise reference): it passes
only if the patched run is the closer of the two to it there, and the patched parameters as a whole must
then be no farther from the float32 run than twice the unpatched ones (see assert_bf16_params).

Dropout is off everywhere: the fused LoRA op draws its dropout seed differently from nn.Dropout.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import mmfast  # noqa: E402
from mmfast.integrations import transformers as mt  # noqa: E402

STEPS = 20
LR = 1e-3
VOCAB = 1000
IMAGE = VOCAB - 1  # the image token id
PAD = 0
BACKEND = "cpu"
FP32 = {"loss_rtol": 1e-4, "loss_atol": 1e-6, "param_atol": 1e-4, "param_rtol": 1e-3}
BF16 = {"loss_rtol": 5e-2, "loss_atol": 5e-2, "param_atol": 1e-2, "param_rtol": 1e-2}
LORA_TARGETS = ["q_proj", "v_proj"]
# The bias of a key projection adds the same score to every key of a query row: softmax ignores it, so its
# true gradient is 0 and what both runs compute is rounding noise, which AdamW scales to steps of ~lr.
# Those parameters cannot agree between any two implementations; they are left out of the comparison.
KEY_BIAS = re.compile(r"(k_proj|\.key)\.bias$")


# ------------------------------------------------------------------------------------------- data


def text_batch(generator, lengths, length, image_tokens: int, vocab: int = VOCAB):
    """Right-padded ids of the given real lengths, `image_tokens` image tokens after the first token."""
    batch = len(lengths)
    ids = torch.randint(2, vocab - 1, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
    ids[mask == 0] = PAD
    if image_tokens:
        ids[:, 1:1 + image_tokens] = IMAGE
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    return ids, mask, labels


def lm_batches(image_size: int, image_tokens: int, *, pixel_shape=None, extra=None, steps: int = 2):
    """A few fixed ragged batches of 2 (cycled over the steps): pixel values + right-padded text."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(steps):
        length = 16 + image_tokens
        ids, mask, labels = text_batch(generator, [length, length - 5 - 2 * step], length, image_tokens)
        shape = pixel_shape or (2, 3, image_size, image_size)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "pixel_values": torch.randn(*shape, generator=generator)}
        batch.update(extra or {})
        batches.append(batch)
    return batches


def contrastive_batches(image_size: int, steps: int = 2):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(steps):
        ids, mask, _ = text_batch(generator, [12, 7 + step], 12, 0)
        batches.append({"input_ids": ids, "attention_mask": mask, "return_loss": True,
                        "pixel_values": torch.randn(2, 3, image_size, image_size, generator=generator)})
    return batches


# ------------------------------------------------------------------------------------------- models

NO_DROPOUT = {"attention_dropout": 0.0}


def llama(**overrides):
    return transformers.LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "pad_token_id": PAD, **overrides})


def clip_config():
    text = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=32, pad_token_id=PAD,
                                       eos_token_id=2, bos_token_id=1, **NO_DROPOUT)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8, **NO_DROPOUT)
    return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)


def siglip_config():
    text = transformers.SiglipTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **NO_DROPOUT)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=16, patch_size=8, **NO_DROPOUT)
    return transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


def llava_config(text_layers: int = 2):
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8, **NO_DROPOUT)
    return transformers.LlavaConfig(vision_config=vision, text_config=llama(num_hidden_layers=text_layers),
                                    image_token_index=IMAGE, image_seq_length=4)


def idefics3_config():
    vision = transformers.Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8, **NO_DROPOUT)
    return transformers.Idefics3Config(vision_config=vision.to_dict(), text_config=llama().to_dict(),
                                       image_token_id=IMAGE, scale_factor=2, pad_token_id=PAD)


def blip2_config():
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=16, patch_size=8, **NO_DROPOUT)
    qformer = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, cross_attention_frequency=1,
                                              encoder_hidden_size=32, hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0, vocab_size=64,
                                              max_position_embeddings=32)
    text = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                  dropout=0.0, attention_dropout=0.0, pad_token_id=1)
    return transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                    text_config=text.to_dict(), num_query_tokens=4, image_token_index=IMAGE)


def mllama_config():
    """Llama 3.2 Vision's layout, tiny: a tiled vision encoder (local + gated global layers), a text decoder
    whose layer 1 is a tanh-gated cross-attention layer over the image tokens."""
    vision = transformers.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_global_layers=1, attention_heads=4, image_size=16, patch_size=8,
                                             max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                                             intermediate_layers_indices=[0], vision_output_dim=64)
    text = transformers.MllamaTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                                         max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
                                         eos_token_id=2, dropout=0.0)
    return transformers.MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                     image_token_index=IMAGE)


def mllama_batches(steps: int = 2, text_before_image: bool = False):
    """MllamaProcessor's layout: one <|image|> token first, then BOS and text, right-padded; one image per
    sample in up to 2 tiles (ragged: one sample's second tile is padding, zero pixels, aspect_ratio_mask 0).
    cross_attention_mask: every text row (padding included, as the processor extends it to the end) sees its
    image's real tiles. text_before_image: the first token sees no tile, as in "text <|image|> text" prompts
    (Mllama then lets that row attend to every image token: full_text_row_masked_out_mask)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(steps):
        length = 16
        ids, mask, _ = text_batch(generator, [length, length - 5 - 2 * step], length, 0)
        ids[:, 0], ids[:, 1] = IMAGE, 1
        labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
        tiles = [2, 1] if step % 2 == 0 else [1, 2]
        pixels = torch.randn(2, 1, 2, 3, 16, 16, generator=generator)
        aspect_mask = torch.zeros(2, 1, 2, dtype=torch.long)
        cross = torch.zeros(2, length, 1, 2, dtype=torch.long)
        for row, count in enumerate(tiles):
            aspect_mask[row, 0, :count] = 1
            cross[row, :, 0, :count] = 1
            pixels[row, 0, count:] = 0
        if text_before_image:
            cross[:, 0] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
                        "aspect_ratio_ids": torch.tensor([[t] for t in tiles]),  # 1: [1, 1], 2: [1, 2]
                        "aspect_ratio_mask": aspect_mask, "cross_attention_mask": cross})
    return batches


def open_mllama_gates(model):
    """Mllama starts its cross-attention gates at 0 (tanh(0) = 0: the cross-attention layer adds nothing and
    its attention gets no gradient); open them so every step trains through the cross-attention."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(0.5)
    return model


# Attention modules that compute attention themselves (not through transformers' AttentionInterface):
# SigLIP's pooling head is a torch.nn.MultiheadAttention.
LEFT_ALONE = {"siglip": {"vision_model.head.attention"}}

# name -> (model class, config builder, batches builder, LM head (a causal-LM loss to fuse))
MODELS = {
    "clip": (lambda: transformers.CLIPModel, clip_config, lambda: contrastive_batches(16), False),
    "siglip": (lambda: transformers.SiglipModel, siglip_config, lambda: contrastive_batches(16), False),
    "llava": (lambda: transformers.LlavaForConditionalGeneration, llava_config, lambda: lm_batches(16, 4), True),
    "idefics3": (lambda: transformers.Idefics3ForConditionalGeneration, idefics3_config,
                 lambda: lm_batches(32, 4, pixel_shape=(2, 1, 3, 32, 32)), True),
    "blip2": (lambda: transformers.Blip2ForConditionalGeneration, blip2_config, lambda: lm_batches(16, 4), True),
    "mllama": (lambda: transformers.MllamaForConditionalGeneration, mllama_config, mllama_batches, True),
}
AFTER_BUILD = {"mllama": open_mllama_gates}

# Expected SDPA fallbacks per training step (forward; the backward reuses the forward's path), by reason:
# anything else, or any other count, fails. None at present: Mllama's vision encoder mask
# (_prepare_aspect_ratio_attention_mask: real patches see every key, the 8-alignment padding patches and
# padded tiles see the real patches only) is the op's "key_sets" form.
FALLBACKS: dict[str, dict[str, int]] = {}
# Exact op calls per training step where known: Mllama's text self-attention (right padding: varlen) in
# layers 0 and 2, the cross-attention of layer 1 (ragged tiles: the padded tile's keys masked), and the
# vision encoder's 2 local + 1 global layers (two key sets per image).
CALLS = {"mllama": {"varlen": 2, "key_padding": 1, "key_sets": 3}}
# Gated attention: (module, the report's gate text); GATED_CALLS: op calls per step that fused a gate.
FUSED = "fused into the op (tanh(gate) * attention, before the bias-free o_proj)"
GATES = {"mllama": {
    "model.language_model.layers.1.cross_attn":
        f"MllamaTextCrossAttention, cross-attention; gate cross_attn_attn_gate {FUSED}",
    "model.vision_model.global_transformer.layers.0.self_attn":
        f"MllamaVisionAttention, self-attention; gate gate_attn {FUSED}",
}}
GATED_CALLS = {"mllama": 2}
# Loss heads mmfast.integrations.losses leaves alone, with (part of) its reason.
LOSS_LEFT_ALONE: dict[str, str] = {}


def build(name: str, dtype: torch.dtype = torch.float32):
    cls, config, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = cls()._from_config(config(), attn_implementation="sdpa", dtype=dtype)
    return AFTER_BUILD.get(name, lambda m: m)(model)


def with_lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    # PEFT starts lora_B at zero; a non-zero start makes the first steps train A as well.
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    return model


# ------------------------------------------------------------------------------------------- training


def train(model, batches, dtype: torch.dtype):
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LR)
    losses = []
    for step in range(STEPS):
        batch = {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in batches[step % len(batches)].items()}
        optimizer.zero_grad(set_to_none=True)
        with mmfast.use_backend(BACKEND):
            loss = model(**batch).loss
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_converge(name: str, *, lora: bool, dtype=torch.float32, tol=FP32):
    _, _, batches, lm_head = MODELS[name]
    reference = build(name, dtype)
    if lora:
        reference = with_lora(reference)
    # deepcopy copies the config with the model: sub-configs are shared by the models built from one config
    # object, and they carry the attention implementation.
    patched = copy.deepcopy(reference)
    data = batches()

    ref_losses, ref_params = train(reference, data, dtype)
    mt.reset_report()
    assert not mt.report().calls, "the reference model ran the mmfast attention"
    expected_fallbacks = {reason: count * STEPS for reason, count in FALLBACKS.get(name, {}).items()}
    with warnings.catch_warnings(record=True) as caught:
        # No call may fall back to SDPA, except the expected ones (counted exactly below).
        warnings.simplefilter("always" if expected_fallbacks else "error", mt.MmfastAttentionFallback)
        report = mmfast.patch(patched, attention=True, lora=lora, loss=True, backend=BACKEND)
        losses, params = train(patched, data, dtype)
    warned = {str(w.message) for w in caught if issubclass(w.category, mt.MmfastAttentionFallback)}
    assert all(any(f"({reason})" in message for reason in expected_fallbacks) for message in warned), warned

    # The fused paths ran: every attention module swapped and called through the op (SDPA only for the
    # expected fallbacks); the LoRA layers and (for the LM heads) the loss swapped.
    swapped = {module.removeprefix("base_model.model."): detail for module, detail in report.swapped["attention"].items()}
    left_alone = {module.removeprefix("base_model.model.") for module in report.left_alone["attention"]}
    assert swapped and left_alone == LEFT_ALONE.get(name, set()), report
    # At least one op call per swapped module (where some fall back, CALLS gives the exact calls by form).
    assert sum(mt.report().calls.values()) >= (0 if expected_fallbacks else len(swapped)) and mt.report().calls, \
        mt.report()
    if name in CALLS:
        assert dict(mt.report().calls) == {form: n * STEPS for form, n in CALLS[name].items()}, mt.report()
    assert dict(mt.report().fallbacks) == expected_fallbacks, mt.report()
    gated = {module: detail for module, detail in swapped.items() if "gate" in detail}
    assert gated == GATES.get(name, {}), report  # the gate is named, and said fused, where it is
    assert mt.report().gated == GATED_CALLS.get(name, 0) * STEPS, mt.report()
    if lora:
        assert report.swapped["lora"] and not report.left_alone["lora"], report
        assert not report.fallbacks["lora"], report
    if name in LOSS_LEFT_ALONE:
        assert not report.swapped["loss"], report
        assert [reason for reason in report.left_alone["loss"].values() if LOSS_LEFT_ALONE[name] in reason], report
    elif lm_head:
        assert report.swapped["loss"], f"the causal-LM loss was not fused:\n{report}"

    # The same course.
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert ref_losses[-1] < ref_losses[0], f"{name} did not learn: {ref_losses}"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=tol["loss_rtol"],
                               atol=tol["loss_atol"], msg=lambda m: f"{name} losses per step:\n{m}")
    assert params.keys() == ref_params.keys()
    params, ref_params = comparable(params), comparable(ref_params)
    if dtype == torch.bfloat16:
        assert_bf16_params(name, lora, params, ref_params, tol)
        return ref_losses, losses
    for key, value in ref_params.items():
        torch.testing.assert_close(params[key], value, rtol=tol["param_rtol"], atol=tol["param_atol"],
                                   msg=lambda m, key=key: f"{name} parameter {key}:\n{m}")
    return ref_losses, losses


def comparable(params: dict) -> dict:
    """The trained parameters two implementations can agree on."""
    result = {}
    for key, value in params.items():
        if KEY_BIAS.search(key):
            continue  # softmax is blind to a key bias: its gradient is 0 plus rounding, which AdamW amplifies
        if key.endswith("in_proj_bias"):  # nn.MultiheadAttention's packed q, k, v biases: leave k's out
            third = value.shape[0] // 3
            value = torch.cat([value[:third], value[2 * third:]])
        result[key] = value
    return result


def assert_bf16_params(name: str, lora: bool, params: dict, ref_params: dict, tol: dict) -> None:
    """Liger's tolerance between the patched and unpatched bf16 runs; where an element misses it, the float32
    run of the unpatched model decides which bf16 run strayed (see the module doc)."""
    misses = {key: ~torch.isclose(params[key], value, rtol=tol["param_rtol"], atol=tol["param_atol"])
              for key, value in ref_params.items()}
    misses = {key: miss for key, miss in misses.items() if miss.any()}
    if not misses:
        return
    _, batches, _ = MODELS[name][1:]
    exact = build(name, torch.bfloat16)  # the same bf16 initial weights, trained in float32
    if lora:
        exact = with_lora(exact)
    exact = exact.float()
    exact_params = comparable(train(exact, batches(), torch.float32)[1])
    ours = torch.cat([(params[key] - exact_params[key])[miss] for key, miss in misses.items()])
    theirs = torch.cat([(ref_params[key] - exact_params[key])[miss] for key, miss in misses.items()])
    where = ", ".join(f"{key} ({int(miss.sum())})" for key, miss in misses.items())
    assert ours.norm() <= theirs.norm(), (
        f"{name}: {ours.numel()} parameter element(s) outside Liger's bf16 tolerance ({where}), and there the "
        f"patched run is farther from the float32 run than the unpatched one: {ours.norm():.4g} > {theirs.norm():.4g}")
    distance = lambda run: sum((run[key] - exact_params[key]).square().sum() for key in exact_params).sqrt()
    assert distance(params) <= 2 * distance(ref_params), (
        f"{name}: patched bf16 parameters {distance(params):.4g} from the float32 run, unpatched "
        f"{distance(ref_params):.4g}")
    print(f"{name}: {ours.numel()} element(s) outside Liger's bf16 tolerance ({where}); off the float32 run there: "
          f"patched {ours.norm():.4g}, unpatched {theirs.norm():.4g}; all parameters: patched "
          f"{distance(params):.4g}, unpatched {distance(ref_params):.4g}")

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_converges(name, lora):
    assert_converge(name, lora=lora, dtype=torch.bfloat16, tol=BF16)


def test_mllama_text_before_image_cross_attention_on_the_op():
    """A text row before the image (a "text <|image|> text" prompt) sees no tile; Mllama's
    _prepare_cross_attention_mask turns that row to all-zero bias (attend to every image token, padded tile
    included; full_text_row_masked_out_mask zeroes the layer's MLP output there, not the attention's). With
    a padded tile, that sample's rows see two key sets (every key, or the real tiles'): the op's "key_sets"
    form, as the vision encoder's mask. The model's own loss and gradients (one step, fp32 tolerance of
    tests/integrations/test_transformers.py)."""
    from tests.integrations.test_transformers import assert_close

    batch = mllama_batches(steps=1, text_before_image=True)[0]
    reference = build("mllama")
    patched = copy.deepcopy(reference)
    mmfast.patch(patched, backend=BACKEND)
    mt.reset_report()
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", mt.MmfastAttentionFallback)
        for model in (reference, patched):
            with mmfast.use_backend(BACKEND):
                loss = model(**batch).loss
                loss.backward()
            results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    assert not mt.report().fallbacks, mt.report()
    assert dict(mt.report().calls) == {"varlen": 2, "key_sets": 3 + 1}, mt.report()
    (expected, ref_grads), (loss, grads) = results
    assert_close("loss", loss, expected)
    for key, ref_grad in ref_grads.items():
        assert (grads[key] is None) == (ref_grad is None), key
        if ref_grad is not None:
            assert_close(f"grad {key}", grads[key], ref_grad)


# ------------------------------------------------------------------------------------------- triton

TRITON_LLAVA_LORA = textwrap.dedent(
    """
    import sys
    assert "triton" not in sys.modules  # TRITON_INTERPRET=1 is read when triton is first imported
    from tests import test_patch_convergence as convergence

    convergence.BACKEND, convergence.STEPS = "triton", 5
    reference, patched = convergence.assert_converge("llava", lora=True)
    print("converged", reference, patched)
    """
)


def test_llava_lora_converges_on_triton_interpreter():
    """LLaVA + PEFT LoRA, 5 steps, mmfast.patch(backend="triton") against unpatched: the Triton attention,
    LoRA and linear-cross-entropy kernels in training, on CPU through Triton's interpreter (a fresh process,
    where TRITON_INTERPRET=1 is set before triton is imported, and no GPU is visible; ~35 s, the interpreter
    runs each kernel program in numpy). Same checks as assert_converge (every attention call on the op,
    LoRA layers and the loss fused, no fallback) and the FP32 tolerances: the interpreter computes tl.dot
    with np.matmul in float32 whatever input_precision says (triton.runtime.interpreter create_dot), so the
    kernels' sums differ from torch's by fp32 reassociation only, as the cpu backend's do (measured: loss
    5e-7, parameters 3e-7 of absolute drift after 5 steps, against 1e-4 tolerances). 5 steps: the two
    batches alternate, so the last step sees the first step's batch and the learning check compares like
    with like."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", TRITON_LLAVA_LORA], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert run.returncode == 0 and "converged" in run.stdout, (run.stdout[-2000:], run.stderr[-4000:])


# ------------------------------------------------------------------------------------------- memory


def test_patched_llava_never_materialises_logits():
    """Peak RSS of one LoRA training step (forward with labels, backward, AdamW), each in its own process
    (harness.run_worker, as tests/ops/test_linear_cross_entropy.py): unpatched LLaVA holds (tokens x vocab)
    logits and their gradient; patched, its extra memory stays far below one such buffer. LoRA keeps the
    gradients and optimizer states small, so the logits are what a step allocates most. 2048 tokens, as the
    op's own test: the fused loss's working buffers are a fixed number of (rows x vocab) blocks, which at 512
    tokens would already weigh a quarter of the logits."""
    from mmfast.bench import harness, train_step

    shape = {**train_step.SHAPES["lora"], "batch": 2, "length": 1024, "ragged": 160, "hidden": 64,
             "intermediate": 128, "heads": 4, "vision_hidden": 32, "image_size": 16}
    logits = train_step.logits_bytes(shape, torch.float32)
    assert logits == 2048 * 32000 * 4  # 250 MiB
    peaks = {}
    for variant in ("unpatched", "patched-cpu"):
        spec = {"module": "mmfast.bench.train_step", "variant": variant, "shape": shape, "device": "cpu",
                "dtype": "float32", "warmup": 1, "iters": 1}
        result = harness.run_worker(spec)
        assert result["status"] == "ok", result
        peaks[variant] = result["peak_extra_bytes"]
    assert peaks["unpatched"] > logits, f"the measurement must see the logits: {peaks}"
    print(f"peak extra MiB: { {k: round(v / 2**20, 1) for k, v in peaks.items()} }, logits {logits / 2**20} MiB")
    assert peaks["patched-cpu"] < 0.25 * logits, peaks
