"""The Triton LoRA linear kernels called directly (in the interpreter without a GPU), against a float64
plain-torch computation of csrc/lora.h's formulas with the kernels' own keep mask, under the tolerance rule
of DESIGN.md. The interpreter runs 16-wide blocks, so these shapes cross several tiles along every dimension."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import mmfast
from mmfast.kernels import lora
from mmfast.kernels.lora import lora_linear_backward, lora_linear_forward, lora_linear_mask
from tests.helpers import DEVICE, DTYPES, assert_within_torch_error

SCALING = 0.75
SEED = 1234


def make_inputs(rows, features, out_features, rank, dtype, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)

    # lora_B is nonzero (PEFT starts it at zero), so that every term of every gradient is tested.
    return {
        "x": randn(rows, features),
        "weight": randn(out_features, features, scale=features**-0.5),
        "bias": randn(out_features) if bias else None,
        "lora_A": randn(rank, features, scale=features**-0.5),
        "lora_B": randn(out_features, rank, scale=rank**-0.5),
        "grad_out": randn(rows, out_features),
    }


def plain_torch(inputs, keep, dropout_p, grad_x=None, dtype=None):
    """(out, xa, grad_x, grad_weight, grad_bias, grad_A, grad_B) by torch's own ops and autograd, in `dtype`
    (float64 for the reference), with the keep mask given."""
    cast = {k: None if v is None else v.to(dtype or v.dtype) for k, v in inputs.items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in cast.items() if k != "grad_out" and v is not None}
    x = leaves["x"]
    xa = (x * keep.to(x.dtype) / (1 - dropout_p)) @ leaves["lora_A"].T
    out = x @ leaves["weight"].T + SCALING * (xa @ leaves["lora_B"].T)
    if "bias" in leaves:
        out = out + leaves["bias"]
    xa.retain_grad()
    out.backward(cast["grad_out"])
    gx = x.grad if grad_x is None else grad_x.to(x.dtype) + x.grad
    grads = [gx] + [leaves[k].grad if k in leaves else None for k in ("weight", "bias", "lora_A", "lora_B")]
    return (out.detach(), xa.detach(), *grads)


def check_close(name, actual, expected, reference, dtype):
    assert actual.dtype == dtype and actual.shape == reference.shape, (name, actual.dtype, actual.shape)
    scale = max(1.0, reference.abs().max().item())
    assert_within_torch_error(name, actual, expected, reference, dtype, scale=scale)


def run_and_check(rows, features, out_features, rank, dtype, bias, dropout_p, grad_x=None):
    inputs = make_inputs(rows, features, out_features, rank, dtype, bias)
    keep = lora_linear_mask(SEED, rows, features, dropout_p, DEVICE)
    ref = plain_torch(inputs, keep, dropout_p, grad_x, torch.float64)
    expected = plain_torch(inputs, keep, dropout_p, grad_x)

    x, weight, b, lora_A, lora_B = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    out, xa, mask = lora_linear_forward(x, weight, b, lora_A, lora_B, SCALING, dropout_p, SEED)
    assert mask.dtype == torch.uint8 and mask.numel() == 0
    check_close("out", out, expected[0], ref[0], dtype)
    check_close("xa", xa, expected[1], ref[1], dtype)

    given = None if grad_x is None else grad_x.clone()
    grads = lora_linear_backward(inputs["grad_out"], x, weight, lora_A, lora_B, SCALING, xa, mask, dropout_p, SEED,
                                 given, True, True, b is not None, True, True)
    if given is not None:
        assert grads[0] is given, "grad_x must be accumulated into the buffer passed"
    for name, grad, pt_grad, ref_grad in zip(("grad_x", "grad_weight", "grad_bias", "grad_A", "grad_B"), grads,
                                             expected[2:], ref[2:]):
        if ref_grad is None:
            assert grad is None, name
        else:
            check_close(name, grad, pt_grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(20, 33, 17, 8), (7, 17, 33, 1)], ids=lambda s: "N{}_in{}_out{}_r{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=lambda p: f"p{p}")
def test_forward_and_gradients_match_reference(dtype, shape, bias, dropout_p):
    run_and_check(*shape, dtype, bias, dropout_p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_x_is_added_into_the_given_buffer(dtype):
    grad_x = make_inputs(20, 33, 17, 8, dtype, seed=1)["x"]
    run_and_check(20, 33, 17, 8, dtype, True, 0.3, grad_x=grad_x)


def test_rank_above_one_block():
    """r = 20 spans two 16-wide rank blocks: the GEMM epilogue loops over them and the skinny products split
    the rank over programs (grad_bias stored once)."""
    run_and_check(19, 33, 17, 20, torch.float32, True, 0.3)


@pytest.mark.parametrize("need", [(False, False, True, False, True), (True, False, False, True, False),
                                  (False, True, False, False, False)], ids=["bias_B", "x_A", "weight"])
def test_only_the_requested_gradients(need):
    inputs = make_inputs(20, 33, 17, 8, torch.float32)
    x, weight, b, lora_A, lora_B = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    _, xa, mask = lora_linear_forward(x, weight, b, lora_A, lora_B, SCALING, 0.3, SEED)
    keep = lora_linear_mask(SEED, 20, 33, 0.3, DEVICE)
    ref = plain_torch(inputs, keep, 0.3, dtype=torch.float64)[2:]
    buffer = torch.zeros_like(x)
    grads = lora_linear_backward(inputs["grad_out"], x, weight, lora_A, lora_B, SCALING, xa, mask, 0.3, SEED, buffer,
                                 *need)
    for wanted, grad, ref_grad in zip(need, grads, ref):
        if wanted:
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
        else:
            assert grad is None
    if not need[0]:
        assert not buffer.any(), "grad_x was not asked for, so its buffer stays untouched"


def test_no_rows():
    inputs = make_inputs(0, 17, 33, 8, torch.bfloat16)
    x, weight, b, lora_A, lora_B = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    out, xa, mask = lora_linear_forward(x, weight, b, lora_A, lora_B, SCALING, 0.3, SEED)
    assert out.shape == (0, 33) and xa.shape == (0, 8)
    grads = lora_linear_backward(inputs["grad_out"], x, weight, lora_A, lora_B, SCALING, xa, mask, 0.3, SEED, None,
                                 True, True, True, True, True)
    assert [tuple(g.shape) for g in grads] == [(0, 17), (33, 17), (33,), (8, 17), (33, 8)]
    assert not any(g.any() for g in grads[1:])


def test_float64_is_refused():
    inputs = make_inputs(3, 17, 33, 8, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        lora_linear_forward(*(inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")), SCALING, 0.0, SEED)


def test_mask_keeps_one_minus_p_and_depends_only_on_seed_and_position():
    rows, cols, p = 64, 100, 0.3
    keep = lora_linear_mask(SEED, rows, cols, p, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (rows, cols)
    # 6400 Bernoulli(0.7) draws: standard deviation of the mean 0.0057; 4 of them.
    assert abs(keep.float().mean().item() - (1 - p)) < 0.023
    other = lora_linear_mask(SEED + 1, rows, cols, p, DEVICE)
    # Independent masks disagree on 2 p (1 - p) = 42% of the elements.
    assert 0.35 < (keep != other).float().mean().item() < 0.49
    assert torch.equal(lora_linear_mask(SEED, 5, cols, p, DEVICE), keep[:5]), "the mask must not depend on rows"
    assert torch.equal(lora_linear_mask(SEED, rows, cols, p, DEVICE), keep), "the same seed gives the same mask"
    big_seed = lora_linear_mask((1 << 62) - 1, rows, cols, p, DEVICE)  # the op's seeds take 62 bits
    assert abs(big_seed.float().mean().item() - (1 - p)) < 0.023 and not torch.equal(big_seed, keep)
    assert lora_linear_mask(SEED, 3, 5, 0.0, DEVICE).all()
    assert lora_linear_mask(SEED, 0, 5, p, DEVICE).shape == (0, 5)


@triton.jit
def _keep_at(out_ptr, base, dropout_p, BLOCK: tl.constexpr):
    offsets = base + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), lora._keep(12345, offsets, dropout_p).to(tl.uint8))


@triton.jit
def _tl_rand_keep(out_ptr, total, seed, dropout_p, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + offsets, (tl.rand(seed, offsets) >= dropout_p).to(tl.uint8), mask=offsets < total)


def test_mask_is_tl_rand_of_the_linear_index():
    keep = torch.empty(20 * 33, dtype=torch.uint8, device=DEVICE)
    _tl_rand_keep[(1,)](keep, keep.numel(), SEED, 0.3, BLOCK=1024)
    assert torch.equal(keep.view(20, 33).bool(), lora_linear_mask(SEED, 20, 33, 0.3, DEVICE))


def test_mask_offsets_do_not_wrap_at_2_to_the_32():
    """Tensors past 2^32 elements must not repeat the mask of their first 2^32 elements."""
    low, high = (torch.empty(4096, dtype=torch.uint8, device=DEVICE) for _ in range(2))
    _keep_at[(1,)](low, 0, 0.5, BLOCK=4096)
    _keep_at[(1,)](high, 1 << 32, 0.5, BLOCK=4096)
    assert 0.4 < (low != high).float().mean().item() < 0.6


def test_the_op_runs_on_the_triton_backend():
    """mmfast.ops.lora_linear with backend="triton": a 3-D input, two projections of it (grad_x accumulated
    across them), every gradient, without dropout against float64; with dropout, reproducible by torch's seed."""
    first = make_inputs(6, 17, 33, 8, torch.float32, seed=2)
    second = make_inputs(6, 17, 19, 1, torch.float32, bias=False, seed=3)
    names = ("weight", "bias", "lora_A", "lora_B")
    leaves = {(i, k): v.clone().requires_grad_() for i, p in enumerate((first, second)) for k, v in p.items()
              if k in names and v is not None}
    x = first["x"].view(2, 3, 17).clone().requires_grad_()

    def projections(dtype=None):
        return [tuple(None if (i, k) not in leaves else leaves[i, k].to(dtype or torch.float32) for k in names)
                + (SCALING,) for i in range(2)]

    outs = mmfast.ops.lora_linear_multi(x, projections(), backend="triton")
    assert [tuple(o.shape) for o in outs] == [(2, 3, 33), (2, 3, 19)]
    torch.autograd.backward(outs, [first["grad_out"].view(2, 3, 33), second["grad_out"].view(2, 3, 19)])
    got = [x.grad] + [leaves[key].grad for key in sorted(leaves)]
    x.grad = None
    for leaf in leaves.values():
        leaf.grad = None

    x64 = x.detach().double().requires_grad_()
    for (w, b, a, bb, s), g in zip(projections(torch.float64), (first["grad_out"], second["grad_out"])):
        out = x64 @ w.T + s * (x64 @ a.T) @ bb.T + (0 if b is None else b)
        out.backward(g.double().view(2, 3, -1))
    want = [x64.grad] + [leaves[key].grad for key in sorted(leaves)]
    for actual, expected in zip(got, want):
        torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-5)
    x.grad = None
    for leaf in leaves.values():
        leaf.grad = None

    def with_dropout(seed):
        torch.manual_seed(seed)
        return mmfast.ops.lora_linear(x, *projections()[0], dropout_p=0.3, backend="triton")

    dropped = with_dropout(0)
    assert torch.equal(dropped, with_dropout(0)) and not torch.equal(dropped, with_dropout(1))
    assert not torch.allclose(dropped, outs[0])
    dropped.sum().backward()
    for grad in (x.grad, *(leaves[0, k].grad for k in names)):
        assert grad is not None and grad.isfinite().all()
