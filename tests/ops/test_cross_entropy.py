"""mmfast.ops.cross_entropy on every backend that runs here, against a float64 plain-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfast.ops import cross_entropy
from tests.helpers import DEVICE, DTYPES, assert_within_torch_error, runnable_backends

BACKENDS = runnable_backends("cross_entropy")


def test_native_backends_run_here():
    """Guards against the matrix below silently shrinking when a build breaks."""
    expected = {"triton", "cuda", "torch"} if DEVICE == "cuda" else {"cpu", "triton", "torch"}
    assert expected <= set(BACKENDS), f"runnable: {BACKENDS}"


def plain_torch_cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                              z_loss=0.0, softcap=None):
    """The same loss written with torch's own ops; in float64 it is the reference."""
    x = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    vocab = x.shape[-1]
    flat, flat_target = x.reshape(-1, vocab), target.reshape(-1)
    loss = F.cross_entropy(flat, flat_target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = flat_target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(flat, dim=-1) ** 2 * valid
    if reduction == "none":
        return loss.view(target.shape)
    return loss.sum() / valid.sum() if reduction == "mean" else loss.sum()


def make_inputs(shape, dtype, ignored=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=generator, dtype=torch.float64) * 4).to(DEVICE, dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator).to(DEVICE)
    target[torch.rand(shape[:-1], generator=generator).to(DEVICE) < ignored] = -100
    return logits, target


def token_contiguous(x, ld=None):
    """x (N, V) as a vocab-major matmul writes logits: unit stride over N, vocab rows ld >= N apart."""
    rows = x.shape[0]
    view = torch.empty(x.shape[1], ld or rows, dtype=x.dtype, device=x.device)[:, :rows].t()
    return view.copy_(x)


def check_against_reference(backend, logits, target, layout=lambda x: x, **options):
    """layout(x) gives each run its logits: the same values, laid out in memory as the test asks."""
    dtype = logits.dtype
    results = []
    for fn, x in (
        (plain_torch_cross_entropy, logits.double()),
        (plain_torch_cross_entropy, logits),
        (lambda *a, **k: cross_entropy(*a, backend=backend, **k), logits),
    ):
        x = layout(x.detach().clone()).requires_grad_()
        loss = fn(x, target, **options)
        grad_out = torch.ones_like(loss) if loss.dim() else None
        loss.backward(grad_out)
        results.append((loss.detach(), x.grad))
    (ref_loss, ref_grad), (pt_loss, pt_grad), (loss, grad) = results
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_within_torch_error("loss", loss, pt_loss, ref_loss, dtype, scale=max(1.0, ref_loss.abs().max().item()))
    assert_within_torch_error("grad", grad, pt_grad, ref_grad, dtype)


SHAPES = [(3, 7), (37, 1000), (2, 9, 320)]
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0, "reduction": "sum"},
    {"reduction": "none"},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_matches_reference(backend, dtype, shape, options):
    logits, target = make_inputs(shape, dtype)
    check_against_reference(backend, logits, target, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 128256), (2, 65537)], ids=str)
