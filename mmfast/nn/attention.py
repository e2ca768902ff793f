"""Cross-modal attention modules on mmfast.ops.cross_modal_attention: text queries over image or audio keys.

CrossModalAttention is the attention layer with its projections (q_proj, k_proj, v_proj, o_proj, as in
transformers), optionally with a Flamingo tanh gate; GatedCrossAttentionBlock is Flamingo's gated
cross-attention + feed-forward block, the identity at initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _dropout_p(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout: expected a value in [0.0, 1.0), got {value!r}")
    return float(value)


class CrossModalAttention(nn.Module):
    """Multi-head attention of x (queries) over context (keys and values from another modality).

    attention = softmax(q k^T / sqrt(head_dim)) v per head, q = q_proj(x), k = k_proj(context),
    v = v_proj(context), with num_heads query heads sharing num_kv_heads key/value heads (grouped-query
    attention). kv_dim is the context's width (defaults to dim); head_dim = dim // num_heads.

    Inputs, padded: x (B, Nq, dim), context (B, Nk, kv_dim), key_padding_mask (B, Nk) bool, True = attend.
    Packed (varlen, as flash_attn_varlen): x (Tq, dim), context (Tk, kv_dim) with int32 cu_seqlens_q and
    cu_seqlens_k (B + 1,) offsets of each sample's rows (max_seqlen_q / max_seqlen_k optional hints).
    causal=True masks keys j > i + Nk - Nq (bottom-right aligned, so that the layer also serves self-attention).

    gated=False: returns dropout(o_proj(attention)) (plus `residual` when one is given), as a transformers
    attention layer does; a query row with no key (a sample without media) gets o_proj's bias (zero attention).

    gated=True (Flamingo / Idefics / Mllama): returns residual + dropout(tanh(gate) * o_proj(attention)),
    residual defaulting to x, with `gate` a learnable scalar initialised to zero, so a fresh layer returns the
    residual exactly and still passes a gradient to the gate (d tanh / d gate = 1 at 0). How it is fused:
    the op multiplies each head's attention by tanh(gate) inside the kernel (the gate's gradient comes out of
    the same backward pass, from the row sums it already forms), and o_proj is applied after. That equals
    tanh(gate) * o_proj(attention) only because the gate is one scalar and o_proj is linear without a bias,
    so with gated=True o_proj has no bias (`bias` still applies to q_proj, k_proj and v_proj); a bias would
    also break the next point. Query rows with no key get zero attention from the op, hence exactly zero
    after o_proj and dropout, hence exactly the residual. The residual itself is not fused into the op:
    the op's residual is added before o_proj, in head space, while this one lives in model space after it.

    dropout is applied to the layer's output branch (before the residual is added), in training only; the
    fused op has no dropout on the attention probabilities.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        kv_dim: int | None = None,
        gated: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
        *,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads {num_heads} (head_dim = dim // num_heads), "
                             f"got {dim}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads {num_heads} (grouped-query attention), "
                             f"got {num_kv_heads}")
        kv_dim = dim if kv_dim is None else kv_dim
        _positive_int("kv_dim", kv_dim)
        if not isinstance(gated, bool):
            raise TypeError(f"gated: expected a bool, got {type(gated).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.num_kv_heads, self.kv_dim = dim, num_heads, num_kv_heads, kv_dim
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.gated, self.dropout, self.backend = gated, _dropout_p(dropout), backend
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kv_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(kv_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias and not gated, **factory)
        self.gate = nn.Parameter(torch.empty((), **factory)) if gated else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            proj.reset_parameters()
        if self.gate is not None:
            nn.init.zeros_(self.gate)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        cu_seqlens_q: Tensor | None = None,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        causal: bool = False,
        residual: Tensor | None = None,
    ) -> Tensor:
        varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
        self._check_inputs(x, context, residual, varlen)
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x)
        k = self.k_proj(context)
        v = self.v_proj(context)
        if varlen:
            attn = ops.cross_modal_attention(
                q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim),
                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k, key_padding_mask=key_padding_mask, causal=causal, scale=self.scaling,
                gate=self.gate, backend=self.backend)
            attn = attn.reshape(x.shape[0], heads * head_dim)
        else:
            batch, len_q, len_k = x.shape[0], x.shape[1], context.shape[1]
            attn = ops.cross_modal_attention(
                q.view(batch, len_q, heads, head_dim).transpose(1, 2),
                k.view(batch, len_k, kv_heads, head_dim).transpose(1, 2),
                v.view(batch, len_k, kv_heads, head_dim).transpose(1, 2),
                key_padding_mask=key_padding_mask, causal=causal, scale=self.scaling, gate=self.gate,
                backend=self.backend)
            attn = attn.transpose(1, 2).reshape(batch, len_q, heads * head_dim)
        out = F.dropout(self.o_proj(attn), self.dropout, self.training)
        if self.gated and residual is None:
            residual = x
        return out if residual is None else residual + out

    def _check_inputs(self, x, context, residual, varlen: bool) -> None:
        layout = "(T, width) with cu_seqlens (packed)" if varlen else "(B, N, width) without cu_seqlens (padded)"
        dims = 2 if varlen else 3
        for name, value, width in (("x", x, self.dim), ("context", context, self.kv_dim)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
            if value.dim() != dims or value.shape[-1] != width:
                raise ValueError(f"{name}: expected shape {layout} with width {width}, got {tuple(value.shape)}")
        if not varlen and context.shape[0] != x.shape[0]:
            raise ValueError(f"context: expected x's batch size {x.shape[0]}, got {context.shape[0]}")
        if residual is not None and (not isinstance(residual, Tensor) or residual.shape != x.shape):
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"residual: expected x's shape {tuple(x.shape)}, got {got}")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, kv_dim={self.kv_dim}, gated={self.gated}, dropout={self.dropout}")


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention block, inserted before a language-model layer:

        x = x + tanh(attn_gate) * cross_attn(attn_norm(x), media)
        x = x + tanh(ff_gate) * ff(ff_norm(x)),      ff = Linear(dim, ff_mult * dim) -> GELU -> Linear

    LayerNorm pre-norms; both gates are scalars initialised to zero, so a fresh block is exactly the
    identity while both gates still get gradients. cross_attn is a CrossModalAttention with gated=True
    (its `gate` is attn_gate, fused into the attention op; see CrossModalAttention) and x as the residual,
    so text rows of a sample without media keys pass the attention half exactly unchanged; the feed-forward
    half applies to every row, as in Flamingo. media is (B, Nm, kv_dim) padded, with key_padding_mask
    (B, Nm), or (Tm, kv_dim) packed with cu_seqlens_q / cu_seqlens_k for x (Tq, dim). dropout applies to
    both branches before their residual sums; `bias` to every linear layer but cross_attn.o_proj.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        kv_dim: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        bias: bool = False,
        norm_eps: float = 1e-5,
        *,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _positive_int("ff_mult", ff_mult)
        factory = {"device": device, "dtype": dtype}
        self.dim, self.ff_mult, self.dropout = dim, ff_mult, _dropout_p(dropout)
        self.cross_attn = CrossModalAttention(dim, num_heads, num_kv_heads, kv_dim, gated=True, dropout=dropout,
                                              bias=bias, backend=backend, **factory)
        self.attn_norm = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.ff_norm = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim, bias=bias, **factory), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim, bias=bias, **factory))
        self.ff_gate = nn.Parameter(torch.empty((), **factory))
        self.reset_parameters()

    @property
    def attn_gate(self) -> nn.Parameter:
        """The attention half's gate (the parameter cross_attn.gate)."""
        return self.cross_attn.gate

    def reset_parameters(self) -> None:
        self.cross_attn.reset_parameters()
        self.attn_norm.reset_parameters()
        self.ff_norm.reset_parameters()
        for layer in (self.ff[0], self.ff[2]):
            layer.reset_parameters()
        nn.init.zeros_(self.ff_gate)

    def forward(
        self,
        x: Tensor,
        media: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        cu_seqlens_q: Tensor | None = None,
        cu_seqlens_k: Tensor | None = None,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        causal: bool = False,
    ) -> Tensor:
        x = self.cross_attn(self.attn_norm(x), media, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                            causal=causal, residual=x)
        ff = F.dropout(self.ff(self.ff_norm(x)), self.dropout, self.training)
        return x + torch.tanh(self.ff_gate) * ff

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ff_mult={self.ff_mult}, dropout={self.dropout}"
