"""mmfast.integrations.transformers: attn_implementation="mmfast" computes what "sdpa" computes, through the op.

Models are tiny and randomly initialised from configs (no downloads); the "mmfast" model and the "sdpa"
model hold the same weights, and each test checks that the op really ran (a counting wrapper around
mmfast.ops.attention.cross_modal_attention, and the module's report) and that the "sdpa" model did not
go through it: a comparison of SDPA with itself would prove nothing.

Padded query rows. The integration reproduces SDPA on every query row, real or padded: a right-padded
row sees every real key in SDPA's mask and gets exactly that from the op's non-causal varlen call; a
left-padded row sees no key and gets zeros, as SDPA (torch >= 2.5) gives. So logits are compared on every
position, not only the real ones, and must be finite everywhere. The loss (hence every gradient) only
covers real, non-image positions, as a training loss would.

Tolerance (float32): max |mmfast - sdpa| <= 1e-5 * max |sdpa| + 1e-7 per tensor. The absolute 1e-7 is for
gradients that are zero in exact arithmetic (key biases: softmax ignores a shift shared by a row's
scores; the last Q-Former layer's self-attention), where both sides hold rounding noise of ~1e-10.
The mask forms, call by call, are checked in float64 against SDPA to 1e-12, and under bfloat16 autocast
with DESIGN.md's rule (at most 2x SDPA's own error against float64).

Each model is built from its own deep copy of the config: the sub-configs carry the attention
implementation, so two models built from one config object would both end up on the last one asked for.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402
from transformers.testing_utils import CaptureLogger  # noqa: E402

from mmfast.integrations import transformers as mt  # noqa: E402
from mmfast.ops import attention as attention_module  # noqa: E402
from tests.helpers import assert_within_torch_error  # noqa: E402

IMAGE = 127  # the image token id in both tiny vocabularies


@pytest.fixture(autouse=True)
def registered():
    mt.register_attention()
    mt.reset_report()
    yield
    mt.reset_report()


@pytest.fixture
def op_calls(monkeypatch):
    """Every call of the op made by the integration: (layout, causal flag, whether a gate was fused) each."""
    seen = []
    real = attention_module.cross_modal_attention

    def counting(q, k, v, **kwargs):
        seen.append(("varlen" if kwargs.get("cu_seqlens_q") is not None else "padded", kwargs.get("causal", False),
                     kwargs.get("gate") is not None))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module, "cross_modal_attention", counting)
    return seen


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).abs().max().item()
    bound = 1e-5 * expected.abs().max().item() + 1e-7
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def run_and_backward(model, **inputs):
    model.train()  # dropout probabilities are 0 in every config here: train mode changes nothing else
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


def assert_same_training_step(reference, fused, inputs, op_calls):
    ref_out, ref_grads = run_and_backward(reference, **inputs)
    assert not op_calls, "the sdpa model went through the op"
    out, grads = run_and_backward(fused, **inputs)
    assert_close("logits", out.logits, ref_out.logits)
    assert_close("loss", out.loss, ref_out.loss)
    assert ref_grads.keys() == grads.keys()
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:  # e.g. the vision tower's last layer, whose output LLaVA does not use
            assert grads[name] is None, name
        else:
            assert_close(f"grad {name}", grads[name], ref_grad)


def text_batch(length: int, image_tokens: int, padding: str, pad_id: int):
    """Two samples, the second 3 tokens shorter (padded on `padding`'s side), image tokens after the first token."""
    torch.manual_seed(1)
    ids = torch.randint(2, 100, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    if padding == "right":
        mask[1, length - 3:] = 0
    elif padding == "left":
        mask[1, :3] = 0
    ids[mask == 0] = pad_id
    real = mask[1].nonzero().squeeze(1)
    ids[0, 1:1 + image_tokens] = IMAGE
    ids[1, real[1]:real[1] + image_tokens] = IMAGE
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------- (1) LLaVA


def llava_config():
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=0)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                    image_seq_length=4)


