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
  - two key sets per sample, no causal order ("key_sets"): each row sees either every kept key of its sample
    or one subset shared by the sample's other rows (Mllama's vision encoder, whose padding patches see only
    the real ones while real patches see all; Mllama's cross-attention when text comes before the image).
    Two varlen calls: each sample's rows of one set over that set's keys, gathered (index_select, so the
    sets need not be contiguous; a key in both sets gets both gradients) and scattered back;
  - anything else, and every call the op cannot run as transformers asks: transformers' SDPA forward, counted
    in `report().fallbacks` by reason and warned about once per reason (MmfastAttentionFallback). Reasons:
    a mask of none of those forms (sliding window, chunked, packed sequences from position_ids, image-token
    block overlays, arbitrary 4-D masks), padding between real tokens, masks that differ per head, a float
    mask with bias values, attention dropout > 0 (the op has none: a model in training mode with
    attention_dropout > 0 falls back on every call), position_bias, a value head dim different from the
    key's, causal without a mask and with fewer keys than queries.
`softcap` and attention sinks (`s_aux`) raise ValueError: SDPA cannot compute them either.

output_attentions=True: as with "sdpa", the attention weights are never formed: the model returns
`attentions == ()`, and the first such call logs transformers' SDPA warning, naming "mmfast" (through
transformers' logging, once per process, so transformers.logging.set_verbosity_* governs it as it does SDPA's).

Gates. A gated layer that mmfast.patch rewired (mmfast.integrations.gates: Mllama, Idefics v1) passes its
scalar gate as `mmfast_gate=FusedGate(parameter)` through its attention module's **kwargs; the op then
returns tanh(gate) * attention (its `gate` argument), on every form above, and a fallback multiplies SDPA's
result by tanh(gate): the layer no longer applies it. report().gated counts the calls that fused one.

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
from transformers.utils import logging as transformers_logging

from ..ops import attention as _attention

NAME = "mmfast"
GATE_KWARG = "mmfast_gate"
OUTPUT_ATTENTIONS_WARNING = (f"`{NAME}` attention does not support `output_attentions=True`. Please set your attention "
                             "to `eager` if you want any of these features.")

# Under transformers' logger, so that its verbosity settings apply here as to its own SDPA warning.
logger = transformers_logging.get_logger(f"transformers.{__name__}")

__all__ = ["GATE_KWARG", "NAME", "AttentionReport", "FusedGate", "MmfastAttentionFallback", "attention_forward",
           "attention_mask", "register_attention", "report", "reset_report"]


class MmfastAttentionFallback(UserWarning):
    """A call of the "mmfast" attention ran transformers' SDPA forward instead of the op."""


