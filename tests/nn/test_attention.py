"""mmfast.nn.CrossModalAttention and GatedCrossAttentionBlock against the same computation in plain torch (SDPA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfast.nn import CrossModalAttention, GatedCrossAttentionBlock
from tests.helpers import DEVICE

DIM, KV_DIM, HEADS = 30, 17, 6  # head_dim 5: not a power of two
BACKENDS = (None, "torch")  # the default choice here (cpu when the extension is built, else torch) and torch


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def attention_branch(module: CrossModalAttention, x, context, key_padding_mask=None, causal=False):
    """o_proj(attention) of `module`'s projections with torch's SDPA: padded only, every query row must have a key."""
    batch, len_q, _ = x.shape
    len_k = context.shape[1]
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    q = module.q_proj(x).view(batch, len_q, heads, head_dim).transpose(1, 2)
    k = module.k_proj(context).view(batch, len_k, kv_heads, head_dim).transpose(1, 2)
    v = module.v_proj(context).view(batch, len_k, kv_heads, head_dim).transpose(1, 2)
    groups = heads // kv_heads  # query head h reads key/value head h // groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
    if causal:  # bottom-right aligned, as the op
        rows = torch.arange(len_q, device=x.device)[:, None]
        allowed = torch.arange(len_k, device=x.device)[None, :] <= rows + len_k - len_q
        mask = allowed if mask is None else mask & allowed
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return module.o_proj(attn.transpose(1, 2).reshape(batch, len_q, heads * head_dim))


def sdpa_reference(module: CrossModalAttention, x, context, key_padding_mask=None, causal=False, residual=None):
    """The layer's documented result: o_proj(attention) [+ residual], or residual + tanh(gate) * o_proj(attention)."""
    out = attention_branch(module, x, context, key_padding_mask, causal)
    if module.gated:
        return (x if residual is None else residual) + torch.tanh(module.gate) * out
    return out if residual is None else residual + out


