"""Hugging Face transformers drop-in: the attention implementation "mmfast", on mmfast.ops.cross_modal_attention.

    from mmfast.integrations.transformers import register_attention, report
    register_attention()                                   # once; calling it again changes nothing
    model = LlavaForConditionalGeneration.from_pretrained(..., attn_implementation="mmfast")
    # or model.set_attn_implementation("mmfast") on a model already built
    print(report())                                        # op calls by form, SDPA fallbacks by reason

Every model whose attention layers call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` takes the name: its
self-attention and its cross-attention (LLaVA's CLIP tower and Llama decoder, BLIP-2's vision tower,
Q-Former self- and cross-attention and OPT decoder, ...) then run through the op.

Masks. "mmfast" registers transformers' own SDPA mask builder (a boolean 4-D mask, True = attend, or None
where SDPA would skip it), so the model builds exactly the mask it builds for "sdpa"; each mask is then
analysed once (vectorised, one host sync for the flags, the result cached per mask tensor, so a model's
layers share it) and turned into the op's form:
  - no mask: the op plain, or causal with the module's `is_causal` exactly as SDPA's `is_causal` (upper-left
    aligned: with more keys than queries, only the first Nq keys are kept, as SDPA's integration does);
  - every query row sees all of its sample's kept keys: key_padding_mask (None when nothing is padded);
  - causal with left padding, no padding, or a cache (more keys than queries): causal=True with
    key_padding_mask, since bottom-right-aligned causal over each sample's kept keys is that mask exactly;
  - causal with right padding (any mask whose rows see a growing prefix of the kept keys, one key more per
    row, then all of them): the packed varlen layout, in at most two calls: the rows on the causal
    staircase (causal=True), and the rows after it that see every kept key (causal=False): the padded
    query rows of a right-padded batch. So even those rows, whose outputs the model never uses, get SDPA's
    values. Rows that see no key (left padding's padded rows) get zeros, as SDPA gives (torch >= 2.5);
  - anything else, and every call the op cannot run as transformers asks: transformers' SDPA forward, counted
    in `report().fallbacks` by reason and warned about once per reason (MmfastAttentionFallback). Reasons:
    a mask that is not causal-or-padding over the keys (sliding window, chunked, packed sequences from
    position_ids, image-token block overlays, arbitrary 4-D masks), padding between real tokens, masks that
    differ per head, a float mask with bias values, attention dropout > 0 (the op has none: a model in
    training mode with attention_dropout > 0 falls back on every call), position_bias, a value head dim
    different from the key's, causal without a mask and with fewer keys than queries.
`softcap` and attention sinks (`s_aux`) raise ValueError: SDPA cannot compute them either.

Acceptance. transformers 5.17 to 5.24 accept any name registered with AttentionInterface (the model's
`_supports_attention_backend` is only read by `is_backend_compatible()`, for serving engines, and
`_supports_sdpa` only for "sdpa"); a mask builder must be registered too, or the models get no mask at all.
set_attn_implementation() on a built model applies only to classes whose attention calls the interface.

BLIP-2: in transformers 5.17 to 5.24, Blip2QFormerMultiHeadAttention (self- and cross-attention) and
Blip2Attention go through the attention interface, so no model patch is needed; the Q-Former's
encoder_attention_mask (ragged image tokens) becomes the op's key_padding_mask. The Q-Former's default
attention_probs_dropout_prob is 0.1: in training mode it falls back (counted) unless set to 0.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..ops import attention as _attention

NAME = "mmfast"

__all__ = ["NAME", "AttentionReport", "MmfastAttentionFallback", "attention_forward", "attention_mask",
           "register_attention", "report", "reset_report"]


class MmfastAttentionFallback(UserWarning):
    """A call of the "mmfast" attention ran transformers' SDPA forward instead of the op."""


@dataclass
class AttentionReport:
    """calls: op calls by form ("plain", "causal", "key_padding", "causal+key_padding", "varlen");
    fallbacks: SDPA calls by reason."""

    calls: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = [f"mmfast attention: {sum(self.calls.values())} op call(s), "
                 f"{sum(self.fallbacks.values())} SDPA fallback(s)"]
        lines += [f"  op, {form}: {count}" for form, count in sorted(self.calls.items())]
        lines += [f"  SDPA, {reason}: {count}" for reason, count in sorted(self.fallbacks.items())]
        return "\n".join(lines)


_REPORT = AttentionReport()
_warned: set[str] = set()
calls = _REPORT.calls
fallbacks = _REPORT.fallbacks


def report() -> AttentionReport:
    """The live counters of every "mmfast" attention call since import (or the last reset_report())."""
    return _REPORT


def reset_report() -> None:
    """Zero the counters and warn again for each fallback reason."""
    _REPORT.calls.clear()
    _REPORT.fallbacks.clear()
    _warned.clear()