def test_large_vocabulary(backend, dtype, shape):
    logits, target = make_inputs(shape, dtype, ignored=0.0)
    check_against_reference(backend, logits, target, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_of_sequences_with_llama_vocabulary(backend, dtype):
    logits, target = make_inputs((2, 9, 32000), dtype)
    check_against_reference(backend, logits, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(backend, reduction):
    logits, target = make_inputs((4, 11), torch.float32, ignored=1.0)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, reduction=reduction, backend=backend)
    expected = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    (loss.sum() if reduction == "none" else loss).backward()
    assert (x.grad == 0).all()  # as torch: zero, not nan, even for the nan mean


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_inside_the_vocabulary(backend):
    logits, target = make_inputs((9, 20), torch.float32, ignored=0.0)
    target[::2] = 4
    check_against_reference(backend, logits, target, ignore_index=4, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_writes_gradient_into_logits(backend, dtype):
    logits, target = make_inputs((6, 300), dtype)
    x = logits.clone().requires_grad_()
    cross_entropy(x, target, backend=backend, z_loss=1e-3).backward()
    expected = x.grad

    y = logits.clone().requires_grad_()
    storage = y.data_ptr()
    cross_entropy(y, target, backend=backend, z_loss=1e-3, inplace_backward=True).backward()
    assert y.grad.data_ptr() == storage, "the gradient must live in the logits' own buffer"
    torch.testing.assert_close(y.grad, expected)


TOKEN_LAYOUTS = [((37, 1000), None), ((3, 7), None), ((65, 333), None), ((37, 1000), 80)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ld", TOKEN_LAYOUTS, ids=lambda v: str(v) if v else "dense")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_token_contiguous_logits(backend, dtype, shape, ld, options):
    """Logits as a vocab-major matmul writes them, (V, ld) row-major: the cpu backend reads them in place."""
    logits, target = make_inputs(shape, dtype)
    if not options.get("label_smoothing"):  # with smoothing, a -inf logit makes the loss infinite
        logits[1, ::3] = float("-inf")
        target[1] = 1
    check_against_reference(backend, logits, target, layout=lambda x: token_contiguous(x, ld), **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ld", TOKEN_LAYOUTS, ids=lambda v: str(v) if v else "dense")
def test_inplace_backward_into_token_contiguous_logits(backend, dtype, shape, ld):
    logits, target = make_inputs(shape, dtype)
    x = logits.clone().requires_grad_()
    cross_entropy(x, target, backend=backend, z_loss=1e-3, softcap=20.0).backward()

    y = token_contiguous(logits, ld).requires_grad_()
    strides = y.stride()
    cross_entropy(y, target, backend=backend, z_loss=1e-3, softcap=20.0, inplace_backward=True).backward()
    assert y.stride() == strides == (1, ld or shape[0])
    torch.testing.assert_close(y.detach(), x.grad)  # the gradient, written over the logits in their layout
    torch.testing.assert_close(y.grad, x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_and_int32_targets(backend):
    """Logits sliced out of a wider buffer (row stride != V), as after dropping a padding column."""
    wide, target = make_inputs((7, 130), torch.float32)
    logits = wide[:, :129]
    target = target.clamp(max=128).int()
    x = logits.clone().requires_grad_()
    expected = F.cross_entropy(x, target.long())
    expected.backward()
    y = logits.detach().requires_grad_()
    loss = cross_entropy(y, target, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(y.grad, x.grad)


def test_gradcheck_cpu_backend_float64():
    torch.manual_seed(0)
    logits = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 12, -100, 3, 7])
    for options in ({}, {"label_smoothing": 0.2, "z_loss": 0.01, "softcap": 2.0, "reduction": "none"}):
        assert torch.autograd.gradcheck(lambda x: cross_entropy(x, target, backend="cpu", **options), (logits,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    x = torch.zeros(0, 10, device=DEVICE, requires_grad=True)
    loss = cross_entropy(x, torch.zeros(0, dtype=torch.long, device=DEVICE), reduction="sum", backend=backend)
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (0, 10)


def test_compiles_without_graph_break():
    logits, target = make_inputs((8, 50), torch.float32)

    def step(x, t):
        return cross_entropy(x * 2, t, label_smoothing=0.1, z_loss=1e-3) + 1

    compiled = torch.compile(step, fullgraph=True)
    x = logits.clone().requires_grad_()
    loss = compiled(x, target)
    loss.backward()
    y = logits.clone().requires_grad_()
    expected = step(y, target)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, y.grad)


def test_compiles_with_inplace_backward_and_chosen_backend():
    logits, target = make_inputs((8, 50), torch.float32)
    compiled = torch.compile(
        lambda x, t: cross_entropy(x, t, inplace_backward=True, backend="torch"), fullgraph=True, backend="aot_eager"
    )
    x = logits.clone().requires_grad_()
    compiled(x, target).backward()
    y = logits.clone().requires_grad_()
    F.cross_entropy(y, target).backward()
    torch.testing.assert_close(x.grad, y.grad)


BAD_INPUTS = [
    (lambda x, t: cross_entropy(x.long(), t), TypeError, "logits: expected a floating-point"),
    (lambda x, t: cross_entropy(x, t.float()), TypeError, "target: expected integer"),
    (lambda x, t: cross_entropy(x[0], t), ValueError, "logits: expected shape"),
    (lambda x, t: cross_entropy(x, t[:-1]), ValueError, r"target: expected shape \(4,\)"),
    (lambda x, t: cross_entropy(x[:, :0], t), ValueError, "V = 0"),
    (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction: expected one of"),
    (lambda x, t: cross_entropy(x, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda x, t: cross_entropy(x, t, z_loss=-1.0), ValueError, "z_loss"),
    (lambda x, t: cross_entropy(x, t, softcap=0.0), ValueError, "softcap"),
    (lambda x, t: cross_entropy(x, t, softcap=-3.0), ValueError, "softcap"),
    (lambda x, t: cross_entropy(x, t, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda x, t: cross_entropy(x, torch.tensor([0, 1, 10, 2])), ValueError, r"target: expected class indices in \[0, 10\)"),
    (lambda x, t: cross_entropy(x, torch.tensor([0, 1, -5, 2])), ValueError, "ignore_index=-100"),
    (lambda x, t: cross_entropy(x, t, backend="fast"), ValueError, "backend: expected one of"),
    (lambda x, t: cross_entropy(x, t.to("meta")), ValueError, r"target: expected a tensor on the device of logits \(cpu\)"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_is_refused_with_a_clear_error(call, error, message):
    logits = torch.randn(4, 10)
    target = torch.tensor([0, 1, 9, -100])
    with pytest.raises(error, match=message):
        call(logits, target)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_out_of_range_target_never_reaches_the_kernel(backend):
    with pytest.raises(ValueError, match="target"):
        cross_entropy(torch.randn(2, 5, device=DEVICE), torch.tensor([0, 5], device=DEVICE), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_on_a_large_head(backend):
    logits, target = make_inputs((1024, 128256), torch.bfloat16)
    check_against_reference(backend, logits, target, label_smoothing=0.1, z_loss=1e-4)


def test_inplace_backward_needs_no_logits_sized_buffer():
    """Peak RSS of one forward+backward, in its own process: eager needs several (N, V) buffers,
    mmfast with inplace_backward none (only per-row floats)."""
    from mmfast.bench import harness

    shape = {"N": 1024, "V": 32000}
    logits_bytes = shape["N"] * shape["V"] * 4
    peaks = {}
    for variant in ("eager", "mmfast-cpu"):
        spec = {"module": "mmfast.bench.cross_entropy", "variant": variant, "shape": shape, "device": "cpu",
                "dtype": "float32", "warmup": 1, "iters": 1}
        result = harness.run_worker(spec)
        assert result["status"] == "ok", result
        peaks[variant] = result["peak_extra_bytes"]
    assert peaks["eager"] > logits_bytes, "the measurement must see eager's buffers"
    assert peaks["mmfast-cpu"] < 0.05 * logits_bytes, peaks
