"""mmfast.ops.cross_modal_attention on every backend that runs here, against a float64 per-sample reference.

The reference is written here, independently of the backends: each sample's attention on its own, with a
plain softmax, so that padding, packing and the online softmax of the kernels are all under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmfast.ops import cross_modal_attention
from tests.helpers import DEVICE, DTYPES, assert_within_torch_error, runnable_backends

OP = "cross_modal_attention"
BACKENDS = runnable_backends(OP)
# The Triton interpreter runs a tile at a time in numpy: the bigger cases stay with the compiled backends.
FAST_BACKENDS = [b for b in BACKENDS if b != "triton" or DEVICE == "cuda"]


def test_native_backends_run_here():
    """Guards against the matrix below silently shrinking when a build breaks."""
    expected = {"triton", "cuda", "torch"} if DEVICE == "cuda" else {"cpu", "triton", "torch"}
    assert expected <= set(BACKENDS), f"runnable: {BACKENDS}"


def offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def per_sample(q, k, v, cu_q, cu_k, causal, scale, gate, residual):
    """The op written out sample by sample in plain torch, in q's dtype (float64: the reference)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for b in range(cu_q.numel() - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        scores = scale * qs @ ks.transpose(1, 2)
        if causal:
            lq, lk = qs.shape[1], ks.shape[1]
            rows = torch.arange(lq, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(lk, device=q.device) > rows + lk - lq, -math.inf)
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows without keys: zero attention
        outs.append((probs @ vs).transpose(0, 1))
    attn = torch.cat(outs)
    if gate is None and residual is None:
        return attn
    if gate is not None:
        attn = torch.tanh(gate.to(attn.dtype)).reshape(-1, 1) * attn  # scalar or per head
    return attn if residual is None else residual + attn


