"""mmfast.ops.lora_linear(_multi) on every backend that runs here, against a float64 plain-torch reference.

Dropout is checked exactly: each backend exposes the keep mask it draws for a seed (`lora_linear_mask`),
the reference applies that mask, and the op must agree with it in the forward and in every gradient.
"""

from __future__ import annotations

import pytest
import torch

from mmfast import backends
from mmfast.ops import lora_linear, lora_linear_multi
from mmfast.ops.lora import draw_seed
from tests.helpers import DEVICE, DTYPES, assert_within_torch_error, runnable_backends

OP = "lora_linear"
BACKENDS = runnable_backends(OP)
# The Triton interpreter runs a tile at a time in numpy: the bigger shapes stay with the compiled backends.
FAST_BACKENDS = [b for b in BACKENDS if b != "triton" or DEVICE == "cuda"]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def test_native_backends_run_here():
    """Guards against the matrix below silently shrinking when a build breaks."""
    expected = {"triton", "cuda", "torch"} if DEVICE == "cuda" else {"cpu", "triton", "torch"}
    assert expected <= set(BACKENDS), f"runnable: {BACKENDS}"


def keep_mask(backend, seed, rows, cols, dropout_p):
    return backends.kernel(OP, backend, "mask")(seed, rows, cols, dropout_p, torch.device(DEVICE))


def formula(x, weight, bias, lora_A, lora_B, scaling, keep, dropout_p):
    """The op written out in plain torch, in x's dtype (float64: the reference)."""
    dropped = x * keep.to(x.dtype) / (1 - dropout_p)
    out = x @ weight.T + scaling * ((dropped @ lora_A.T) @ lora_B.T)
    return out if bias is None else out + bias


def make_inputs(lead, features, out_features, rank, dtype, *, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)

    return {
        "x": randn(*lead, features),
        "weight": randn(out_features, features, scale=features**-0.5),
        "bias": randn(out_features) if bias else None,
        "lora_A": randn(rank, features, scale=features**-0.5),
        "lora_B": randn(out_features, rank, scale=rank**-0.5),
    }


def run(fn, inputs, frozen=()):
    """Output and gradients of fn(**leaves) against a fixed upstream gradient."""
    leaves = {k: v.detach().clone().requires_grad_(k not in frozen) for k, v in inputs.items() if v is not None}
    out = fn(**leaves)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE, out.dtype)
    trainable = [k for k in leaves if k not in frozen]
    grads = torch.autograd.grad(out, [leaves[k] for k in trainable], upstream)
    return out.detach(), dict(zip(trainable, grads))


def check_against_reference(backend, inputs, scaling, dropout_p, frozen=()):
    dtype = inputs["x"].dtype
    rows, features = inputs["x"].reshape(-1, inputs["x"].shape[-1]).shape
    torch.manual_seed(7)
    seed = int(draw_seed())
    keep = keep_mask(backend, seed, rows, features, dropout_p).view(*inputs["x"].shape)

    def reference(**t):
        return formula(**{k: t.get(k) for k in NAMES}, scaling=scaling, keep=keep, dropout_p=dropout_p)

    def ours(**t):
        torch.manual_seed(7)  # the op draws the same seed as above
        return lora_linear(t["x"], t["weight"], t.get("bias"), t["lora_A"], t["lora_B"], scaling,
                           dropout_p=dropout_p, backend=backend)

    ref_out, ref_grads = run(reference, {k: None if v is None else v.double() for k, v in inputs.items()}, frozen)
    pt_out, pt_grads = run(reference, inputs, frozen)
    out, grads = run(ours, inputs, frozen)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_within_torch_error("out", out, pt_out, ref_out, dtype, scale=max(1.0, ref_out.abs().max().item()))
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == ref_grads[name].shape, name
        scale = max(1.0, ref_grads[name].abs().max().item())
        assert_within_torch_error(f"grad {name}", grad, pt_grads[name], ref_grads[name], dtype, scale=scale)