@dataclass
class AttentionReport:
    """calls: op calls by form ("plain", "causal", "key_padding", "causal+key_padding", "varlen",
    "key_sets"); gated: how many of them fused a layer's tanh gate (FusedGate); fallbacks: SDPA calls by reason."""

    calls: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    gated: int = 0

    def __str__(self) -> str:
        lines = [f"mmfast attention: {sum(self.calls.values())} op call(s), "
                 f"{sum(self.fallbacks.values())} SDPA fallback(s)"]
        lines += [f"  op, {form}: {count}" for form, count in sorted(self.calls.items())]
        if self.gated:
            lines.append(f"  op calls with a layer's gate fused: {self.gated}")
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
    _REPORT.gated = 0
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
    """transformers' attention-function contract: q (B, Hq, Nq, D), k/v (B, Hk, Nk, D) -> ((B, Nq, Hq, D), None).

    mmfast_gate (a FusedGate, passed by a gated layer that mmfast.patch rewired): the result is
    tanh(gate) * attention, the gate fused into the op (or multiplied after SDPA on a fallback)."""
    if kwargs.pop("output_attentions", False):  # popped: a fallback would log SDPA's warning, naming sdpa
        logger.warning_once(OUTPUT_ATTENTIONS_WARNING)
    gate = kwargs.pop(GATE_KWARG, None)
    if gate is not None:
        if not isinstance(gate, FusedGate):
            raise TypeError(f"{GATE_KWARG}: expected a mmfast.integrations.transformers.FusedGate, got "
                            f"{type(gate).__name__}")
        gate.applied += 1
        gate = gate.parameter
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
        out, weights = _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                 kwargs)
        if gate is not None:  # the gated layer no longer applies it: same product, after SDPA instead of inside
            out = out * _gate_per_head(gate, out.shape[2]).tanh().to(out.dtype)
        return out, weights

    if gate is not None:
        _REPORT.gated += 1
    query, key, value = _broadcast_batch(query, key, value)
    if plan is None:  # as SDPA: is_causal only without a mask and for more than one query, aligned upper-left
        causal = bool(is_causal) and query.shape[2] > 1
        if causal and key.shape[2] > query.shape[2]:
            key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
        calls["causal" if causal else "plain"] += 1
        out = _attention.cross_modal_attention(query, key, value, causal=causal, scale=scaling, gate=gate)
        return out.transpose(1, 2), None
    if plan.kind == "padded":
        calls[("causal+" if plan.causal else "") + ("key_padding" if plan.key_padding_mask is not None else "")
              or "plain"] += 1
        out = _attention.cross_modal_attention(query, key, value, key_padding_mask=plan.key_padding_mask,
                                               causal=plan.causal, scale=scaling, gate=gate)
        return out.transpose(1, 2), None
    calls[plan.kind] += 1
    return _varlen(plan, query, key, value, scaling, gate), None


@dataclass(eq=False)
class FusedGate:
    """A layer's scalar attention gate, handed to attention_forward as the `mmfast_gate` keyword argument by a
    gated layer that mmfast.patch rewired (mmfast.integrations.gates): the attention function then returns
    tanh(parameter) * attention. `applied` counts the calls that took it, so the layer can check that its
    attention module passed the keyword through (a gate silently dropped would leave the layer ungated)."""

    parameter: Tensor
    applied: int = 0


def _gate_per_head(gate: Tensor, heads: int) -> Tensor:
    """The gate as a factor of (B, N, H, D) attention rows: a scalar, or one per head."""
    return gate.reshape(()) if gate.numel() == 1 else gate.reshape(heads, 1)


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
class _Group:
    """One varlen op call: query rows (in B * Nq) over key rows (in B * Nk), each sample's rows contiguous."""

    rows: Tensor
    cu_seqlens_q: Tensor
    max_seqlen_q: int
    key_rows: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_k: int
    causal: bool


@dataclass
class _Plan:
    kind: str  # "padded", or the varlen forms "varlen" (causal staircase) and "key_sets"
    causal: bool = False
    key_padding_mask: Tensor | None = None
    groups: tuple = ()  # varlen: _Group per op call


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
    if prefix:
        key_padding_mask = None if all_kept else kept
        if full:
            return _Plan("padded", False, key_padding_mask)
        if bottom_right:
            return _Plan("padded", True, key_padding_mask)
        if staircase:
            key_rows, cu_k = kept.reshape(-1).nonzero().squeeze(1), _offsets(lk)
            groups = tuple(_Group(in_x.reshape(-1).nonzero().squeeze(1), _offsets(n_x), longest, key_rows, cu_k, max_k,
                                  causal)
                           for in_x, n_x, longest, causal in ((in_a, n_a, max_a, True), (in_b, n_b, max_b, False))
                           if longest > 0)
            return _Plan("varlen", groups=groups)
    plan = _key_sets(m, kept, lk, c, saturated, max_k)
    if plan is not None:
        return plan
    if not prefix:
        return MASK_NOT_SUPPORTED
    return ("causal attention mask with padding between real tokens (rows neither one causal staircase nor two "
            "key sets per sample)")


MASK_NOT_SUPPORTED = ("attention mask that is not causal, key padding or two key sets per sample (sliding window, "
                      "chunked, packed sequences, image-block or custom 4-D mask)")


