"""The Triton linear cross-entropy kernels called directly (in the interpreter without a GPU), against a
float64 plain-torch reference, under the tolerance rule of DESIGN.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfast.kernels.linear_cross_entropy import linear_cross_entropy_forward
from tests.helpers import DEVICE, DTYPES, assert_within_torch_error


def make_inputs(rows, hidden_dim, vocab, dtype, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)

    # Logits of a few units, so that softmax is neither flat nor one-hot and a softcap of 5 bends them.
    hidden = randn(rows, hidden_dim)
    weight = randn(vocab, hidden_dim, scale=2.0 / hidden_dim**0.5)
    target = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    grad_loss = torch.rand(rows, generator=generator, dtype=torch.float32).to(DEVICE)
    return hidden, weight, randn(vocab) if bias else None, target, grad_loss


def plain_torch(hidden, weight, bias, target, grad_loss, label_smoothing=0.0, z_loss=0.0, softcap=0.0):
    """(loss, lse, argmax, grad_hidden, grad_weight, grad_bias) with torch's own ops in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    z = leaves[0] @ leaves[1].T
    if bias is not None:
        z = z + leaves[2]
    x = softcap * torch.tanh(z / softcap) if softcap > 0 else z
    lse = torch.logsumexp(x, dim=1)
    loss = F.cross_entropy(x, target, reduction="none", label_smoothing=label_smoothing) + z_loss * lse**2
    loss.backward(grad_loss.to(loss.dtype))
    grads = [t.grad for t in leaves] + [None] * (3 - len(leaves))
    return (loss.detach(), lse.detach(), z.argmax(dim=1), *grads)


def check(rows, hidden_dim, vocab, dtype, bias=True, **options):
    hidden, weight, b, target, grad_loss = make_inputs(rows, hidden_dim, vocab, dtype, bias)
    ref = plain_torch(hidden.double(), weight.double(), None if b is None else b.double(), target,
                      grad_loss.double(), **options)
    expected = plain_torch(hidden, weight, b, target, grad_loss, **options)
    out = linear_cross_entropy_forward(hidden, weight, b, target, grad_loss, options.get("label_smoothing", 0.0),
                                       options.get("z_loss", 0.0), options.get("softcap", 0.0), 4, True, True, True,
                                       True)
    loss, lse, argmax = out[:3]
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (rows,)
    scale = max(1.0, ref[0].abs().max().item())
    assert_within_torch_error("loss", loss, expected[0], ref[0], dtype, scale=scale)
    assert_within_torch_error("lse", lse, expected[1], ref[1], dtype, scale=scale)
    assert argmax.dtype == torch.long and torch.equal(argmax, ref[2])
    for name, grad, like, pt_grad, ref_grad in zip(("grad_hidden", "grad_weight", "grad_bias"), out[3:],
                                                   (hidden, weight, b), expected[3:], ref[3:]):
        if like is None:
            assert grad is None, name
            continue
        assert grad.dtype == like.dtype and grad.shape == like.shape, name
        assert_within_torch_error(name, grad, pt_grad, ref_grad, dtype)


OPTIONS = [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-3},
    {"softcap": 5.0},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_ragged_shape_matches_reference(dtype, options):
    """37 rows, H = 19, V = 1000: no dimension a multiple of any block, several tiles along each."""
    check(37, 19, 1000, dtype, bias=bool(options), **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 64, 300), (1, 24, 77)], ids=str)
def test_small_shapes_with_every_option(dtype, shape):
    check(*shape, dtype, label_smoothing=0.05, z_loss=1e-4, softcap=30.0)


# The interpreter computes the padding rows' exp overflow in numpy, which warns; the kernel discards them.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_argmax_takes_the_first_of_ties_and_large_logits_stay_finite():
    """Ties within one vocabulary tile (500, 510) and across tiles (900): the first index wins. Logits of 100
    overflow exp in fp32, also in the padding rows of a row block, which must not turn the sums into nan."""
    hidden, weight, bias, target, grad_loss = make_inputs(6, 19, 1000, torch.float32)
    weight[[500, 510, 900]] = 0
    bias[[500, 510, 900]] = 100.0
    out = linear_cross_entropy_forward(hidden, weight, bias, target, grad_loss, 0.0, 0.0, 0.0, 4, True, True, True,
                                       True)
    assert out[2].tolist() == [500] * 6
    ref = plain_torch(hidden.double(), weight.double(), bias.double(), target, grad_loss.double())
    for name, actual, expected in zip(("loss", "lse", "argmax", "grad_hidden", "grad_weight", "grad_bias"), out, ref):
        torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_without_grad_loss_only_the_forward_runs():
    hidden, weight, bias, target, _ = make_inputs(5, 64, 300, torch.float32)
    loss, lse, argmax, *grads = linear_cross_entropy_forward(hidden, weight, bias, target, None, 0.0, 0.0, 0.0, 4,
                                                             True, True, True, False)
    ref = plain_torch(hidden.double(), weight.double(), bias.double(), target, torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-5)
    assert argmax is None and grads == [None, None, None]


@pytest.mark.parametrize("need", [(True, False, True), (False, True, False)], ids=["no_grad_weight", "weight_only"])
def test_only_the_requested_gradients(need):
    hidden, weight, bias, target, grad_loss = make_inputs(5, 64, 300, torch.float32)
    ref = plain_torch(hidden.double(), weight.double(), bias.double(), target, grad_loss.double())
    grads = linear_cross_entropy_forward(hidden, weight, bias, target, grad_loss, 0.0, 0.0, 0.0, 4, *need, False)[3:]
    for wanted, grad, ref_grad in zip(need, grads, ref[3:]):
        if wanted:
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
        else:
            assert grad is None


def test_no_bias_means_no_grad_bias():
    hidden, weight, _, target, grad_loss = make_inputs(5, 64, 300, torch.float32, bias=False)
    assert linear_cross_entropy_forward(hidden, weight, None, target, grad_loss, 0.0, 0.0, 0.0, 4, True, True, True,
                                        False)[5] is None


def test_no_rows():
    hidden, weight, bias, target, grad_loss = make_inputs(0, 19, 77, torch.bfloat16)
    loss, lse, argmax, grad_hidden, grad_weight, grad_bias = linear_cross_entropy_forward(
        hidden, weight, bias, target, grad_loss, 0.1, 0.0, 0.0, 4, True, True, True, True)
    assert loss.shape == lse.shape == argmax.shape == (0,) and grad_hidden.shape == (0, 19)
    assert grad_weight.dtype == grad_bias.dtype == torch.bfloat16
    assert not grad_weight.any() and not grad_bias.any()


def test_float64_is_refused():
    hidden, weight, bias, target, grad_loss = make_inputs(3, 19, 77, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        linear_cross_entropy_forward(hidden, weight, bias, target, grad_loss, 0.0, 0.0, 0.0, 4, True, True, True,
                                     False)
