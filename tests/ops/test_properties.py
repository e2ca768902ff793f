"""Property tests: every op on the cpu and torch backends, over shapes, dtypes and options drawn by hypothesis.

Each example runs the op forward and backward and compares it with the float64 oracle under the tolerance rule
of tests/helpers.py (the backend's error at most 2x that of plain torch in the same dtype, plus atol). The
oracle is the op on the torch backend (mmfast/reference.py) in float64, itself checked against the plain-torch
formulas of the op tests; LoRA with dropout is checked through the keep mask the backend draws, as in
tests/ops/test_lora.py. The draws include edge cases on purpose: no rows, one row, huge vocabularies with few
rows, every target ignored, samples with no queries or no keys. Bad input must raise ValueError or TypeError
whose message starts with the argument's name.

The examples are derandomized and no database is kept, so CI runs the same examples on every machine.
Tensor values come from a torch generator seeded by hypothesis: drawing them element by element would be slow.
"""

from __future__ import annotations

import math
from itertools import accumulate

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmfast.ops import cross_entropy, cross_modal_attention, linear_cross_entropy, lora_linear
from mmfast.ops.lora import draw_seed
from tests.helpers import assert_within_torch_error, runnable_backends
from tests.ops.test_attention import per_sample
from tests.ops.test_cross_entropy import plain_torch_cross_entropy, token_contiguous
from tests.ops.test_linear_cross_entropy import plain_torch_linear_cross_entropy
from tests.ops.test_lora import formula, keep_mask

BACKENDS = ("cpu", "torch")
DTYPES = (torch.float32, torch.bfloat16)
# The oracle and the plain-torch formulas are two float64 computations of one function.
FLOAT64_RTOL = 1e-9