def make_inputs(lengths_q, lengths_k, heads_q, heads_k, dim, dtype, *, gated=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    inputs = {"q": randn(sum(lengths_q), heads_q, dim), "k": randn(sum(lengths_k), heads_k, dim),
              "v": randn(sum(lengths_k), heads_k, dim)}
    if gated:
        inputs["gate"] = randn(heads_q).float() * 2
        inputs["residual"] = randn(sum(lengths_q), heads_q, dim)
    return inputs, offsets(lengths_q), offsets(lengths_k)


def run(fn, inputs, seed=1):
    """Output and gradients of fn(**leaves) against a fixed upstream gradient."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    out = fn(**leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), upstream.to(DEVICE, out.dtype))
    return out.detach(), dict(zip(leaves, grads))


def check(backend, inputs, cu_q, cu_k, *, causal=False):
    dtype = inputs["q"].dtype
    scale = inputs["q"].shape[-1] ** -0.5

    def reference(q, k, v, gate=None, residual=None):
        return per_sample(q, k, v, cu_q, cu_k, causal, scale, gate, residual)

    def ours(q, k, v, gate=None, residual=None):
        return cross_modal_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, gate=gate,
                                     residual=residual, backend=backend)

    as64 = {name: t.double() for name, t in inputs.items()}
    ref_out, ref_grads = run(reference, as64)
    pt_out, pt_grads = run(reference, inputs)
    out, grads = run(ours, inputs)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert torch.isfinite(out).all()
    assert_within_torch_error("out", out, pt_out, ref_out, dtype, scale=max(1.0, ref_out.abs().max().item()))
    # The backward takes each row's softmax correction from the saved output, rowsum(grad * attn), as
    # FlashAttention does, where autograd sums P * dP: in float32 a few more ulps than autograd, hence a wider atol.
    slack = 10.0 if dtype == torch.float32 else 1.0
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        assert torch.isfinite(grad).all(), name
        scale_ = slack * max(1.0, ref_grads[name].abs().max().item())
        assert_within_torch_error(f"grad {name}", grad, pt_grads[name], ref_grads[name], dtype, scale=scale_)


CASES = [  # (query lengths, key lengths, Hq, Hk, D)
    ([0, 1, 17, 77, 257], [257, 17, 0, 1, 77], 4, 2, 32),
    ([77, 17, 3], [1, 257, 77], 2, 2, 80),
    ([257, 1], [77, 257], 4, 1, 96),
    ([17, 33], [65, 9], 2, 1, 128),
    ([129, 64], [300, 64], 2, 2, 64),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}k{c[1]}h{c[2]}/{c[3]}d{c[4]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_varlen_matches_reference(backend, dtype, case, causal, gated):
    lengths_q, lengths_k, heads_q, heads_k, dim = case
    inputs, cu_q, cu_k = make_inputs(lengths_q, lengths_k, heads_q, heads_k, dim, dtype, gated=gated)
    check(backend, inputs, cu_q, cu_k, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_reference_small(backend, dtype, causal):
    """Every backend, the Triton interpreter included, on lengths it runs in seconds."""
    inputs, cu_q, cu_k = make_inputs([0, 1, 17, 5], [6, 0, 17, 9], 4, 2, 32, dtype, gated=True)
    check(backend, inputs, cu_q, cu_k, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_shape", [(), (1,), (4,)])
def test_padded_matches_sdpa(backend, gate_shape):
    """The padded layout with a key padding mask, GQA, a scalar or per-head gate and a residual, against
    torch's own SDPA in float64."""
    batch, heads_q, heads_k, len_q, len_k, dim = 3, 4, 2, 9, 13, 32
    generator = torch.Generator().manual_seed(3)
    inputs = {"q": torch.randn(batch, heads_q, len_q, dim, generator=generator),
              "k": torch.randn(batch, heads_k, len_k, dim, generator=generator),
              "v": torch.randn(batch, heads_k, len_k, dim, generator=generator),
              "gate": torch.randn(gate_shape, generator=generator),
              "residual": torch.randn(batch, heads_q, len_q, dim, generator=generator)}
    inputs = {name: t.to(DEVICE) for name, t in inputs.items()}
    mask = torch.rand(batch, len_k, generator=generator) > 0.4
    mask[1] = False  # a sample without media: exactly the residual
    mask = mask.to(DEVICE)

    def reference(q, k, v, gate, residual):
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
        attn = attn.nan_to_num(0.0)  # SDPA gives NaN where a row has no key
        return residual + torch.tanh(gate.to(q.dtype)).reshape(1, -1, 1, 1) * attn

    def ours(q, k, v, gate, residual):
        return cross_modal_attention(q, k, v, key_padding_mask=mask, gate=gate, residual=residual, backend=backend)

    ref_out, ref_grads = run(reference, {name: t.double() for name, t in inputs.items()})
    out, grads = run(ours, inputs)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], inputs["residual"][1])
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape, name
        torch.testing.assert_close(grad.double(), ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.count_nonzero(grads["k"].transpose(1, 2)[~mask]) == 0  # masked keys get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_without_media_give_the_residual_and_zero_gradients(backend):
    inputs, cu_q, cu_k = make_inputs([5, 3, 4], [0, 7, 0], 2, 2, 32, torch.float32, gated=True)
    out, grads = run(lambda **t: cross_modal_attention(**t, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend),
                     inputs)
    no_media = torch.cat([torch.arange(0, 5), torch.arange(8, 12)]).to(DEVICE)
    assert torch.equal(out[no_media], inputs["residual"][no_media])
    assert torch.count_nonzero(grads["q"][no_media]) == 0
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.skipif(DEVICE != "cpu", reason="gradcheck in float64 runs on the cpu backend")
def test_gradcheck_cpu():
    inputs, cu_q, cu_k = make_inputs([3, 0, 5], [4, 2, 6], 2, 1, 8, torch.float64, gated=True)
    inputs["gate"] = inputs["gate"].double()
    for causal in (False, True):
        def fn(q, k, v, gate, residual):
            return cross_modal_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, gate=gate,
                                         residual=residual, backend="cpu")

        leaves = [t.detach().clone().requires_grad_() for t in inputs.values()]
        assert torch.autograd.gradcheck(fn, leaves)