# padding -> the op forms of the 2 CLIP layers (no mask) and of the 2 Llama layers, and the op calls
LLAVA_CASES = {
    "right": ({"plain": 2, "varlen": 2}, 2 + 2 * 2),  # varlen: the causal staircase + the padded rows
    "left": ({"plain": 2, "causal+key_padding": 2}, 2 + 2),
    "none": ({"plain": 2, "causal": 2}, 2 + 2),  # no padding: transformers skips the mask, is_causal
}


@pytest.fixture(scope="module")
def llava_models():
    # Each model gets its own copy of the config: the sub-configs carry the attention implementation.
    config = llava_config()
    torch.manual_seed(0)
    reference = transformers.AutoModelForImageTextToText.from_config(copy.deepcopy(config),
                                                                    attn_implementation="sdpa")
    mt.register_attention()
    fused = transformers.AutoModelForImageTextToText.from_config(copy.deepcopy(config), attn_implementation="mmfast")
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@pytest.mark.parametrize("padding", list(LLAVA_CASES))
def test_llava_matches_sdpa(padding, llava_models, op_calls):
    reference, fused = llava_models
    assert isinstance(fused, transformers.LlavaForConditionalGeneration)
    assert fused.config.text_config._attn_implementation == "mmfast"
    assert fused.config.vision_config._attn_implementation == "mmfast"
    assert reference.config.text_config._attn_implementation == "sdpa"

    inputs = text_batch(12, 4, padding, pad_id=0)
    if padding == "none":
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    inputs["pixel_values"] = torch.randn(2, 3, 16, 16)
    assert_same_training_step(reference, fused, inputs, op_calls)
    forms, n_calls = LLAVA_CASES[padding]
    assert dict(mt.report().calls) == forms
    assert len(op_calls) == n_calls
    assert not mt.report().fallbacks


# ------------------------------------------------------------------------------------------- (2) BLIP-2


def blip2_config():
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=16, patch_size=8)
    qformer = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, cross_attention_frequency=1,
                                              encoder_hidden_size=32, hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0, vocab_size=64,
                                              max_position_embeddings=32)
    text = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                  dropout=0.0, attention_dropout=0.0, pad_token_id=1)
    return transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                    text_config=text.to_dict(), num_query_tokens=4, image_token_index=IMAGE)


@pytest.fixture(scope="module")
def blip2_models():
    torch.manual_seed(0)
    reference = transformers.Blip2ForConditionalGeneration._from_config(blip2_config(), attn_implementation="sdpa")
    mt.register_attention()
    fused = copy.deepcopy(reference)
    fused.set_attn_implementation("mmfast")
    return reference, fused


def test_blip2_matches_sdpa(blip2_models, op_calls):
    reference, fused = blip2_models
    assert fused.qformer.config._attn_implementation == "mmfast"
    assert fused.language_model.config._attn_implementation == "mmfast"
    assert reference.qformer.config._attn_implementation == "sdpa"
    inputs = text_batch(10, 4, "right", pad_id=1)
    inputs["pixel_values"] = torch.randn(2, 3, 16, 16)
    assert_same_training_step(reference, fused, inputs, op_calls)
    # vision tower 2 + Q-Former 2 x (self + cross), no masks (every image token is real); OPT 2, right-padded
    assert dict(mt.report().calls) == {"plain": 2 + 4, "varlen": 2}
    assert len(op_calls) == 6 + 2 * 2
    assert not mt.report().fallbacks