def properties(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_backends_under_test_run_here():
    """Guards against the properties silently running on fewer backends when the build breaks."""
    for op in ("cross_entropy", "linear_cross_entropy", "lora_linear", "cross_modal_attention"):
        assert set(BACKENDS) <= set(runnable_backends(op, "cpu")), op


def randn(generator, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def upstream_like(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed upstream gradient, not all ones, so that its scaling is under test too."""
    generator = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(out.shape, generator=generator, dtype=torch.float64)).to(out.dtype)


def forward_backward(fn, leaves: dict, frozen=(), seed=1):
    """fn(**leaves) and the gradients of the leaves not in `frozen`, against a fixed upstream gradient."""
    leaves = {name: None if t is None else t.detach().clone().requires_grad_(name not in frozen)
              for name, t in leaves.items()}
    out = fn(**leaves)
    trainable = [name for name, t in leaves.items() if t is not None and name not in frozen]
    grads = torch.autograd.grad(out, [leaves[n] for n in trainable], upstream_like(out, seed)) if trainable else ()
    return out.detach(), dict(zip(trainable, grads))


def assert_float64_agree(name, a, b):
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    assert torch.allclose(a, b, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * scale, equal_nan=True), name


def assert_matches_oracle(out, grads, plain, oracle, dtype, grad_slack=1.0, grad_dtypes=None):
    """The tolerance rule on the output and on every gradient; scaled by the magnitudes they reach.
    grad_dtypes: the gradients' dtypes where they are not `dtype` (a float32 gate of bfloat16 attention)."""
    (plain_out, plain_grads), (ref_out, ref_grads) = plain, oracle
    assert out.dtype == dtype and out.shape == ref_out.shape
    magnitude = lambda t: max(1.0, t.abs().max().item()) if t.numel() else 1.0  # noqa: E731
    assert_within_torch_error("out", out, plain_out, ref_out, dtype, scale=magnitude(ref_out))
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == (grad_dtypes or {}).get(name, dtype) and grad.shape == ref_grads[name].shape, name
        assert_within_torch_error(f"grad {name}", grad, plain_grads[name], ref_grads[name], dtype,
                                  scale=grad_slack * magnitude(ref_grads[name]))


# ---------------------------------------------------------------------------------------------- cross-entropy

loss_options = st.fixed_dictionaries({
    "ignore_index": st.sampled_from([-100, -1, 0]),  # 0 lies inside the vocabulary
    "label_smoothing": st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(0.0, 1.0),
    "z_loss": st.sampled_from([0.0, 0.0, 1e-4, 1e-2]),
    "softcap": st.sampled_from([None, None, 1.0, 30.0]) | st.floats(0.5, 50.0),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
})
ignored_fraction = st.sampled_from([0.0, 0.3, 1.0])
token_shapes = st.one_of(st.tuples(st.integers(0, 40)), st.tuples(st.integers(0, 3), st.integers(0, 9)))


def make_targets(generator, shape, vocab, ignored, ignore_index):
    target = torch.randint(0, vocab, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < ignored] = ignore_index
    return target


def check_loss(loss, grads, plain, oracle, target, options, dtype):
    """The tolerance rule, except for a mean over no row: nan, as torch gives, with zero gradients."""
    if options["reduction"] == "mean" and not bool((target != options["ignore_index"]).any()):
        assert torch.isnan(loss) and torch.isnan(oracle[0])
        assert all(bool((g == 0).all()) for g in grads.values())
        return
    assert_matches_oracle(loss, grads, plain, oracle, dtype)


# Logits of a few units, as the op tests draw them: every backend keeps the row's logsumexp in float32, whose
# rounding grows with the logits' magnitude and shows in the gradient beyond the rule's atol at scales of tens.
def cross_entropy_case(backend, dtype, shape, vocab, options, ignored, seed, *, logit_scale=4.0, token_layout=False,
                       inplace_backward=False):
    generator = torch.Generator().manual_seed(seed)
    logits = randn(generator, *shape, vocab, dtype=dtype, scale=logit_scale)
    target = make_targets(generator, shape, vocab, ignored, options["ignore_index"])

    def ours(logits):
        x = token_contiguous(logits) if token_layout else logits
        return cross_entropy(x, target, inplace_backward=inplace_backward, backend=backend, **options)

    def oracle(logits):
        return cross_entropy(logits, target, backend="torch", **options)

    def plain(logits):
        return plain_torch_cross_entropy(logits, target, **options)

    as64 = {"logits": logits.double()}
    reference = forward_backward(oracle, as64)
    assert_float64_agree("plain float64 loss", forward_backward(plain, as64)[0], reference[0])
    loss, grads = forward_backward(ours, {"logits": logits})
    check_loss(loss, grads, forward_backward(plain, {"logits": logits}), reference, target, options, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@properties(max_examples=25)
@given(dtype=st.sampled_from(DTYPES), shape=token_shapes, vocab=st.integers(1, 300), options=loss_options,
       ignored=ignored_fraction, seed=st.integers(0, 2**31), logit_scale=st.sampled_from([1.0, 4.0]),
       token_layout=st.booleans(), inplace_backward=st.booleans())
@example(dtype=torch.float32, shape=(0,), vocab=5, options={"ignore_index": -100, "label_smoothing": 0.0,
         "z_loss": 0.0, "softcap": None, "reduction": "mean"}, ignored=0.0, seed=0, logit_scale=1.0,
         token_layout=False, inplace_backward=False)
def test_cross_entropy_matches_oracle(backend, dtype, shape, vocab, options, ignored, seed, logit_scale, token_layout,
                                      inplace_backward):
    token_layout = token_layout and len(shape) == 1  # the token-contiguous layout is one of (N, V) logits
    cross_entropy_case(backend, dtype, shape, vocab, options, ignored, seed, logit_scale=logit_scale,
                       token_layout=token_layout, inplace_backward=inplace_backward)


huge_vocab = st.sampled_from([50_000, 65_537, 128_256]) | st.integers(50_000, 131_072)


@pytest.mark.parametrize("backend", BACKENDS)
@properties(max_examples=4)
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 3), vocab=huge_vocab, options=loss_options,
       seed=st.integers(0, 2**31), token_layout=st.booleans())
def test_cross_entropy_huge_vocab_few_rows(backend, dtype, rows, vocab, options, seed, token_layout):
    cross_entropy_case(backend, dtype, (rows,), vocab, options, 0.0, seed, token_layout=token_layout)


# -------------------------------------------------------------------------------------- linear cross-entropy

def linear_cross_entropy_case(backend, dtype, shape, vocab, width, options, ignored, seed, *, bias, frozen,
                              chunk_size):
    generator = torch.Generator().manual_seed(seed)
    leaves = {"hidden": randn(generator, *shape, width, dtype=dtype),
              "weight": randn(generator, vocab, width, dtype=dtype, scale=2 / width**0.5),
              "bias": randn(generator, vocab, dtype=dtype) if bias else None}
    target = make_targets(generator, shape, vocab, ignored, options["ignore_index"])

    def ours(hidden, weight, bias):
        return linear_cross_entropy(hidden, weight, target, bias=bias, chunk_size=chunk_size, backend=backend,
                                    **options)

    def oracle(hidden, weight, bias):
        return linear_cross_entropy(hidden, weight, target, bias=bias, backend="torch", **options)

    def plain(hidden, weight, bias):
        return plain_torch_linear_cross_entropy(hidden, weight, target, bias=bias, **options)

    as64 = {name: None if t is None else t.double() for name, t in leaves.items()}
    reference = forward_backward(oracle, as64, frozen)
    assert_float64_agree("plain float64 loss", forward_backward(plain, as64, frozen)[0], reference[0])
    loss, grads = forward_backward(ours, leaves, frozen)
    check_loss(loss, grads, forward_backward(plain, leaves, frozen), reference, target, options, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@properties(max_examples=25)
@given(dtype=st.sampled_from(DTYPES), shape=token_shapes, vocab=st.integers(1, 200), width=st.integers(1, 48),
       options=loss_options, ignored=ignored_fraction, seed=st.integers(0, 2**31), bias=st.booleans(),
       frozen=st.sets(st.sampled_from(["hidden", "weight", "bias"])),
       chunk_size=st.none() | st.integers(1, 17))
def test_linear_cross_entropy_matches_oracle(backend, dtype, shape, vocab, width, options, ignored, seed, bias,
                                             frozen, chunk_size):
    linear_cross_entropy_case(backend, dtype, shape, vocab, width, options, ignored, seed, bias=bias, frozen=frozen,
                              chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@properties(max_examples=4)
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 3), vocab=huge_vocab, options=loss_options,
       seed=st.integers(0, 2**31))
def test_linear_cross_entropy_huge_vocab_few_rows(backend, dtype, rows, vocab, options, seed):
    linear_cross_entropy_case(backend, dtype, (rows,), vocab, 8, options, 0.0, seed, bias=True, frozen=(),
                              chunk_size=None)


# ----------------------------------------------------------------------------------------------------- LoRA

LORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


@pytest.mark.parametrize("backend", BACKENDS)
@properties(max_examples=25)
@given(dtype=st.sampled_from(DTYPES), shape=token_shapes, features=st.integers(1, 70),
       out_features=st.integers(1, 70), rank=st.integers(1, 16), bias=st.booleans(),
       scaling=st.sampled_from([1.0, 2.0]) | st.floats(-4.0, 4.0),
       dropout_p=st.sampled_from([0.0, 0.1, 0.5]) | st.floats(0.0, 0.95), training=st.booleans(),
       frozen=st.sets(st.sampled_from(LORA_NAMES)), seed=st.integers(0, 2**31))
def test_lora_linear_matches_oracle(backend, dtype, shape, features, out_features, rank, bias, scaling, dropout_p,
                                    training, frozen, seed):
    generator = torch.Generator().manual_seed(seed)
    leaves = {"x": randn(generator, *shape, features, dtype=dtype),
              "weight": randn(generator, out_features, features, dtype=dtype, scale=features**-0.5),
              "bias": randn(generator, out_features, dtype=dtype) if bias else None,
              "lora_A": randn(generator, rank, features, dtype=dtype, scale=features**-0.5),
              "lora_B": randn(generator, out_features, rank, dtype=dtype, scale=rank**-0.5)}
    applied_p = dropout_p if training else 0.0
    torch.manual_seed(seed)
    mask_seed = int(draw_seed())
    keep = keep_mask(backend, mask_seed, math.prod(shape), features, applied_p).view(*shape, features).cpu()

    def ours(backend=backend, **t):
        torch.manual_seed(seed)  # the op draws the seed the mask above was drawn with
        return lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, dropout_p=dropout_p,
                           training=training, backend=backend)

    def plain(**t):
        return formula(**t, scaling=scaling, keep=keep, dropout_p=applied_p)

    as64 = {name: None if t is None else t.double() for name, t in leaves.items()}
    reference = forward_backward(plain, as64, frozen)
    if backend == "torch":  # mmfast/reference.py itself, in float64, through the same mask
        oracle = forward_backward(lambda **t: ours("torch", **t), as64, frozen)
        assert_float64_agree("reference.py float64 out", oracle[0], reference[0])
        for name, grad in oracle[1].items():
            assert_float64_agree(f"reference.py float64 grad {name}", grad, reference[1][name])
    out, grads = forward_backward(ours, leaves, frozen)
    assert_matches_oracle(out, grads, forward_backward(plain, leaves, frozen), reference, dtype)


# ---------------------------------------------------------------------------------------- cross-modal attention

@st.composite
def attention_heads(draw):
    heads_k = draw(st.integers(1, 3))
    return heads_k * draw(st.integers(1, 3)), heads_k


gates = st.sampled_from([None, (), (1,), "per-head"])


def make_gate(generator, kind, heads_q):
    if kind is None:
        return None
    shape = (heads_q,) if kind == "per-head" else kind
    return torch.randn(shape, generator=generator) * 2  # float32 whatever q's dtype, as model code keeps it


def attention_case(backend, dtype, lengths_q, lengths_k, heads, dim, causal, gate_kind, residual, scale, seed,
                   padded_mask=None):
    """Varlen lengths, or (padded_mask given) a padded batch of max(lengths) rows whose masked keys are dropped."""
    heads_q, heads_k = heads
    generator = torch.Generator().manual_seed(seed)
    cu_q, cu_k = (torch.tensor([0, *accumulate(lengths)], dtype=torch.int32) for lengths in (lengths_q, lengths_k))
    leaves = {"q": randn(generator, sum(lengths_q), heads_q, dim, dtype=dtype),
              "k": randn(generator, sum(lengths_k), heads_k, dim, dtype=dtype),
              "v": randn(generator, sum(lengths_k), heads_k, dim, dtype=dtype),
              "gate": make_gate(generator, gate_kind, heads_q),
              "residual": randn(generator, sum(lengths_q), heads_q, dim, dtype=dtype) if residual else None}
    effective_scale = dim**-0.5 if scale is None else scale

    def ours(q, k, v, gate, residual, backend=backend):
        return cross_modal_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, scale=scale,
                                     gate=gate, residual=residual, backend=backend)

    def oracle(q, k, v, gate, residual):
        return ours(q, k, v, gate, residual, backend="torch")

    def plain(q, k, v, gate, residual):
        return per_sample(q, k, v, cu_q, cu_k, causal, effective_scale, gate, residual)

    as64 = {name: None if t is None else t.double() for name, t in leaves.items()}
    reference = forward_backward(oracle, as64)
    plain64 = forward_backward(plain, as64)
    assert_float64_agree("plain float64 out", plain64[0], reference[0])
    out, grads = forward_backward(ours, leaves)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    # As in tests/ops/test_attention.py: the softmax correction comes from the saved output in the backward,
    # which costs a few float32 ulps more than autograd's sum.
    slack = 10.0 if dtype == torch.float32 else 1.0
    assert_matches_oracle(out, grads, forward_backward(plain, leaves), reference, dtype, grad_slack=slack,
                          grad_dtypes={"gate": torch.float32})


