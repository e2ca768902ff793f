"""The Triton cross-modal attention kernels called directly (in the interpreter without a GPU), against
mmfast.reference evaluated in float64 on the same inputs, under the tolerance rule of DESIGN.md: the error vs
float64 is at most 2x that of the reference run in the test dtype, plus atol. The interpreter runs 16 x 16 blocks,
so samples of 17 rows or keys cross a block edge; a batch mixes lengths 0, 1 and 17 on both sides."""

from __future__ import annotations

import inspect

import pytest
import torch

from mmfast import reference
from mmfast.kernels import attention
from mmfast.kernels.attention import cross_modal_attention_backward, cross_modal_attention_forward
from tests.helpers import DEVICE, assert_within_torch_error

# (lq, lk) per sample: a full block and a ragged one, one query, no queries, lq > lk (causal rows with no key),
# no keys, and lq < lk. Under the causal mask (17, 2) and (3, 17) put the edge of the allowed keys one row / one
# key before a 16-wide block edge, which is where an off-by-one in the kernels' masked / unmasked block ranges
# would show.
LENGTHS = [(17, 17), (1, 17), (0, 5), (17, 2), (5, 0), (3, 17)]


def offsets(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(DEVICE, torch.int32)


def make_inputs(lengths, heads_q, heads_k, head_dim, dtype, causal, gated, residual, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lq for lq, _ in lengths), sum(lk for _, lk in lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    return {
        "q": randn(total_q, heads_q, head_dim),
        "k": randn(total_k, heads_k, head_dim),
        "v": randn(total_k, heads_k, head_dim),
        "cu_seqlens_q": offsets([lq for lq, _ in lengths]),
        "cu_seqlens_k": offsets([lk for _, lk in lengths]),
        "max_seqlen_q": max((lq for lq, _ in lengths), default=0),
        "max_seqlen_k": max((lk for _, lk in lengths), default=0),
        "causal": causal,
        "scale": head_dim**-0.5,
        "gate": randn(heads_q).float() if gated else None,
        "residual": randn(total_q, heads_q, head_dim) if residual else None,
        "grad_out": randn(total_q, heads_q, head_dim),
    }


def run(backend, inputs, dtype=None):
    """(out, attn, lse, grad_q, grad_k, grad_v, grad_gate) with q, k, v, residual and grad_out cast to `dtype`;
    the backward gets this backend's own attn and lse."""
    cast = {name: inputs[name] if dtype is None else inputs[name].to(dtype)
            for name in ("q", "k", "v", "grad_out")}
    residual = inputs["residual"]
    if residual is not None and dtype is not None:
        residual = residual.to(dtype)
    q, k, v = cast["q"], cast["k"], cast["v"]
    options = [inputs[name] for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "causal",
                                         "scale")]
    out, attn, lse = backend.cross_modal_attention_forward(q, k, v, *options, inputs["gate"], residual)
    grads = backend.cross_modal_attention_backward(cast["grad_out"], q, k, v, attn, lse, *options, inputs["gate"])
    return (out, attn, lse, *grads)


NAMES = ("out", "attn", "lse", "grad_q", "grad_k", "grad_v", "grad_gate")


def check_close(name, actual, expected, ref, dtype):
    assert actual.shape == ref.shape, (name, actual.shape, ref.shape)
    if name == "lse":
        # Rows with no allowed key: exactly -inf in every run; the others are compared.
        empty = ref == float("-inf")
        assert torch.equal(actual == float("-inf"), empty) and torch.equal(expected == float("-inf"), empty), name
        actual, expected, ref = (torch.where(empty, 0, x.double()) for x in (actual, expected, ref))
    assert not actual.isnan().any(), name
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    assert_within_torch_error(name, actual, expected, ref, dtype, scale=scale)


def run_and_check(inputs, dtype):
    got = run(attention, inputs)
    expected = run(reference, inputs)  # plain torch in the test dtype (it accumulates in float32)
    ref = run(reference, inputs, torch.float64)
    for name, actual, torch_result, ref_value in zip(NAMES, got, expected, ref):
        if ref_value is None:
            assert actual is None, name
            continue
        want = torch.float32 if name in ("lse", "grad_gate") else dtype
        assert actual.dtype == want, (name, actual.dtype)
        check_close(name, actual, torch_result, ref_value, dtype)
    return got


CASES = {
    # dtype, (Hq, Hk), head dim, causal, gate, residual
    "fp32-gqa-d32-causal-gate-residual": (torch.float32, (4, 2), 32, True, True, True),
    "bf16-mha-d32-causal-plain": (torch.bfloat16, (2, 2), 32, True, False, False),
    "bf16-gqa-d80-causal-gate": (torch.bfloat16, (4, 2), 80, True, True, False),
    "fp16-gqa-d32-residual": (torch.float16, (4, 2), 32, False, False, True),
    "fp32-mha-d96-gate-residual": (torch.float32, (2, 2), 96, False, True, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_reference(case):
    dtype, (heads_q, heads_k), head_dim, causal, gated, residual = case
    run_and_check(make_inputs(LENGTHS, heads_q, heads_k, head_dim, dtype, causal, gated, residual), dtype)


def test_rows_without_keys_are_exact_zeros_with_finite_gradients():
    """A sample with no keys, causal rows before the first key, and keys no query reads."""
    lengths = [(3, 0), (17, 1), (0, 4)]
    inputs = make_inputs(lengths, 4, 2, 32, torch.bfloat16, True, True, True, seed=1)
    out, attn, lse, grad_q, grad_k, grad_v, grad_gate = run_and_check(inputs, torch.bfloat16)
    # Query rows 0-2 (sample 0) have no keys; rows 3-18 of sample 1 (lq 17, lk 1) none under the causal mask.
    empty = torch.zeros(attn.shape[0], dtype=torch.bool, device=DEVICE)
    empty[:3 + 16] = True
    assert not attn[empty].any() and not grad_q[empty].any()
    assert torch.equal(out[empty], inputs["residual"][empty]), "out = residual + tanh(gate) * 0 exactly"
    assert (lse[:, empty] == float("-inf")).all() and lse[:, ~empty].isfinite().all()
    # The keys of sample 2 have no queries.
    assert not grad_k[1:].any() and not grad_v[1:].any()
    assert grad_v[0].any()  # (grad_k[0] is ~0: a softmax over one key does not depend on it)
    for grad in (grad_q, grad_k, grad_v, grad_gate):
        assert grad.isfinite().all()


def test_empty_batch():
    inputs = make_inputs([(0, 0), (0, 3)], 2, 2, 32, torch.float32, False, True, False)
    out, attn, lse, grad_q, grad_k, grad_v, grad_gate = run(attention, inputs)
    assert out.shape == attn.shape == (0, 2, 32) and lse.shape == (2, 0)
    assert grad_q.shape == (0, 2, 32) and grad_k.shape == (3, 2, 32)
    assert not grad_k.any() and not grad_v.any() and not grad_gate.any()


def test_float64_is_refused():
    inputs = make_inputs([(3, 4)], 2, 2, 32, torch.float64, False, False, False)
    with pytest.raises(TypeError, match="float64"):
        run(attention, inputs)


def test_same_signatures_as_the_reference():
    for name in ("cross_modal_attention_forward", "cross_modal_attention_backward"):
        assert inspect.signature(getattr(attention, name)) == inspect.signature(getattr(reference, name)), name