def run(module, fn, x, context, upstream):
    """Output, parameter gradients and input gradients of `fn(x, context)` for the loss sum(out * upstream)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    context = context.detach().clone().requires_grad_()
    out = fn(x, context)
    (out * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad, context.grad


def compare(module, fn, reference, x, context, upstream):
    out, grads, grad_x, grad_context = run(module, fn, x, context, upstream)
    out_ref, grads_ref, grad_x_ref, grad_context_ref = run(module, reference, x, context, upstream)
    close(out, out_ref, "output")
    assert grads.keys() == grads_ref.keys() == {n for n, _ in module.named_parameters()}
    for name in grads:
        close(grads[name], grads_ref[name], f"grad {name}")
    close(grad_x, grad_x_ref, "grad x")
    close(grad_context, grad_context_ref, "grad context")


def make_module(num_kv_heads=None, gated=False, backend=None, bias=True, seed=0):
    torch.manual_seed(seed)
    module = CrossModalAttention(DIM, HEADS, num_kv_heads, KV_DIM, gated=gated, bias=bias, backend=backend,
                                 device=DEVICE)
    if gated:
        torch.nn.init.constant_(module.gate, 0.7)  # away from zero, where tanh(gate) would hide everything
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
def test_padded_matches_sdpa(num_kv_heads, gated, masked, backend):
    module = make_module(num_kv_heads, gated, backend)
    batch, len_q, len_k = 3, 7, 11
    x = torch.randn(batch, len_q, DIM, device=DEVICE)
    context = torch.randn(batch, len_k, KV_DIM, device=DEVICE)
    upstream = torch.randn(batch, len_q, DIM, device=DEVICE)
    mask = None
    if masked:  # 11, 4 and 1 real keys, not all at the front
        mask = torch.zeros(batch, len_k, dtype=torch.bool, device=DEVICE)
        mask[0] = True
        mask[1, [0, 3, 4, 9]] = True
        mask[2, 6] = True
    compare(module, lambda x, c: module(x, c, key_padding_mask=mask),
            lambda x, c: sdpa_reference(module, x, c, key_padding_mask=mask), x, context, upstream)


@pytest.mark.parametrize("gated", [False, True])
def test_causal_and_explicit_residual_match_sdpa(gated):
    module = make_module(2, gated)
    x = torch.randn(2, 5, DIM, device=DEVICE)
    context = torch.randn(2, 7, KV_DIM, device=DEVICE)
    residual = torch.randn(2, 5, DIM, device=DEVICE)
    upstream = torch.randn(2, 5, DIM, device=DEVICE)
    compare(module, lambda x, c: module(x, c, causal=True, residual=residual),
            lambda x, c: sdpa_reference(module, x, c, causal=True, residual=residual), x, context, upstream)


def test_gated_bias_never_reaches_o_proj():
    module = CrossModalAttention(DIM, HEADS, kv_dim=KV_DIM, gated=True, bias=True)
    assert module.o_proj.bias is None, "tanh(gate) * o_proj(a) == o_proj(tanh(gate) * a) needs o_proj without bias"
    assert module.q_proj.bias is not None and module.k_proj.bias is not None and module.v_proj.bias is not None
    assert CrossModalAttention(DIM, HEADS, gated=False, bias=True).o_proj.bias is not None
    assert module.gate.shape == () and module.gate.item() == 0.0
    assert "num_kv_heads=6" in repr(module) and "gated=True" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_packed_equals_padded(gated, backend):
    module = make_module(2, gated, backend)
    lens_q, lens_k = [7, 3, 5], [11, 4, 0 if gated else 2]
    batch, len_q, len_k = len(lens_q), max(lens_q), max(lens_k)
    x = torch.randn(batch, len_q, DIM, device=DEVICE)
    context = torch.randn(batch, len_k, KV_DIM, device=DEVICE)
    rows_q = torch.arange(len_q, device=DEVICE)[None, :] < torch.tensor(lens_q, device=DEVICE)[:, None]
    rows_k = torch.arange(len_k, device=DEVICE)[None, :] < torch.tensor(lens_k, device=DEVICE)[:, None]
    upstream = torch.randn(batch, len_q, DIM, device=DEVICE) * rows_q[..., None]  # padded query rows count for nothing

    def offsets(lengths):
        return F.pad(torch.tensor(lengths, device=DEVICE).cumsum(0), (1, 0)).to(torch.int32)

    def packed(x, c):  # the padded batch's real rows, packed; scattered back so that both forms compare as one
        out = module(x[rows_q], c[rows_k], cu_seqlens_q=offsets(lens_q), cu_seqlens_k=offsets(lens_k),
                     max_seqlen_q=len_q, max_seqlen_k=len_k)
        return torch.zeros(batch, len_q, DIM, device=DEVICE).masked_scatter(rows_q[..., None], out)

    def padded(x, c):
        return module(x, c, key_padding_mask=rows_k) * rows_q[..., None]

    out, grads, grad_x, grad_context = run(module, packed, x, context, upstream)
    out_ref, grads_ref, grad_x_ref, grad_context_ref = run(module, padded, x, context, upstream)
    close(out, out_ref, "output")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        close(grads[name], grads_ref[name], f"grad {name}")
    close(grad_x, grad_x_ref, "grad x")
    close(grad_context, grad_context_ref, "grad context")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_without_media_keys_gives_exactly_x(backend):
    module = make_module(2, gated=True, backend=backend)
    module.dropout = 0.5  # in training, dropout of a zero branch is still zero
    x = torch.randn(3, 4, DIM, device=DEVICE, requires_grad=True)
    context = torch.randn(3, 6, KV_DIM, device=DEVICE)
    mask = torch.ones(3, 6, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = module(x, context, key_padding_mask=mask)
    assert torch.equal(out[1], x[1])
    assert not torch.equal(out[0], x[0])
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(module.gate.grad)
    torch.testing.assert_close(x.grad[1], torch.ones_like(x.grad[1]))  # the residual path only, no NaN
    # Packed: the third sample has no key (after an empty second one) and comes back exactly.
    lengths = torch.tensor([0, 4, 4, 8], dtype=torch.int32, device=DEVICE)
    packed = module(x[[0, 2]].reshape(8, DIM), context[0], cu_seqlens_q=lengths,
                    cu_seqlens_k=torch.tensor([0, 6, 6, 6], dtype=torch.int32, device=DEVICE))
    assert torch.equal(packed[4:], x[2].detach())


def make_block(seed=0, **kwargs):
    torch.manual_seed(seed)
    return GatedCrossAttentionBlock(DIM, HEADS, num_kv_heads=2, kv_dim=KV_DIM, ff_mult=2, device=DEVICE, **kwargs)


def block_reference(block, x, media, key_padding_mask=None):
    x = x + torch.tanh(block.attn_gate) * attention_branch(block.cross_attn, block.attn_norm(x), media,
                                                           key_padding_mask)
    return x + torch.tanh(block.ff_gate) * block.ff(block.ff_norm(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_is_the_identity_at_init_and_its_gates_learn(backend):
    block = make_block(backend=backend)
    assert block.attn_gate is block.cross_attn.gate
    assert block.attn_gate.item() == 0.0 and block.ff_gate.item() == 0.0
    names = {name for name, _ in block.named_parameters()}
    assert {"cross_attn.gate", "ff_gate", "attn_norm.weight", "ff_norm.weight"} <= names
    x = torch.randn(2, 5, DIM, device=DEVICE, requires_grad=True)
    media = torch.randn(2, 3, KV_DIM, device=DEVICE)
    mask = torch.tensor([[True, True, False], [False, True, True]], device=DEVICE)
    upstream = torch.randn(2, 5, DIM, device=DEVICE)
    out = block(x, media, key_padding_mask=mask)
    assert torch.equal(out, x)
    (out * upstream).sum().backward()
    # d tanh / d gate = 1 at zero: each gate gets the upstream gradient dotted with its branch.
    with torch.no_grad():
        attn_branch = attention_branch(block.cross_attn, block.attn_norm(x), media, mask)
        ff_branch = block.ff(block.ff_norm(x))
    close(block.attn_gate.grad, (upstream * attn_branch).sum(), "grad attn_gate")
    close(block.ff_gate.grad, (upstream * ff_branch).sum(), "grad ff_gate")
    assert block.attn_gate.grad != 0 and block.ff_gate.grad != 0
    assert torch.count_nonzero(block.cross_attn.q_proj.weight.grad) == 0, "behind a zero gate, as in Flamingo"
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_matches_flamingo_formula(backend):
    block = make_block(backend=backend, bias=True)
    with torch.no_grad():
        block.attn_gate.fill_(0.4)
        block.ff_gate.fill_(-0.9)
    x = torch.randn(2, 5, DIM, device=DEVICE)
    media = torch.randn(2, 3, KV_DIM, device=DEVICE)
    mask = torch.tensor([[True, True, False], [False, True, True]], device=DEVICE)
    upstream = torch.randn(2, 5, DIM, device=DEVICE)
    compare(block, lambda x, m: block(x, m, key_padding_mask=mask),
            lambda x, m: block_reference(block, x, m, mask), x, media, upstream)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    module = CrossModalAttention(DIM, HEADS, kv_dim=KV_DIM, dropout=0.5, device=DEVICE)
    x, context = torch.randn(2, 4, DIM, device=DEVICE), torch.randn(2, 3, KV_DIM, device=DEVICE)
    module.eval()
    close(module(x, context), sdpa_reference(module, x, context).detach(), "eval output")
    module.train()
    assert (module(x, context) == 0).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 30, "num_heads": 4}, "dim:"),
    ({"dim": 30, "num_heads": 6, "num_kv_heads": 4}, "num_kv_heads:"),
    ({"dim": 30, "num_heads": 0}, "num_heads:"),
    ({"dim": 30, "num_heads": 6, "num_kv_heads": 0}, "num_kv_heads:"),
    ({"dim": 30, "num_heads": 6, "kv_dim": 0}, "kv_dim:"),
    ({"dim": 30, "num_heads": 6, "dropout": 1.0}, "dropout:"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossModalAttention(**kwargs)
    with pytest.raises(ValueError, match=match):
        GatedCrossAttentionBlock(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="ff_mult:"):
        GatedCrossAttentionBlock(30, 6, ff_mult=0)
    module = CrossModalAttention(DIM, HEADS, kv_dim=KV_DIM)
    x, context = torch.randn(2, 4, DIM), torch.randn(2, 3, KV_DIM)
    with pytest.raises(ValueError, match="x:"):
        module(torch.randn(2, 4, DIM + 1), context)
    with pytest.raises(ValueError, match="context:"):
        module(x, torch.randn(3, 3, KV_DIM))
    with pytest.raises(ValueError, match="x:"):  # packed inputs are 2-D
        module(x, context[0], cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32),
               cu_seqlens_k=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="residual:"):
        module(x, context, residual=torch.randn(2, 4, 1))