sample_lengths = st.lists(st.integers(0, 40) | st.sampled_from([0, 1]), min_size=1, max_size=4)
head_dims = st.sampled_from([1, 2, 3, 8, 17, 32, 64])


@pytest.mark.parametrize("backend", BACKENDS)
@properties(max_examples=25)
@given(dtype=st.sampled_from(DTYPES), data=st.data(), heads=attention_heads(), dim=head_dims,
       causal=st.booleans(), gate_kind=gates, residual=st.booleans(),
       scale=st.none() | st.floats(0.05, 2.0), seed=st.integers(0, 2**31))
def test_cross_modal_attention_varlen_matches_oracle(backend, dtype, data, heads, dim, causal, gate_kind, residual,
                                                     scale, seed):
    lengths_q = data.draw(sample_lengths, label="lengths_q")
    lengths_k = data.draw(st.lists(st.integers(0, 40), min_size=len(lengths_q), max_size=len(lengths_q)),
                             label="lengths_k")
    attention_case(backend, dtype, lengths_q, lengths_k, heads, dim, causal, gate_kind, residual, scale, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@properties(max_examples=15)
@given(dtype=st.sampled_from(DTYPES), batch=st.integers(1, 3), len_q=st.integers(0, 20), len_k=st.integers(0, 20),
       heads=attention_heads(), dim=head_dims, gate_kind=gates, residual=st.booleans(),
       kept=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**31))
