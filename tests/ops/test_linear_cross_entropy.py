"""mmfast.ops.linear_cross_entropy on every backend that runs here, against a float64 plain-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfast.ops import linear_cross_entropy
from tests.helpers import DEVICE, DTYPES, assert_within_torch_error, runnable_backends
from tests.ops.test_cross_entropy import plain_torch_cross_entropy

BACKENDS = runnable_backends("linear_cross_entropy")
# The Triton interpreter runs a tile at a time in numpy: the biggest shapes stay with the compiled backends.
FAST_BACKENDS = [b for b in BACKENDS if b != "triton" or DEVICE == "cuda"]


def test_native_backends_run_here():
    """Guards against the matrix below silently shrinking when a build breaks."""
    expected = {"triton", "cuda", "torch"} if DEVICE == "cuda" else {"cpu", "triton", "torch"}
    assert expected <= set(BACKENDS), f"runnable: {BACKENDS}"


def plain_torch_linear_cross_entropy(hidden, weight, target, *, bias=None, chunk_size=None, **options):
    """The unfused loss, logits and all; in float64 it is the reference."""
    return plain_torch_cross_entropy(F.linear(hidden, weight, bias), target, **options)


def make_inputs(tokens, vocab, width, dtype, *, bias=True, ignored=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)

    hidden = randn(*tokens, width)
    weight = randn(vocab, width, scale=2 / width**0.5)  # logits of a few units, as in a trained head
    target = torch.randint(0, vocab, tokens, generator=generator).to(DEVICE)
    target[torch.rand(tokens, generator=generator).to(DEVICE) < ignored] = -100
    return hidden, weight, target, randn(vocab) if bias else None


def run(fn, hidden, weight, target, bias, *, frozen=(), grad_scale=1.3, **options):
    """Loss and gradients of `fn`; the upstream gradient is not 1 so that its scaling is tested too."""
    inputs = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {k: v.detach().clone().requires_grad_(k not in frozen) for k, v in inputs.items() if v is not None}
    loss = fn(leaves["hidden"], leaves["weight"], target, bias=leaves.get("bias"), **options)
    generator = torch.Generator().manual_seed(1)
    upstream = grad_scale * torch.rand(loss.shape, generator=generator, dtype=torch.float64).to(DEVICE, loss.dtype)
    trainable = [v for k, v in leaves.items() if k not in frozen]
    grads = torch.autograd.grad(loss, trainable, upstream) if trainable else ()
    return loss.detach(), dict(zip([k for k in leaves if k not in frozen], grads))


def check_against_reference(backend, hidden, weight, target, bias, *, frozen=(), **options):
    dtype = hidden.dtype
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref_loss, ref_grads = run(plain_torch_linear_cross_entropy, to64(hidden), to64(weight), target, to64(bias),
                              frozen=frozen, **options)
    pt_loss, pt_grads = run(plain_torch_linear_cross_entropy, hidden, weight, target, bias, frozen=frozen, **options)
    ours = lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k)  # noqa: E731
    loss, grads = run(ours, hidden, weight, target, bias, frozen=frozen, **options)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert_within_torch_error("loss", loss, pt_loss, ref_loss, dtype, scale=max(1.0, ref_loss.abs().max().item()))
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == ref_grads[name].shape, name
        assert_within_torch_error(f"grad {name}", grad, pt_grads[name], ref_grads[name], dtype)


OPTIONS = [
    {},
    {"label_smoothing": 0.1, "chunk_size": 8},
    {"z_loss": 1e-3, "reduction": "sum"},
    {"softcap": 5.0, "chunk_size": 16},
    {"label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0, "reduction": "sum", "chunk_size": 24},
    {"reduction": "none", "chunk_size": 8},
    {"reduction": "none", "label_smoothing": 0.1, "softcap": 5.0},
]
OPTION_IDS = [",".join(f"{k}={v}" for k, v in o.items()) or "plain" for o in OPTIONS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_matches_reference(backend, dtype, bias, options):
    hidden, weight, target, b = make_inputs((37,), 1000, 19, dtype, bias=bias)
    check_against_reference(backend, hidden, weight, target, b, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [{}, {"reduction": "none", "chunk_size": 8}], ids=["mean", "none"])
def test_batch_of_sequences(backend, dtype, options):
    hidden, weight, target, bias = make_inputs((2, 9), 77, 32, dtype)
    check_against_reference(backend, hidden, weight, target, bias, **options)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llama3_vocabulary(backend, dtype):
    hidden, weight, target, bias = make_inputs((5,), 128256, 64, dtype, bias=False, ignored=0.0)
    check_against_reference(backend, hidden, weight, target, bias, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [("weight", "bias"), ("hidden",), ("hidden", "weight", "bias")], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_inputs_get_no_gradient(backend, frozen, reduction):
    hidden, weight, target, bias = make_inputs((37,), 1000, 19, torch.float32)
    check_against_reference(backend, hidden, weight, target, bias, frozen=frozen, reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(backend, reduction):
    hidden, weight, target, bias = make_inputs((4,), 11, 16, torch.float32, ignored=1.0)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = linear_cross_entropy(h, w, target, bias=b, reduction=reduction, backend=backend)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    (loss.sum() if reduction == "none" else loss).backward()
    for grad in (h.grad, w.grad, b.grad):
        assert (grad == 0).all()  # as torch: zero, not nan, even for the nan mean


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_inside_the_vocabulary(backend):
    hidden, weight, target, bias = make_inputs((9,), 20, 16, torch.float32, ignored=0.0)
    target[::2] = 4
    check_against_reference(backend, hidden, weight, target, bias, ignore_index=4, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_and_argmax(backend, dtype):
    hidden, weight, target, bias = make_inputs((2, 9), 300, 32, dtype)
    loss, lse, argmax = linear_cross_entropy(hidden, weight, target, bias=bias, reduction="none", return_lse=True,
                                             return_argmax=True, softcap=20.0, backend=backend)
    logits = F.linear(hidden.double(), weight.double(), bias.double())
    valid = target != -100
    capped = 20.0 * torch.tanh(logits / 20.0)
    expected_lse = torch.where(valid, torch.logsumexp(capped, dim=-1), 0.0)
    assert lse.shape == argmax.shape == target.shape and not lse.requires_grad
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=0)
    # Where the top two logits are closer than the dtype's rounding, either is a right answer.
    top2 = logits.topk(2, dim=-1).values
    clear = valid & (top2[..., 0] - top2[..., 1] > 0.1)
    assert (argmax[clear] == logits.argmax(dim=-1)[clear]).all()
    assert (argmax[~valid] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_backward_runs_once(backend):
    hidden, weight, target, bias = make_inputs((6,), 50, 16, torch.float32)
    loss = linear_cross_entropy(hidden.requires_grad_(), weight, target, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can be backpropagated once"):
        loss.backward()


def test_no_grad_mode_computes_only_the_loss():
    hidden, weight, target, bias = make_inputs((6,), 50, 16, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), target, bias=bias)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight, bias), target))


def test_gradcheck_float64():
    """gradcheck backpropagates through one graph many times, which only reduction="none" allows."""
    hidden, weight, target, bias = make_inputs((5,), 13, 4, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    for options in ({"reduction": "none"}, {"label_smoothing": 0.2, "z_loss": 0.01, "softcap": 2.0, "reduction": "none",
                                            "chunk_size": 2}):
        for backend in {"cpu", "torch"} & set(BACKENDS):
            fn = lambda h, w, b: linear_cross_entropy(h, w, target, bias=b, backend=backend, **options)  # noqa: E731
            assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_without_graph_break(reduction):
    hidden, weight, target, bias = make_inputs((8,), 50, 16, torch.float32)

    def step(h, w, b):
        return linear_cross_entropy(h * 2, w, target, bias=b, label_smoothing=0.1, reduction=reduction).sum() + 1

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss, *(t.grad for t in leaves)))
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected)


def test_modules():
    import mmfast

    hidden, weight, target, bias = make_inputs((2, 9), 40, 16, torch.float32)
    head = torch.nn.Linear(16, 40).to(DEVICE)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    expected = F.cross_entropy(head(hidden).flatten(0, 1), target.flatten(), label_smoothing=0.1)
    loss_fn = mmfast.nn.LinearCrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(loss_fn(hidden, weight, target, bias), expected)
    fused = mmfast.nn.LinearCrossEntropyLoss.from_linear(head, label_smoothing=0.1)
    loss = fused(hidden, target)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert fused.head is head and head.weight.grad is not None  # trains the model's own head


def _bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 9, -100])
    return [
        (lambda: linear_cross_entropy(h.long(), w, t), TypeError, "hidden: expected a floating-point"),
        (lambda: linear_cross_entropy(h, w.double(), t), TypeError, "weight: expected hidden's dtype"),
        (lambda: linear_cross_entropy(h, w, t.float()), TypeError, "target: expected integer"),
        (lambda: linear_cross_entropy(h[0], w, t), ValueError, "hidden: expected shape"),
        (lambda: linear_cross_entropy(h, w[0], t), ValueError, r"weight: expected shape \(V, H\)"),
        (lambda: linear_cross_entropy(h, w[:, :7], t), ValueError, r"weight: expected shape \(V, 8\)"),
        (lambda: linear_cross_entropy(h, w[:0], t), ValueError, "V = 0"),
        (lambda: linear_cross_entropy(h, w, t[:-1]), ValueError, r"target: expected shape \(4,\)"),
        (lambda: linear_cross_entropy(h, w, t, bias=torch.zeros(9)), ValueError, r"bias: expected shape \(10,\)"),
        (lambda: linear_cross_entropy(h, w, t, bias=torch.zeros(10).double()), TypeError, "bias: expected hidden's"),
        (lambda: linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction: expected one of"),
        (lambda: linear_cross_entropy(h, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: linear_cross_entropy(h, w, t, z_loss=-1.0), ValueError, "z_loss"),
        (lambda: linear_cross_entropy(h, w, t, softcap=0.0), ValueError, "softcap"),
        (lambda: linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda: linear_cross_entropy(h, w, t, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2])), ValueError,
         r"target: expected class indices in \[0, 10\)"),
        (lambda: linear_cross_entropy(h, w, t, backend="fast"), ValueError, "backend: expected one of"),
        (lambda: linear_cross_entropy(h, w.to("meta"), t), ValueError, "weight: expected a tensor on the device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_refused_with_a_clear_error(case):
    call, error, message = _bad_inputs()[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_out_of_range_target_never_reaches_the_kernel(backend):
    hidden, weight, _, _ = make_inputs((2,), 5, 16, torch.float32)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 5], device=DEVICE), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_on_a_large_head(backend):
    hidden, weight, target, _ = make_inputs((1024,), 128256, 1024, torch.bfloat16, bias=False)
    check_against_reference(backend, hidden, weight, target, None, label_smoothing=0.1, z_loss=1e-4)


def test_logits_are_never_materialised():
    """Peak RSS of one forward+backward, in its own process: eager holds (N, V) logits and their
    gradient; mmfast's extra memory stays near the weight gradient, far below one (N, V) buffer."""
    from mmfast.bench import harness

    shape = {"N": 2048, "H": 64, "V": 32000}
    logits_bytes = shape["N"] * shape["V"] * 4
    peaks = {}
    for variant in ("eager", "mmfast-cpu"):
        spec = {"module": "mmfast.bench.linear_cross_entropy", "variant": variant, "shape": shape, "device": "cpu",
                "dtype": "float32", "warmup": 1, "iters": 1}
        result = harness.run_worker(spec)
        assert result["status"] == "ok", result
        peaks[variant] = result["peak_extra_bytes"]
    assert peaks["eager"] > 2 * logits_bytes, "the measurement must see eager's buffers"
    assert peaks["mmfast-cpu"] < 0.25 * logits_bytes, peaks