def _key_sets(m: Tensor, kept: Tensor, lk: Tensor, c: Tensor, saturated: Tensor, max_k: int) -> _Plan | None:
    """Two key sets per sample, no causal order: every row that sees a key sees either all of its sample's kept
    keys, or one subset shared by all its sample's other such rows (Mllama's vision encoder: real patches see
    every patch, padding ones only the real ones; Mllama's cross-attention with text before the image: that
    text sees every image token, the rest only the real tiles'). Two varlen calls, each sample split into the
    rows of one key set and their keys (gathered, so the sets need not be contiguous). None when the mask is
    not of that form (a second host sync; only masks that no other form fits get here)."""
    batch = m.shape[0]
    in_a = saturated & (c > 0)                   # rows seeing every kept key
    in_b = ~saturated & (c > 0)                  # rows seeing a strict subset
    has_b = in_b.any(1)
    reference = m[torch.arange(batch, device=m.device), in_b.to(torch.int8).argmax(1)] & has_b[:, None]  # (B, Nk)
    same = ((m == reference[:, None, :]) | ~in_b[:, :, None]).all()
    n_a, n_b, k_b = in_a.sum(1), in_b.sum(1), reference.sum(1)
    same, max_a, max_b, max_kb = torch.stack([same.to(torch.int64), n_a.max(), n_b.max(), k_b.max()]).tolist()
    if not same:
        return None
    groups = tuple(_Group(in_x.reshape(-1).nonzero().squeeze(1), _offsets(n_x), longest,
                          keys.reshape(-1).nonzero().squeeze(1), _offsets(n_k), longest_k, False)
                   for in_x, n_x, longest, keys, n_k, longest_k in ((in_a, n_a, max_a, kept, lk, max_k),
                                                                    (in_b, n_b, max_b, reference, k_b, max_kb))
                   if longest > 0)
    return _Plan("key_sets", groups=groups)


def _offsets(lengths: Tensor) -> Tensor:
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    offsets[1:] = lengths.cumsum(0)
    return offsets


def _varlen(plan: _Plan, query: Tensor, key: Tensor, value: Tensor, scaling: float | None,
            gate: Tensor | None = None) -> Tensor:
    """Packed rows through the op, one call per group, scattered back into (B, Nq, Hq, D); rows in no group
    stay zero. index_select / index_copy carry the gradients back: keys that two groups gather get the sum."""
    batch, heads_q, len_q, head_dim = query.shape
    q_rows = query.transpose(1, 2).reshape(batch * len_q, heads_q, head_dim)
    k_all, v_all = (t.transpose(1, 2).reshape(-1, t.shape[1], head_dim) for t in (key, value))
    gathered: dict[int, tuple[Tensor, Tensor]] = {}  # groups sharing one key set gather it once
    out = None
    for group in plan.groups:
        if id(group.key_rows) not in gathered:
            gathered[id(group.key_rows)] = (k_all.index_select(0, group.key_rows),
                                            v_all.index_select(0, group.key_rows))
        k_rows, v_rows = gathered[id(group.key_rows)]
        part = _attention.cross_modal_attention(
            q_rows.index_select(0, group.rows), k_rows, v_rows, cu_seqlens_q=group.cu_seqlens_q,
            cu_seqlens_k=group.cu_seqlens_k, max_seqlen_q=group.max_seqlen_q, max_seqlen_k=group.max_seqlen_k,
            causal=group.causal, scale=scaling, gate=gate)
        # Zeros (in the op's dtype: autocast's, under autocast) for the rows that see no key.
        out = (part.new_zeros(q_rows.shape) if out is None else out).index_copy(0, group.rows, part)
    if out is None:  # no row sees a key; q_rows * 0 keeps q (and the gate, at a zero gradient) in the graph
        out = q_rows * 0
        if gate is not None:
            out = out * gate.reshape(-1)[:1].tanh().to(out.dtype)
    return out.view(batch, len_q, heads_q, head_dim)