def test_cross_modal_attention_padded_matches_oracle(backend, dtype, batch, len_q, len_k, heads, dim, gate_kind,
                                                     residual, kept, seed):
    """The padded layout with a key padding mask, some samples with every key masked, against per-sample
    attention over the kept keys; masked keys get exactly zero gradients."""
    heads_q, heads_k = heads
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, len_k, generator=generator) < kept
    leaves = {"q": randn(generator, batch, heads_q, len_q, dim, dtype=dtype),
              "k": randn(generator, batch, heads_k, len_k, dim, dtype=dtype),
              "v": randn(generator, batch, heads_k, len_k, dim, dtype=dtype),
              "gate": make_gate(generator, gate_kind, heads_q),
              "residual": randn(generator, batch, heads_q, len_q, dim, dtype=dtype) if residual else None}
    kept_rows = mask.reshape(-1).nonzero()[:, 0]
    cu_q = torch.arange(batch + 1, dtype=torch.int32) * len_q
    cu_k = torch.tensor([0, *accumulate(mask.sum(1).tolist())], dtype=torch.int32)

    def ours(q, k, v, gate, residual, backend=backend):
        return cross_modal_attention(q, k, v, key_padding_mask=mask, gate=gate, residual=residual, backend=backend)

    def oracle(q, k, v, gate, residual):
        return ours(q, k, v, gate, residual, backend="torch")

    def plain(q, k, v, gate, residual):
        rows = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], dim)  # noqa: E731
        packed = per_sample(rows(q), rows(k).index_select(0, kept_rows), rows(v).index_select(0, kept_rows), cu_q,
                            cu_k, False, dim**-0.5, gate, None if residual is None else rows(residual))
        return packed.view(batch, len_q, heads_q, dim).transpose(1, 2)

    as64 = {name: None if t is None else t.double() for name, t in leaves.items()}
    reference = forward_backward(oracle, as64)
    assert_float64_agree("plain float64 out", forward_backward(plain, as64)[0], reference[0])
    out, grads = forward_backward(ours, leaves)
    slack = 10.0 if dtype == torch.float32 else 1.0
    assert_matches_oracle(out, grads, forward_backward(plain, leaves), reference, dtype, grad_slack=slack,
                          grad_dtypes={"gate": torch.float32})
    for name in ("k", "v"):
        assert torch.count_nonzero(grads[name].transpose(1, 2)[~mask]) == 0, name