def register_attention() -> str:
    """Register "mmfast" with transformers' AttentionInterface and AttentionMaskInterface; idempotent."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    return NAME


def attention_mask(*args, **kwargs):
    """The mask builder registered for "mmfast": transformers' SDPA one (boolean 4-D, True = attend, or None)."""
    return sdpa_mask(*args, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract: q (B, Hq, Nq, D), k/v (B, Hk, Nk, D) -> ((B, Nq, Hq, D), None)."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: the mmfast attention (like sdpa) cannot apply it; use attn_implementation="
                             f"'eager' for this model")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    reason = _unsupported(query, key, value, dropout, kwargs)
    plan = None
    if reason is None and attention_mask is not None:
        plan = _plan(attention_mask, max(query.shape[0], key.shape[0]), query.shape[2], key.shape[2])
        if isinstance(plan, str):
            reason, plan = plan, None
    if reason is None and attention_mask is None and is_causal and 1 < query.shape[2] and key.shape[2] < query.shape[2]:
        reason = "causal without a mask and fewer keys than queries (SDPA aligns it upper-left)"
    if reason is not None:
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    query, key, value = _broadcast_batch(query, key, value)
    if plan is None:  # as SDPA: is_causal only without a mask and for more than one query, aligned upper-left
        causal = bool(is_causal) and query.shape[2] > 1
        if causal and key.shape[2] > query.shape[2]:
            key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
        calls["causal" if causal else "plain"] += 1
        out = _attention.cross_modal_attention(query, key, value, causal=causal, scale=scaling)
        return out.transpose(1, 2), None
    if plan.kind == "padded":
        calls[("causal+" if plan.causal else "") + ("key_padding" if plan.key_padding_mask is not None else "")
              or "plain"] += 1
        out = _attention.cross_modal_attention(query, key, value, key_padding_mask=plan.key_padding_mask,
                                               causal=plan.causal, scale=scaling)
        return out.transpose(1, 2), None
    calls["varlen"] += 1
    return _varlen(plan, query, key, value, scaling), None


# --------------------------------------------------------------------------------------------------- internals


def _unsupported(query: Tensor, key: Tensor, value: Tensor, dropout: float, kwargs: dict) -> str | None:
    if dropout and dropout > 0:
        return "attention dropout > 0 (the op has no attention dropout)"
    if kwargs.get("position_bias") is not None:
        return "position_bias (an additive bias the op does not take)"
    if value.shape[-1] != key.shape[-1]:
        return "value head dim different from the key head dim"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query/key/value not 4-D (B, H, N, D)"
    if query.shape[0] != key.shape[0] and 1 not in (query.shape[0], key.shape[0]):
        return "query and key batch sizes that do not broadcast"
    return None