SHAPES = [  # (leading dims, in, out, r)
    ((3, 5), 17, 77, 8),
    ((13,), 77, 17, 1),
    ((2, 9), 1000, 77, 64),
    ((1,), 17, 1000, 8),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]},r{s[3]}")
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_matches_reference(backend, dtype, shape, dropout_p):
    lead, features, out_features, rank = shape
    check_against_reference(backend, make_inputs(lead, features, out_features, rank, dtype), 1.5, dropout_p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_reference_small(backend, dtype, dropout_p):
    """Every backend, the Triton interpreter included, on a shape it runs in seconds."""
    check_against_reference(backend, make_inputs((2, 3), 17, 33, 4, dtype), 0.5, dropout_p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [("weight", "bias"), ("x", "weight", "bias"), ("lora_A",), ()],
                         ids=["frozen-base", "frozen-input", "frozen-A", "all-trainable"])
def test_gradients_only_for_what_requires_them(backend, frozen):
    inputs = make_inputs((6,), 17, 19, 4, torch.float32)
    check_against_reference(backend, inputs, 2.0, 0.2, frozen=frozen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias(backend):
    check_against_reference(backend, make_inputs((5,), 17, 19, 3, torch.float32, bias=False), 1.0, 0.1)


def test_gradcheck_float64_cpu():
    inputs = make_inputs((2, 3), 9, 7, 3, torch.float64)
    leaves = [inputs[k].detach().requires_grad_() for k in NAMES]

    def fn(*t):
        torch.manual_seed(0)  # one mask for every evaluation
        return lora_linear(*t, 0.8, dropout_p=0.3, backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_equals_one_call_per_projection(backend):
    """Projection i draws with seed + i; x's gradient is their sum, accumulated in one buffer."""
    first = make_inputs((4,), 17, 19, 4, torch.float32, seed=1)
    second = make_inputs((4,), 17, 23, 2, torch.float32, bias=False, seed=2)
    x = first["x"].requires_grad_()
    params = [{k: v.requires_grad_() for k, v in p.items() if k != "x" and v is not None} for p in (first, second)]
    projections = [(p["weight"], p.get("bias"), p["lora_A"], p["lora_B"], s) for p, s in zip(params, (0.5, 2.0))]
    torch.manual_seed(3)
    seed = int(draw_seed())
    torch.manual_seed(3)
    outputs = lora_linear_multi(x, projections, dropout_p=0.2, backend=backend)
    sum(o.square().sum() for o in outputs).backward()
    ours = [x.grad] + [p[k].grad for p in params for k in p]

    x_ref = x.detach().clone().requires_grad_()
    params_ref = [{k: v.detach().clone().requires_grad_() for k, v in p.items()} for p in params]
    expected = []
    for index, (p, scaling) in enumerate(zip(params_ref, (0.5, 2.0))):
        keep = keep_mask(backend, seed + index, 4, 17, 0.2)
        expected.append(formula(x_ref, p["weight"], p.get("bias"), p["lora_A"], p["lora_B"], scaling, keep, 0.2))
    sum(o.square().sum() for o in expected).backward()
    theirs = [x_ref.grad] + [p[k].grad for p in params_ref for k in p]
    for a, b in zip(outputs + ours, expected + theirs):  # fp32 against fp32, summed in other orders
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_statistics(backend):
    rows, cols, p = (64, 200, 0.3) if backend != "triton" else (16, 64, 0.3)
    keep = keep_mask(backend, 123, rows, cols, p)
    assert keep.dtype == torch.bool and keep.shape == (rows, cols)
    n = rows * cols
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(keep, keep_mask(backend, 123, rows, cols, p)), "a seed must give one mask"
    other = keep_mask(backend, 124, rows, cols, p)
    agreement = (keep == other).float().mean().item()  # independent masks agree on p^2 + (1-p)^2 of the entries
    assert abs(agreement - (p * p + (1 - p) ** 2)) < 0.05
    assert not any(torch.equal(keep[0], keep[i]) for i in range(1, rows)), "rows must not repeat"
    assert keep_mask(backend, 5, 3, 4, 0.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_has_no_dropout(backend):
    t = make_inputs((4,), 17, 19, 4, torch.float32)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.5)
    out = lora_linear(*args, dropout_p=0.5, training=False, backend=backend)
    plain = formula(*args, keep=torch.ones_like(t["x"], dtype=torch.bool), dropout_p=0.0)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_saves_x_xa_and_a_compact_mask_never_dropout_x(backend):
    t = make_inputs((64,), 256, 128, 8, torch.float32)
    x = t["x"].requires_grad_()
    lora_A, lora_B = t["lora_A"].requires_grad_(), t["lora_B"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        lora_linear(x, t["weight"], t["bias"], lora_A, lora_B, 1.0, dropout_p=0.1, backend=backend)
    parameters = {p.data_ptr() for k, p in t.items() if k != "x"}
    activations = [s for s in saved if s.data_ptr() not in parameters]
    big = [s for s in activations if s.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "only x itself may be as large as x"
    activation_bytes = sum(s.numel() * s.element_size() for s in activations if s.data_ptr() != x.data_ptr())
    seed = 8
    assert activation_bytes <= 64 * 8 * 4 + 64 * 256 // 8 + seed, "beyond x: xa and at most a bit per element of x"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_its_dtype(backend):
    t = make_inputs((4,), 17, 19, 4, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0, backend=backend)
    assert out.dtype == torch.bfloat16
    plain = formula(*(t[k] for k in NAMES), 1.0, torch.ones(4, 17, dtype=torch.bool, device=DEVICE), 0.0)
    torch.testing.assert_close(out.float(), plain, rtol=2e-2, atol=2e-2)


def test_bad_input_names_the_argument():
    t = make_inputs((4,), 17, 19, 4, torch.float32)
    x, w, b, a, bb = (t[k] for k in NAMES)
    cases = [
        ((x, w, b, a, bb[:, :3], 1.0), {}, ValueError, "lora_B"),
        ((x, w, b, a[:, :5], bb, 1.0), {}, ValueError, "lora_A"),
        ((x, w[:, :5], b, a, bb, 1.0), {}, ValueError, "weight"),
        ((x, w, b[:4], a, bb, 1.0), {}, ValueError, "bias"),
        ((x, w, b, a, bb.double(), 1.0), {}, TypeError, "lora_B"),
        ((x.long(), w, b, a, bb, 1.0), {}, TypeError, "x"),
        ((x, w.to("meta"), b, a, bb, 1.0), {}, ValueError, "weight"),
        ((x, w, b, a, bb, 1.0), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        ((x, w, b, a, bb, 1.0), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        ((x, w, b, a, bb, "2"), {}, TypeError, "scaling"),
        ((x, w, b, a, bb, 1.0), {"backend": "nope"}, ValueError, "backend"),
    ]
    for args, kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            lora_linear(*args, **kwargs)
    with pytest.raises(ValueError, match=r"projections\[1\]\.lora_B"):
        lora_linear_multi(x, [(w, b, a, bb, 1.0), (w, b, a, bb[:3], 1.0)])


def philox4x32_10(seed: int, row: int, group: int) -> list[int]:
    """One Philox4x32-10 block, counter (group, row) and key seed, as at::Philox4_32(seed, row, group) draws it."""
    mask32 = 0xFFFFFFFF
    c = [group & mask32, group >> 32, row & mask32, row >> 32]
    k0, k1 = seed & mask32, seed >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & mask32, (p0 >> 32) ^ c[3] ^ k1, p0 & mask32]
        k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
    return c


@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda") if b in BACKENDS])
def test_native_masks_are_philox_of_seed_row_and_column(backend):
    """The cpu and cuda backends draw one scheme (csrc/lora_dropout.h), so they agree on every mask."""
    seed, rows, cols, p = (3 << 40) + 12345, 3, 37, 0.4
    threshold = int(p * 2**32)
    # Column 32 t + 8 w + l is word w of group 8 t + l (csrc/lora_dropout.h).
    expected = torch.tensor([[philox4x32_10(seed, i, j // 32 * 8 + j % 8)[j % 32 // 8] >= threshold
                              for j in range(cols)] for i in range(rows)])
    assert torch.equal(keep_mask(backend, seed, rows, cols, p).cpu(), expected)


def test_autocast_casts_weights_when_x_already_has_its_dtype():
    t = make_inputs((4,), 17, 19, 4, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = lora_linear(t["x"].bfloat16(), t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compiles_without_graph_break(dropout_p):
    """The ops are torch.library custom ops: dynamo and AOTAutograd trace them whole, seed draw included.
    aot_eager runs the traced graph on torch's own generator, so it draws the seeds eager mode draws."""
    t = make_inputs((2, 5), 17, 19, 4, torch.float32)
    params = [t[k].clone().requires_grad_() for k in ("lora_A", "lora_B")]
    x = t["x"].clone().requires_grad_()

    def step(x, lora_A, lora_B):
        q, k = lora_linear_multi(x, [(t["weight"], t["bias"], lora_A, lora_B, 2.0), (t["weight"], None, lora_A,
                                                                                        lora_B, 0.5)],
                                 dropout_p=dropout_p)
        return (q * k).sum()

    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        torch.manual_seed(0)
        loss = fn(x, *params)
        results.append((loss.detach(), *torch.autograd.grad(loss, [x, *params])))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager)