# -------------------------------------------------------------------------------------------------- bad input

def _ce(rows, size, **overrides):
    args = {"logits": torch.randn(rows, size), "target": torch.zeros(rows, dtype=torch.long), **overrides}
    return lambda backend: cross_entropy(args.pop("logits"), args.pop("target"), backend=backend, **args)


def _lce(rows, size, **overrides):
    args = {"hidden": torch.randn(rows, size), "weight": torch.randn(size + 1, size),
            "target": torch.zeros(rows, dtype=torch.long), **overrides}
    return lambda backend: linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"),
                                                backend=backend, **args)


def _lora(rows, size, **overrides):
    args = {"x": torch.randn(rows, size), "weight": torch.randn(size + 1, size), "bias": None,
            "lora_A": torch.randn(2, size), "lora_B": torch.randn(size + 1, 2), "scaling": 1.0, **overrides}
    positional = [args.pop(name) for name in ("x", "weight", "bias", "lora_A", "lora_B", "scaling")]
    return lambda backend: lora_linear(*positional, backend=backend, **args)


def _cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def _attention(rows, size, **overrides):
    args = {"q": torch.randn(rows, 2, size), "k": torch.randn(rows + 1, 1, size), "v": torch.randn(rows + 1, 1, size),
            "cu_seqlens_q": _cu(0, rows), "cu_seqlens_k": _cu(0, rows + 1), **overrides}
    return lambda backend: cross_modal_attention(args.pop("q"), args.pop("k"), args.pop("v"), backend=backend, **args)