def _broadcast_batch(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SDPA broadcasts a batch of 1 (learned queries shared by every sample); the op needs equal batches."""
    batch = max(query.shape[0], key.shape[0])
    if query.shape[0] != batch:
        query = query.expand(batch, -1, -1, -1)
    if key.shape[0] != batch:
        key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
    return query, key, value


def _fallback(reason, module, query, key, value, mask, dropout, scaling, is_causal, kwargs):
    fallbacks[reason] += 1
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mmfast attention: ran torch SDPA instead of the op ({reason}); counted in "
                      f"mmfast.integrations.transformers.report()", MmfastAttentionFallback, stacklevel=3)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@dataclass
class _Plan:
    kind: str  # "padded" or "varlen"
    causal: bool = False
    key_padding_mask: Tensor | None = None
    # varlen: the kept keys' rows in (B * Nk), their offsets, and (rows in (B * Nq), offsets, longest, causal)
    key_rows: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_k: int = 0
    groups: tuple = ()


# A few analysed masks, by id, checked against a weak reference and the tensor's version counter: the layers
# of one forward share one mask tensor, so it is analysed (and synced on) once per forward. Inference tensors
# (torch.inference_mode) have no version counter: theirs are trusted not to change in place between layers.
_CACHE: dict[tuple, tuple] = {}
_CACHE_SIZE = 8


def _version(mask: Tensor) -> int | None:
    return None if mask.is_inference() else mask._version


def _plan(mask, batch: int, len_q: int, len_k: int) -> _Plan | str:
    """The op form of a 4-D attention mask, or the reason it has none."""
    if not isinstance(mask, Tensor):
        return f"attention mask of type {type(mask).__name__}"
    cache_key = (id(mask), batch, len_q, len_k)
    hit = _CACHE.get(cache_key)
    if hit is not None and hit[0]() is mask and hit[1] == _version(mask):
        return hit[2]
    plan = _analyse(mask, batch, len_q, len_k)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[cache_key] = (weakref.ref(mask), _version(mask), plan)
    return plan


def _analyse(mask: Tensor, batch: int, len_q: int, len_k: int) -> _Plan | str:
    shape = tuple(mask.shape)
    if mask.dim() != 4 or shape[0] not in (1, batch) or shape[2] not in (1, len_q) or shape[3] != len_k:
        return f"attention mask of shape {shape} for {batch} samples, {len_q} queries and {len_k} keys"
    if mask.dtype == torch.bool:
        allowed, no_bias = mask, True
    elif mask.is_floating_point():  # additive: 0 = attend, -inf or the dtype's minimum = masked
        allowed = mask == 0
        no_bias = (allowed | (mask <= torch.finfo(mask.dtype).min)).all()
    else:
        return f"attention mask of dtype {mask.dtype}"
    same_heads = (allowed == allowed[:, :1]).all() if shape[1] > 1 else True
    m = allowed[:, 0].expand(batch, len_q, len_k)

    # Each query row must see a prefix of its sample's kept keys (those some row sees), in key order.
    kept = m.any(1)                                            # (B, Nk)
    lk = kept.sum(1)                                           # (B,)
    c = m.sum(2)                                               # (B, Nq): keys each row sees
    rank = kept.cumsum(1) - 1                                  # rank of each key among its sample's kept keys
    prefix = (m == (kept[:, None, :] & (rank[:, None, :] < c[:, :, None]))).all()
    saturated = c == lk[:, None]
    full = saturated.all()
    rows = torch.arange(len_q, device=m.device)
    bottom_right = (c == (rows + 1 + lk[:, None] - len_q).clamp(min=0).minimum(lk[:, None])).all()
    # General form: rows on a causal staircase (A, ending with the first row that sees every kept key) and
    # the rows after it that see every kept key (B); rows that see no key stay zero.
    first = saturated & (saturated.cumsum(1) == 1)
    in_a = (c > 0) & (~saturated | first)
    in_b = (c > 0) & saturated & ~first
    n_a, n_b = in_a.sum(1), in_b.sum(1)
    staircase = ((c == in_a.cumsum(1) + lk[:, None] - n_a[:, None]) | ~in_a).all()
    summary = [no_bias, same_heads, prefix, full, bottom_right, staircase, kept.all(), lk.max(), n_a.max(), n_b.max()]
    summary = torch.stack([torch.as_tensor(x, device=m.device).to(torch.int64) for x in summary]).tolist()  # the sync
    no_bias, same_heads, prefix, full, bottom_right, staircase, all_kept, max_k, max_a, max_b = summary
    if not no_bias:
        return "float attention mask with bias values (neither 0 nor -inf)"
    if not same_heads:
        return "attention mask that differs per head"
    if not prefix:
        return "attention mask that is not causal or key padding over the keys (sliding window, chunked, " \
               "packed sequences, image-block or custom 4-D mask)"
    key_padding_mask = None if all_kept else kept
    if full:
        return _Plan("padded", False, key_padding_mask)
    if bottom_right:
        return _Plan("padded", True, key_padding_mask)
    if not staircase:
        return "causal attention mask with padding between real tokens (rows not one causal staircase per sample)"
    cu_k = _offsets(lk)
    groups = tuple((in_x.reshape(-1).nonzero().squeeze(1), _offsets(n_x), longest, causal)
                   for in_x, n_x, longest, causal in ((in_a, n_a, max_a, True), (in_b, n_b, max_b, False))
                   if longest > 0)
    return _Plan("varlen", key_rows=kept.reshape(-1).nonzero().squeeze(1), cu_seqlens_k=cu_k, max_seqlen_k=max_k,
                 groups=groups)


def _offsets(lengths: Tensor) -> Tensor:
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    offsets[1:] = lengths.cumsum(0)
    return offsets


def _varlen(plan: _Plan, query: Tensor, key: Tensor, value: Tensor, scaling: float | None) -> Tensor:
    """Packed rows through the op, scattered back into (B, Nq, Hq, D); rows in no group stay zero."""
    batch, heads_q, len_q, head_dim = query.shape
    q_rows = query.transpose(1, 2).reshape(batch * len_q, heads_q, head_dim)
    k_rows, v_rows = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim).index_select(0, plan.key_rows)
                      for t in (key, value))
    out = None
    for rows, cu_q, longest, causal in plan.groups:
        part = _attention.cross_modal_attention(
            q_rows.index_select(0, rows), k_rows, v_rows, cu_seqlens_q=cu_q, cu_seqlens_k=plan.cu_seqlens_k,
            max_seqlen_q=longest, max_seqlen_k=plan.max_seqlen_k, causal=causal, scale=scaling)
        # Zeros (in the op's dtype: autocast's, under autocast) for the rows that see no key.
        out = (part.new_zeros(q_rows.shape) if out is None else out).index_copy(0, rows, part)
    if out is None:  # no row sees a key; q_rows * 0 keeps q in the graph
        out = q_rows * 0
    return out.view(batch, len_q, heads_q, head_dim)