def test_qformer_ragged_cross_attention(blip2_models, op_calls):
    """Q-Former cross-attention over a different number of image tokens per sample: the op's key_padding_mask."""
    reference, fused = blip2_models
    torch.manual_seed(2)
    queries = torch.randn(3, 4, 32)
    images = torch.randn(3, 7, 32)
    image_mask = torch.ones(3, 7, dtype=torch.long)
    image_mask[1, 3:] = 0
    image_mask[2, 6:] = 0
    results = []
    for model in (reference.qformer, fused.qformer):
        model.zero_grad(set_to_none=True)
        x = images.clone().requires_grad_()
        out = model(query_embeds=queries, encoder_hidden_states=x, encoder_attention_mask=image_mask)
        (out.last_hidden_state * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((out.last_hidden_state, x.grad, {n: p.grad for n, p in model.named_parameters()}))
    (ref_out, ref_dx, ref_grads), (out, dx, grads) = results
    assert_close("last_hidden_state", out, ref_out)
    assert_close("grad encoder_hidden_states", dx, ref_dx)
    assert (dx[1, 3:] == 0).all() and (dx[2, 6:] == 0).all()  # padded image tokens get no gradient
    for name, ref_grad in ref_grads.items():
        if ref_grad is not None:
            assert_close(f"grad {name}", grads[name], ref_grad)
    assert dict(mt.report().calls) == {"plain": 2, "key_padding": 2}
    assert len(op_calls) == 4 and not mt.report().fallbacks


# ----------------------------------------------------------------------- the mask forms, call by call


class Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def mask_of(padding: list[list[int]], len_q: int, causal: bool = True, q_offset: int = 0, batch=None):
    padding = torch.tensor(padding, dtype=torch.bool)
    return sdpa_mask(batch_size=batch or padding.shape[0], q_length=len_q, kv_length=padding.shape[1],
                     q_offset=q_offset, attention_mask=padding, allow_is_causal_skip=False,
                     mask_function=causal_mask_function if causal else bidirectional_mask_function,
                     **({} if causal else {"allow_is_bidirectional_skip": False}))


def mllama_vision_mask():
    """Mllama's vision-encoder mask as transformers builds it: 3 images of 2 tiles, each tile 5 patches padded
    to 8; sample 1's second tile is padding. Real patches see every key, the padding ones the real patches."""
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    tiles = torch.tensor([[1, 1], [1, 0], [1, 1]])
    return _prepare_aspect_ratio_attention_mask(tiles, num_patches=5, target_length=8, dtype=torch.float64) == 0


def text_before_image_mask():
    """Mllama's cross-attention mask (5 text rows over 2 tiles of 3 image tokens) when the first text token
    comes before the image: that row sees every image token, padded tile included, the others their real
    tiles; sample 2's last row sees none (zeros, as SDPA gives)."""
    tiles = torch.tensor([[1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    mask = tiles.repeat_interleave(3, 1)[:, None, None, :].expand(3, 1, 5, 6).clone()
    mask[:, :, 0] = True
    mask[2, :, 4] = False
    return mask


def three_key_sets_mask():
    """Rows over even keys, odd keys, or all: three key sets in one sample, no op form."""
    mask = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :2, 1::2] = False
    mask[1, :, 2:4, 0::2] = False
    return mask


def _mask_cases():
    ragged = [[1] * 6, [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    no_keys = [[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7]
    cases = {
        "right-and-left-padding": (lambda: mask_of(ragged, 6), 6, 6, True, "varlen"),
        "left-padding": (lambda: mask_of([[1] * 6, [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], 6), 6, 6, True,
                         "causal+key_padding"),
        "no-mask-causal": (lambda: None, 6, 6, True, "causal"),
        "no-mask-causal-static-cache": (lambda: None, 4, 6, True, "causal"),  # SDPA keeps the first 4 keys
        "no-mask-plain": (lambda: None, 5, 7, False, "plain"),
        "cross-attention-padding": (lambda: mask_of(no_keys, 5, causal=False), 5, 7, False, "key_padding"),
        "decode-with-cache": (lambda: mask_of(no_keys, 2, q_offset=5), 2, 7, True, "varlen"),
        "additive-float-mask": (lambda: torch.where(mask_of(ragged, 6), 0.0, float("-inf")).double(), 6, 6, True,
                                "varlen"),
        "per-head-mask": (lambda: mask_of(ragged, 6).expand(3, 4, 6, 6), 6, 6, True, "varlen"),
        "shared-mask-batch-1": (lambda: mask_of([[1, 1, 1, 0, 0]], 3, causal=False, batch=1), 3, 5, False,
                                "key_padding"),
        "mllama-vision-key-sets": (mllama_vision_mask, 16, 16, False, "key_sets"),
        "text-before-image-key-sets": (text_before_image_mask, 5, 6, False, "key_sets"),
        "three-key-sets": (three_key_sets_mask, 6, 6, False, None),
        "padding-between-tokens": (lambda: mask_of([[1] * 6, [1, 0, 1, 1, 0, 1], [1] * 6], 6), 6, 6, True, None),
        "sliding-window": (lambda: mask_of(ragged, 6) & ~mask_of(ragged, 6).tril(-3), 6, 6, True, None),
        "float-mask-with-bias": (lambda: torch.where(mask_of(ragged, 6), 0.5, float("-inf")).double(), 6, 6, True,
                                 None),
        "mask-differs-per-head": (lambda: torch.cat([mask_of(ragged, 6).expand(3, 3, 6, 6), torch.eye(6).bool().expand(
            3, 1, 6, 6)], 1), 6, 6, True, None),
    }
    return cases


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_forms_match_sdpa(case):
    """float64, GQA (4 query heads on 2 key heads): values and gradients as SDPA's, in the expected op form."""
    make_mask, len_q, len_k, is_causal, form = MASK_CASES[case]
    mask = make_mask()
    batch = 2 if case == "shared-mask-batch-1" else 3  # that mask has batch 1: SDPA broadcasts it
    torch.manual_seed(3)
    q = torch.randn(batch, 4, len_q, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, 2, len_k, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, 2, len_k, 8, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, weights = mt.attention_forward(Module(), q, k, v, mask, scaling=0.3, is_causal=is_causal)
    ref, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.3, is_causal=is_causal)
    assert weights is None and out.shape == (batch, len_q, 4, 8)
    assert torch.isfinite(out).all()
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=1e-12)
    report = mt.report()
    if form is None:  # not causal-or-padding over the keys: SDPA, counted and warned about
        assert not report.calls and sum(report.fallbacks.values()) == 1
        assert [w.category for w in caught] == [mt.MmfastAttentionFallback]
    else:
        assert dict(report.calls) == {form: 1} and not report.fallbacks and not caught


@pytest.mark.parametrize("case", ["no-mask-plain", "cross-attention-padding", "right-and-left-padding",
                                  "mllama-vision-key-sets", "sliding-window"])
def test_fused_gate_matches_tanh_gate_times_sdpa(case, op_calls):
    """mmfast_gate=FusedGate(gate): tanh(gate) * attention, the gate in every op call of the form (and applied
    after SDPA on a fallback); values and gradients, the gate's included, as tanh(gate) * SDPA in float64."""
    make_mask, len_q, len_k, is_causal, form = MASK_CASES[case]
    mask = make_mask()
    torch.manual_seed(7)
    q = torch.randn(3, 4, len_q, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, len_k, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gate = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    fused = mt.FusedGate(gate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mt.MmfastAttentionFallback)  # counted below
        out, _ = mt.attention_forward(Module(), q, k, v, mask, scaling=0.3, is_causal=is_causal, mmfast_gate=fused)
    ref = gate.tanh() * sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.3, is_causal=is_causal)[0]
    grad = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    inputs = (q, k, v, gate)
    for g, ref_g in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=1e-12)
    assert fused.applied == 1
    if form is None:
        assert not op_calls and mt.report().gated == 0 and sum(mt.report().fallbacks.values()) == 1
    else:
        assert op_calls and all(gated for *_, gated in op_calls), op_calls  # every op call fused the gate
        assert mt.report().gated == 1 and dict(mt.report().calls) == {form: 1}
    with pytest.raises(TypeError, match="mmfast_gate: expected a mmfast.integrations.transformers.FusedGate"):
        mt.attention_forward(Module(), q, k, v, mask, is_causal=is_causal, mmfast_gate=gate)


@pytest.mark.parametrize("case", ["right-and-left-padding", "left-padding"])
def test_autocast_bfloat16(case):
    """Under CPU autocast the op computes in bfloat16 like SDPA: error vs float64 within DESIGN.md's rule."""
    mask = MASK_CASES[case][0]()
    torch.manual_seed(6)
    q, k, v = (torch.randn(3, heads, 6, 8, dtype=torch.float64) for heads in (4, 2, 2))
    reference, _ = sdpa_attention_forward(Module(), q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = mt.attention_forward(Module(), q.float(), k.float(), v.float(), mask)
        torch_out, _ = sdpa_attention_forward(Module(), q.float(), k.float(), v.float(), mask)
    assert out.dtype == torch_out.dtype == torch.bfloat16
    assert_within_torch_error("attention", out, torch_out, reference, torch.bfloat16)
    assert dict(mt.report().calls) == {MASK_CASES[case][4]: 1}


def test_learned_queries_broadcast_over_the_batch():
    """Queries with batch 1 over keys with batch 3 (SDPA broadcasts them), as in Q-Former-like resamplers."""
    torch.manual_seed(5)
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    out, _ = mt.attention_forward(Module(), q, k, k, None, is_causal=False)
    ref, _ = sdpa_attention_forward(Module(), q, k, k, None, is_causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), q)[0], torch.autograd.grad(ref.sum(), q)[0])
    assert dict(mt.report().calls) == {"plain": 1}


def test_generate_with_cache_matches_sdpa(op_calls):
    """Greedy decoding of a left-padded batch under inference_mode: prefill causal + key padding, then one
    query over the cache (key padding) per step."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=63)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    fused = copy.deepcopy(reference)
    fused.set_attn_implementation("mmfast")
    ids = torch.randint(2, 60, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    options = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        expected = reference.generate(input_ids=ids, attention_mask=mask, **options)
        out = fused.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(out.sequences, expected.sequences)
    for scores, ref_scores in zip(out.scores, expected.scores):
        assert_close("scores", scores, ref_scores)
    assert dict(mt.report().calls) == {"causal+key_padding": 2, "key_padding": 2 * 3}
    assert len(op_calls) == 8 and not mt.report().fallbacks


# ------------------------------------------------------------------------------------------ (3) fallbacks


def llama_model(**overrides):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      **overrides)
    torch.manual_seed(0)
    reference = transformers.LlamaModel._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    fused = copy.deepcopy(reference)
    fused.set_attn_implementation("mmfast")
    return reference, fused


def test_arbitrary_4d_mask_falls_back_counted_and_warned_once(op_calls):
    reference, fused = llama_model()
    ids = torch.randint(0, 64, (2, 6))
    torch.manual_seed(4)
    mask = torch.rand(2, 1, 6, 6) < 0.6
    mask |= torch.eye(6, dtype=torch.bool)  # every row sees one key at least
    expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    with pytest.warns(mt.MmfastAttentionFallback, match="not causal, key padding or two key sets") as caught:
        out = fused(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len([w for w in caught if w.category is mt.MmfastAttentionFallback]) == 1  # once, for 2 layers
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert sum(mt.report().fallbacks.values()) == 2 and not mt.report().calls and not op_calls
    assert "2 SDPA fallback(s)" in str(mt.report())


def test_sliding_window_falls_back():
    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        sliding_window=3)
    torch.manual_seed(0)
    reference = transformers.MistralModel._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    fused = copy.deepcopy(reference)
    fused.set_attn_implementation("mmfast")
    ids = torch.randint(0, 64, (2, 8))
    with pytest.warns(mt.MmfastAttentionFallback):
        out = fused(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, reference(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    assert sum(mt.report().fallbacks.values()) == 2 and not mt.report().calls


def test_attention_dropout_falls_back(op_calls):
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 5, 8)
    with pytest.warns(mt.MmfastAttentionFallback, match="dropout"):
        out, _ = mt.attention_forward(Module(), q, k, k, None, dropout=0.5, is_causal=False)
    assert out.shape == (2, 5, 4, 8)
    assert dict(mt.report().fallbacks) == {"attention dropout > 0 (the op has no attention dropout)": 1}
    assert not op_calls


def test_softcap_is_refused():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        mt.attention_forward(Module(), q, q, q, None, softcap=30.0)


def test_output_attentions_warns_as_sdpa_does(op_calls):
    """transformers' SDPA path forms no attention weights for output_attentions=True: it logs one warning
    (warning_once, transformers' logging) and the model returns attentions == (). "mmfast" does the same, in the
    same words but its own name, and still runs the op."""
    reference, fused = llama_model()
    ids = torch.randint(0, 64, (2, 6))
    sdpa_logger = transformers.utils.logging.get_logger("transformers.integrations.sdpa_attention")
    transformers.utils.logging.warning_once.cache_clear()  # once per process: earlier tests may have logged it
    with CaptureLogger(sdpa_logger) as sdpa_log:
        expected = reference(input_ids=ids, output_attentions=True)
    with CaptureLogger(mt.logger) as log, CaptureLogger(sdpa_logger) as sdpa_log_of_fused:
        out = fused(input_ids=ids, output_attentions=True)
        fused(input_ids=ids, output_attentions=True)
    assert "`sdpa` attention does not support `output_attentions=True`" in sdpa_log.out
    assert log.out == sdpa_log.out.replace("`sdpa`", "`mmfast`")  # SDPA's words, once for 2 calls x 2 layers
    assert sdpa_log_of_fused.out == ""
    assert out.attentions == expected.attentions == ()
    assert_close("hidden states", out.last_hidden_state, expected.last_hidden_state)
    assert len(op_calls) == 4 and not mt.report().fallbacks


def test_output_attentions_on_a_fallback_logs_mmfast_warning_only():
    """A call that falls back to SDPA's forward must not log SDPA's warning, which names "sdpa"."""
    q = torch.randn(2, 4, 5, 8)
    sdpa_logger = transformers.utils.logging.get_logger("transformers.integrations.sdpa_attention")
    transformers.utils.logging.warning_once.cache_clear()
    with CaptureLogger(mt.logger) as log, CaptureLogger(sdpa_logger) as sdpa_log, \
            pytest.warns(mt.MmfastAttentionFallback, match="dropout"):
        _, weights = mt.attention_forward(Module(), q, q, q, None, dropout=0.5, is_causal=False,
                                          output_attentions=True)
    assert weights is None and sdpa_log.out == ""
    assert log.out == mt.OUTPUT_ATTENTIONS_WARNING + "\n"


# ------------------------------------------------------------------------------------ (4) registration


def test_register_attention_is_idempotent():
    keys = set(ALL_ATTENTION_FUNCTIONS.valid_keys())
    mask_keys = set(ALL_MASK_ATTENTION_FUNCTIONS)
    assert mt.register_attention() == "mmfast"
    assert mt.register_attention() == "mmfast"
    assert set(ALL_ATTENTION_FUNCTIONS.valid_keys()) == keys and set(ALL_MASK_ATTENTION_FUNCTIONS) == mask_keys
    assert AttentionInterface._global_mapping["mmfast"] is mt.attention_forward
    assert AttentionMaskInterface._global_mapping["mmfast"] is mt.attention_mask
    assert ALL_ATTENTION_FUNCTIONS["mmfast"] is mt.attention_forward