# (argument named by the error, call of (rows, size)); rows >= 1, size >= 2.
BAD_INPUTS = [
    ("target", lambda n, s: _ce(n, s, target=torch.full((n,), s))),  # one past the last class
    ("target", lambda n, s: _ce(n, s, target=torch.full((n,), -2))),
    ("target", lambda n, s: _ce(n, s, target=torch.zeros(n + 1, dtype=torch.long))),
    ("target", lambda n, s: _ce(n, s, target=torch.zeros(n))),
    ("logits", lambda n, s: _ce(n, s, logits=torch.zeros(n, s, dtype=torch.long))),
    ("logits", lambda n, s: _ce(n, s, logits=torch.randn(n, 0))),
    ("logits", lambda n, s: _ce(n, s, logits=torch.randn(s))),
    ("ignore_index", lambda n, s: _ce(n, s, ignore_index=2**63)),  # not an int64
    ("ignore_index", lambda n, s: _ce(n, s, ignore_index=-1.0)),
    ("label_smoothing", lambda n, s: _ce(n, s, label_smoothing=1.5)),
    ("label_smoothing", lambda n, s: _ce(n, s, label_smoothing=math.nan)),
    ("z_loss", lambda n, s: _ce(n, s, z_loss=-1e-3)),
    ("softcap", lambda n, s: _ce(n, s, softcap=0.0)),
    ("softcap", lambda n, s: _ce(n, s, softcap=math.inf)),
    ("z_loss", lambda n, s: _ce(n, s, z_loss=math.inf)),
    ("reduction", lambda n, s: _ce(n, s, reduction="max")),
    ("target", lambda n, s: _lce(n, s, target=torch.full((n,), s + 1))),
    ("weight", lambda n, s: _lce(n, s, weight=torch.randn(s + 1, s + 1))),
    ("weight", lambda n, s: _lce(n, s, weight=torch.randn(0, s))),
    ("weight", lambda n, s: _lce(n, s, weight=torch.randn(s + 1, s).double())),
    ("hidden", lambda n, s: _lce(n, s, hidden=torch.randn(n, 0), weight=torch.randn(s, 0))),
    ("bias", lambda n, s: _lce(n, s, bias=torch.randn(s))),
    ("chunk_size", lambda n, s: _lce(n, s, chunk_size=0)),
    ("ignore_index", lambda n, s: _lce(n, s, ignore_index=-(2**63) - 1)),
    ("x", lambda n, s: _lora(n, s, x=torch.zeros(n, s, dtype=torch.long))),
    ("x", lambda n, s: _lora(n, s, x=torch.randn(n, 0), weight=torch.randn(3, 0), lora_A=torch.randn(2, 0),
                             lora_B=torch.randn(3, 2))),
    ("weight", lambda n, s: _lora(n, s, weight=torch.randn(s + 1, s + 1))),
    ("lora_A", lambda n, s: _lora(n, s, lora_A=torch.randn(0, s), lora_B=torch.randn(s + 1, 0))),
    ("lora_A", lambda n, s: _lora(n, s, lora_A=torch.randn(2, s - 1))),
    ("lora_B", lambda n, s: _lora(n, s, lora_B=torch.randn(s + 1, 3))),
    ("bias", lambda n, s: _lora(n, s, bias=torch.randn(s))),
    ("scaling", lambda n, s: _lora(n, s, scaling="2")),
    ("dropout_p", lambda n, s: _lora(n, s, dropout_p=1.0)),
    ("dropout_p", lambda n, s: _lora(n, s, dropout_p=math.nan)),
    ("cu_seqlens_q", lambda n, s: _attention(n, s, cu_seqlens_q=_cu(0, n + 5))),  # past the last row
    ("cu_seqlens_q", lambda n, s: _attention(n, s, cu_seqlens_q=_cu(1, n))),
    ("cu_seqlens_k", lambda n, s: _attention(n, s, cu_seqlens_q=_cu(0, 0, n), cu_seqlens_k=_cu(0, n + 1, 1))),
    ("cu_seqlens_k", lambda n, s: _attention(n, s, cu_seqlens_k=_cu(0, n + 1).long())),
    ("max_seqlen_k", lambda n, s: _attention(n, s, max_seqlen_k=n)),
    ("q", lambda n, s: _attention(n, s, q=torch.randn(n, 2, 0), k=torch.randn(n + 1, 1, 0),
                                  v=torch.randn(n + 1, 1, 0))),
    ("k", lambda n, s: _attention(n, s, k=torch.randn(n + 1, 0, s), v=torch.randn(n + 1, 0, s))),
    ("q", lambda n, s: _attention(n, s, k=torch.randn(n + 1, 2, s), v=torch.randn(n + 1, 2, s),
                                  q=torch.randn(n, 3, s))),
    ("v", lambda n, s: _attention(n, s, v=torch.randn(n, 1, s))),
    ("gate", lambda n, s: _attention(n, s, gate=torch.zeros(3))),
    ("residual", lambda n, s: _attention(n, s, residual=torch.zeros(n, 2, s + 1))),
    ("scale", lambda n, s: _attention(n, s, scale=math.inf)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("argument, make_call", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
@properties(max_examples=2)
@given(rows=st.integers(1, 9), size=st.integers(2, 33))
def test_bad_input_is_refused_naming_the_argument(backend, argument, make_call, rows, size):
    call = make_call(rows, size)
    with pytest.raises((ValueError, TypeError)) as error:
        call(backend)
    assert str(error.value).startswith(f"{argument}:"), str(error.value)