def test_autocast_runs_in_the_autocast_dtype():
    inputs, cu_q, cu_k = make_inputs([4, 6], [5, 3], 2, 2, 32, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = cross_modal_attention(**inputs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("key_padding_mask", [False, True], ids=["varlen", "padded-mask"])
def test_compiles_without_graph_breaks(key_padding_mask):
    torch._dynamo.reset()
    if key_padding_mask:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, n, 32, generator=generator).to(DEVICE) for n in (5, 7, 7))
        mask = (torch.arange(7) < torch.tensor([[3], [7]])).to(DEVICE)
        kwargs = {"key_padding_mask": mask}
    else:
        inputs, cu_q, cu_k = make_inputs([4, 6], [5, 3], 2, 2, 32, torch.float32)
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        kwargs = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    gate = torch.tensor(0.5, device=DEVICE)

    def step(q, k, v, gate):
        return cross_modal_attention(q, k, v, gate=gate, residual=q, **kwargs)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate)]
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves)
    compiled_grads = torch.autograd.grad(compiled.sum(), leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def varlen(**overrides):
    inputs, cu_q, cu_k = make_inputs([2, 3], [4, 1], 4, 2, 32, torch.float32)
    kwargs = {**inputs, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, **overrides}
    return cross_modal_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


@pytest.mark.parametrize("overrides, error, match", [
    ({"cu_seqlens_q": offsets([2, 3]).long()}, TypeError, "cu_seqlens_q: expected int32"),
    ({"cu_seqlens_k": torch.tensor([1, 4, 5], dtype=torch.int32)}, ValueError, "cu_seqlens_k: expected offsets starting at 0"),
    ({"cu_seqlens_q": torch.tensor([0, 3, 2, 5], dtype=torch.int32),
      "cu_seqlens_k": torch.tensor([0, 1, 4, 5], dtype=torch.int32)}, ValueError, "cu_seqlens_q: expected non-decreasing"),
    ({"cu_seqlens_k": torch.tensor([0, 4, 6], dtype=torch.int32)}, ValueError, "cu_seqlens_k: expected offsets ending at the number of rows 5"),
    ({"cu_seqlens_k": torch.tensor([0, 5], dtype=torch.int32)}, ValueError, "cu_seqlens_k: expected cu_seqlens_q's length"),
    ({"cu_seqlens_k": None}, ValueError, "cu_seqlens_k: the varlen layout needs both"),
    ({"max_seqlen_q": 2}, ValueError, "max_seqlen_q: expected at least the longest sample's 3"),
    ({"k": torch.randn(5, 3, 32), "v": torch.randn(5, 3, 32)}, ValueError, "q: expected a number of heads divisible"),
    ({"k": torch.randn(5, 2, 16), "v": torch.randn(5, 2, 16)}, ValueError, "k: expected q's head dim 32"),
    ({"v": torch.randn(5, 2, 16)}, ValueError, "v: expected k's shape"),
    ({"q": torch.randn(5, 4, 32).double()}, TypeError, "k: expected q's dtype torch.float64"),
    ({"q": torch.randn(1, 5, 4, 32)}, ValueError, r"q: expected shape \(T, H, D\) with cu_seqlens"),
    ({"gate": torch.zeros(3)}, ValueError, r"gate: expected a scalar or shape \(4,\)"),
    ({"residual": torch.zeros(5, 4, 16)}, ValueError, "residual: expected q's shape"),
    ({"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "key_padding_mask: the varlen layout"),
    ({"scale": -1.0}, ValueError, "scale: expected a value in"),
    ({"causal": 1}, TypeError, "causal: expected a bool"),
    ({"backend": "nope"}, ValueError, "backend: expected one of"),
])
def test_bad_input_is_refused(overrides, error, match):
    overrides = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in overrides.items()}
    with pytest.raises(error, match=match):
        varlen(**overrides)


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 5, dtype=torch.bool), r"key_padding_mask: expected shape \(2, 7\)"),
    (torch.ones(2, 7), "key_padding_mask: expected a bool tensor"),
])
def test_bad_padded_mask_is_refused(mask, match):
    q, k = torch.randn(2, 2, 3, 32, device=DEVICE), torch.randn(2, 2, 7, 32, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        cross_modal_attention(q, k, k, key_padding_mask=mask.to(DEVICE))


@pytest.mark.skipif(DEVICE != "cpu", reason="peak RSS of a worker process, on the cpu backend")
def test_scores_are_never_materialised():
    """Peak RSS of one forward+backward, in its own process: the torch backend holds a sample's (H, lq, lk)
    scores and probabilities; the cpu backend's extra memory stays far below one such buffer."""
    from mmfast.bench import harness

    shape = {"lq": [2048], "lk": [2048], "Hq": 2, "Hk": 2, "D": 32, "causal": False, "backward": True}
    scores_bytes = 2 * 2048 * 2048 * 4
    peaks = {}
    for variant in ("mmfast-torch", "mmfast-cpu"):
        spec = {"module": "mmfast.bench.attention", "variant": variant, "shape": shape, "device": "cpu",
                "dtype": "float32", "warmup": 1, "iters": 1}
        result = harness.run_worker(spec)
        assert result["status"] == "ok", result
        peaks[variant] = result["peak_extra_bytes"]
    assert peaks["mmfast-torch"] > scores_bytes, "the measurement must see the materialised scores"
    assert peaks["mmfast-cpu"] < 0.25 * scores_bytes, peaks


def test_backward_keeps_only_the_output_and_the_logsumexp():
    """Beyond its inputs (q, k, v, offsets, gate), autograd keeps the attention output and the float32 row
    logsumexp: nothing of the (lq, lk) scores."""
    inputs, cu_q, cu_k = make_inputs([40, 3], [50, 7], 4, 2, 32, torch.bfloat16, gated=True)
    leaves = {name: t.requires_grad_() for name, t in inputs.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_modal_attention(**leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    inputs_seen = [t for t in saved if any(t is leaf for leaf in leaves.values()) or t.dtype == torch.int32]
    others = sorted((tuple(t.shape), t.dtype) for t in saved if all(t is not s for s in inputs_seen))
    tq, hq, d = inputs["q"].shape
    assert others == sorted([((tq, hq, d), torch.bfloat16), ((hq, tq), torch.float32)]), others
