"""Cross-modal attention forward + backward on a ragged batch: text queries over image keys, per sample.

A benchmark module for harness.py. Every variant computes softmax(q @ k.T / sqrt(D)) @ v for each sample
of one batch of samples of different lengths (sample b: lq[b] queries over lk[b] keys; Hq query heads over
Hk key heads, Hq a multiple of Hk), then backpropagates one fixed random upstream gradient to q, k and v.
What differs is how the raggedness is handled:

  sdpa-padded   torch SDPA on the batch padded to the longest sample, with the key padding mask: what a
                model's padded batch runs. The padded query rows get a zero upstream gradient (a loss
                never reads them) but are computed anyway.
  sdpa-loop     what a user writes by hand without padding: slice each sample out of the packed tensors,
                SDPA on (1, H, l, D) views, torch.cat the outputs.
  flex-compile  torch.compile(flex_attention) on the packed batch with a document block mask built from
                the lengths (once, outside the timing: in training it is per batch, an extra cost).
  varlen-attn   torch.nn.attention.varlen.varlen_attn (FlashAttention varlen) on the packed batch.
  xformers      xformers.ops.memory_efficient_attention with a BlockDiagonalMask from the lengths.
  mmfast-<b>    mmfast.ops.cross_modal_attention(..., cu_seqlens_q, cu_seqlens_k, backend=<b>), varlen form.
  matmul        the machine's limit, measured in the same run: plain GEMMs, (m x K) @ (K x n), one or two
                per sample, of exactly the FLOPs the attention step counts (flops()), so its GFLOP/s is
                the matmul rate on GEMMs of the samples' sizes, in the run's dtype (fp32 for the CPU shapes,
                bf16 for the GPU ones), and its time is what an attention at matmul speed would take.

FLOPs are those of the useful work only (no padding): forward 4 * lq * lk * D per query head and sample
(q @ k.T and p @ v), backward 2.5x the forward (FlashAttention's count: the four gradient GEMMs and the
recomputed scores); with causal=True the allowed (query, key) pairs are counted exactly. A shape with
"backward": False times the forward alone (in inference: no input requires grad) and counts its FLOPs.

Every variant is also timed step by step against sdpa-loop (PAIRED): the targets are ratios to it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

import mmfast
from mmfast import backends

from . import cross_entropy
from .harness import Workload

OP = "cross_modal_attention"
MATMUL = "matmul"
PADDED = "sdpa-padded"
LOOP = "sdpa-loop"
FLEX = "flex-compile"
VARLEN = "varlen-attn"
XFORMERS = "xformers"
MMFAST = "mmfast-"
VARIANTS = (MATMUL, PADDED, LOOP, FLEX, VARLEN, XFORMERS, *(f"{MMFAST}{b}" for b in backends.BACKENDS))
BASELINES = (PADDED, LOOP)
# The targets against the loop are within 10-20 %, less than a shared machine's drift between one worker
# and the next: every variant is also timed step by step against it.
PAIRED = LOOP
LEGEND = (
    "softmax(q k^T / sqrt(D)) v per sample of a ragged batch (lq queries over lk keys each), forward + backward "
    "to q, k, v (forward only where backward=False); "
    "matmul: plain GEMMs of the same FLOPs (the machine's matmul rate on these sizes, in the run's dtype); "
    "sdpa-padded: F.scaled_dot_product_attention on the padded batch with the key padding mask; "
    "sdpa-loop: SDPA per sample on (1, H, l, D) views of the packed tensors, torch.cat; "
    "flex-compile: torch.compile(flex_attention) with a document block mask (built untimed); "
    "varlen-attn: torch.nn.attention.varlen.varlen_attn; "
    "xformers: memory_efficient_attention with BlockDiagonalMask; "
    "mmfast-<backend>: mmfast.ops.cross_modal_attention with cu_seqlens; "
    "GFLOP/s: useful work only (fwd 4*lq*lk*D per head, bwd 2.5x fwd); "
    "targets (ragged, CPU): mmfast-cpu <= 0.45x sdpa-padded and <= 0.9x sdpa-loop"
)


def _lengths(seed: int, count: int, low: int, high: int) -> list[int]:
    """`count` lengths drawn uniformly from [low, high] with a fixed seed (Python's random is stable)."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


# Named shapes (`mmfast bench attention --shape NAME`); lq: text tokens (queries), lk: image tokens (keys).
# ragged: the batch, 8 samples of 32-512 text tokens over 64-576 image tokens, H=8, D=64 (run it in
# float32 on CPU); ragged-gqa: the same with 4 query heads per key head. long*: GPU shapes, 8 samples of
# 2k-4k queries and keys at D=128 (run them with --device cuda --dtype bfloat16): long, its GQA case, and
# long-forward, the forward alone (the Triton forward's FLOP/s against the bf16 matmul rate and SDPA's flash).
_TEXT, _IMAGE = _lengths(0, 8, 32, 512), _lengths(1, 8, 64, 576)
_LONG_Q, _LONG_K = _lengths(2, 8, 2048, 4096), _lengths(3, 8, 2048, 4096)
SHAPES = {
    "ragged": {"lq": _TEXT, "lk": _IMAGE, "Hq": 8, "Hk": 8, "D": 64, "causal": False, "backward": True},
    "ragged-gqa": {"lq": _TEXT, "lk": _IMAGE, "Hq": 8, "Hk": 2, "D": 64, "causal": False, "backward": True},
    "long": {"lq": _LONG_Q, "lk": _LONG_K, "Hq": 16, "Hk": 16, "D": 128, "causal": False, "backward": True},
    "long-gqa": {"lq": _LONG_Q, "lk": _LONG_K, "Hq": 16, "Hk": 4, "D": 128, "causal": False, "backward": True},
    "long-forward": {"lq": _LONG_Q, "lk": _LONG_K, "Hq": 16, "Hk": 16, "D": 128, "causal": False,
                     "backward": False},
}
# Shapes sized for a GPU: on a 2-core CPU one step of them takes minutes.
GPU_SHAPES = ("long", "long-gqa", "long-forward")
# Tiny and grouped-query (so that every variant's GQA path runs in the quick smoke run).
QUICK = {"lq": [7, 33, 20], "lk": [16, 9, 48], "Hq": 4, "Hk": 2, "D": 32, "causal": False, "backward": True}


def skip_reason(variant: str, device: torch.device) -> str | None:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant.startswith(MMFAST):
        if variant == f"{MMFAST}triton" and device.type == "cpu":
            return cross_entropy.skip_reason(variant, device)  # the same reason: the interpreter's time means nothing
        return backends.unavailable_reason(OP, variant.removeprefix(MMFAST), device)
    if variant == FLEX:
        return _flex_reason(device)
    if variant == VARLEN:
        return _varlen_reason(device)
    if variant == XFORMERS and importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    return None


def _first_sentence(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0]}"


def _flex_reason(device: torch.device) -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        return f"this torch {torch.__version__} has no FlexAttention ({exc})"
    if device.type != "cpu":
        return None
    # Ask torch itself, on a tiny input: its CPU path has no backward (torch 2.13), which this benchmark times.
    # (A forward-only shape could run it, but the reason is decided by device alone.)
    x = torch.zeros(1, 1, 4, 16, requires_grad=True)
    try:
        flex_attention(x, x, x)
    except Exception as exc:
        return f"torch {torch.__version__}: {_first_sentence(exc)}"
    return None


def _varlen_reason(device: torch.device) -> str | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"this torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if device.type != "cpu":
        return None  # a CUDA failure (say, float32, which FlashAttention does not take) shows in the worker
    x = torch.zeros(4, 1, 16)
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    try:
        varlen_attn(x, x, x, offsets, offsets, 4, 4)
    except Exception as exc:
        return f"varlen_attn runs FlashAttention's CUDA kernels only; on CPU tensors: {_first_sentence(exc)}"
    return None


def shape(quick: bool) -> dict:
    return QUICK if quick else SHAPES["ragged"]


def check_shape(shape: dict) -> None:
    """ValueError unless `shape` is one this module can build (the same lengths of lists, GQA heads, causal
    only where every sample has at least as many keys as queries: SDPA gives NaN to a row with no key)."""
    lq, lk = shape["lq"], shape["lk"]
    if not lq or len(lq) != len(lk):
        raise ValueError(f"shape: expected lq and lk of one length each per sample, got {len(lq)} and {len(lk)}")
    if min(lq) < 1 or min(lk) < 1:
        raise ValueError(f"shape: expected every sample to have queries and keys, got lq={lq}, lk={lk}")
    if shape["Hq"] % shape["Hk"]:
        raise ValueError(f"shape: expected Hq a multiple of Hk (grouped-query attention), got {shape['Hq']} "
                         f"and {shape['Hk']}")
    if shape["causal"] and any(q > k for q, k in zip(lq, lk)):
        raise ValueError("shape: causal=True needs lq <= lk in every sample (a query row without keys is NaN in "
                         f"SDPA), got lq={lq}, lk={lk}")


def pairs(lq: int, lk: int, causal: bool) -> int:
    """The (query, key) pairs attended in one sample and head; causal is aligned bottom-right (query i sees
    keys j <= i + lk - lq), as in mmfast, FlashAttention and xformers' FromBottomRight masks."""
    if not causal:
        return lq * lk
    rows = min(lq, lk)  # the rows that see any key: a rectangle of full rows, then a triangle
    return rows * (lk - rows) + rows * (rows + 1) // 2


def _flops_per_pair(shape: dict) -> int:
    # Forward: q @ k.T and p @ v, 2 * D each; backward: 2.5x that.
    per_head = 4 * shape["D"] * (7 if shape["backward"] else 2) // 2
    return shape["Hq"] * per_head


def flops(shape: dict, dtype: torch.dtype) -> int:
    total = sum(pairs(q, k, shape["causal"]) for q, k in zip(shape["lq"], shape["lk"]))
    return _flops_per_pair(shape) * total


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # The least a fused kernel can move. Forward: read q, k, v, write o (and the fp32 row logsumexp);
    # backward: read q, k, v, o, the gradient and the logsumexp, write the gradients of q, k, v.
    rows_q, rows_k = sum(shape["lq"]) * shape["Hq"], sum(shape["lk"]) * shape["Hk"]
    q_bytes, k_bytes = rows_q * shape["D"] * dtype.itemsize, rows_k * shape["D"] * dtype.itemsize
    lse = rows_q * 4
    forward = 2 * q_bytes + 2 * k_bytes + lse
    return forward + (4 * q_bytes + 4 * k_bytes + lse if shape["backward"] else 0)


def memory_floor(shape: dict, dtype: torch.dtype) -> int:
    # The output and its logsumexp (kept for the backward), and the gradients of q, k and v.
    rows_q, rows_k = sum(shape["lq"]) * shape["Hq"], sum(shape["lk"]) * shape["Hk"]
    q_bytes, k_bytes = rows_q * shape["D"] * dtype.itemsize, rows_k * shape["D"] * dtype.itemsize
    return q_bytes + rows_q * 4 + ((q_bytes + 2 * k_bytes) if shape["backward"] else 0)


def matmul_blocks(shape: dict) -> tuple[int, list[tuple[int, int]]]:
    """K and the (m, n) of the GEMMs (m x K) @ (K x n) whose FLOPs, 2 * K * sum(m * n), are flops(shape).

    Per sample the pairs are lq x lk, or under causal a rectangle and a triangle, the triangle's r (r + 1) / 2
    pairs as an (r / 2) x (r + 1) or r x ((r + 1) / 2) GEMM."""
    inner = _flops_per_pair(shape) // 2
    blocks = []
    for lq, lk in zip(shape["lq"], shape["lk"]):
        if not shape["causal"]:
            blocks.append((lq, lk))
            continue
        rows = min(lq, lk)
        if lk > rows:
            blocks.append((rows, lk - rows))
        blocks.append((rows // 2, rows + 1) if rows % 2 == 0 else (rows, (rows + 1) // 2))
    return inner, [(m, n) for m, n in blocks if m and n]


@dataclasses.dataclass
class Attention:
    """One variant's attention, ready to run: forward() returns the output in the variant's layout, `grad` is
    the upstream gradient in that layout, `leaves` the inputs that get gradients, and packed(t, "q" or "k")
    turns a tensor of the variant's q or k layout into the packed (T, H, D) one (for tests)."""

    forward: Callable[[], torch.Tensor]
    grad: torch.Tensor
    leaves: list[torch.Tensor]
    packed: Callable[[torch.Tensor, str], torch.Tensor]


def _offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def packed_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """The batch as packed (T, H, D) tensors, the same for every variant: q, k, v, the upstream gradient and
    the int32 cu_seqlens offsets."""
    check_shape(shape)
    generator = torch.Generator(device).manual_seed(0)
    total_q, total_k = sum(shape["lq"]), sum(shape["lk"])

    def randn(rows, heads):
        return torch.randn(rows, heads, shape["D"], generator=generator, device=device).to(dtype)

    return {"q": randn(total_q, shape["Hq"]), "k": randn(total_k, shape["Hk"]), "v": randn(total_k, shape["Hk"]),
            "grad": randn(total_q, shape["Hq"]),
            "cu_seqlens_q": _offsets(shape["lq"], device), "cu_seqlens_k": _offsets(shape["lk"], device)}


def attention(variant: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Attention:
    """The attention of `variant` on the batch of packed_inputs(shape, dtype, device)."""
    if variant not in VARIANTS or variant == MATMUL:
        raise ValueError(f"variant: expected one of {', '.join(v for v in VARIANTS if v != MATMUL)}, got {variant!r}")
    inputs = packed_inputs(shape, dtype, device)
    lq, lk, causal, backward = shape["lq"], shape["lk"], shape["causal"], shape["backward"]
    gqa = shape["Hq"] != shape["Hk"]
    if variant == PADDED:
        return _padded(inputs, lq, lk, causal, gqa, backward)
    q, k, v = (inputs[name].requires_grad_(backward) for name in ("q", "k", "v"))
    leaves, grad = [q, k, v], inputs["grad"]

    def same(tensor, which):
        return tensor

    if variant == LOOP:
        bounds_q, bounds_k = inputs["cu_seqlens_q"].tolist(), inputs["cu_seqlens_k"].tolist()
        # Under causal, each sample's bottom-right mask, as a user would build it for SDPA.
        masks = [_causal_mask(a, b, device) if causal else None for a, b in zip(lq, lk)]

        def forward():
            outs = []
            for i, mask in enumerate(masks):
                views = [t[start:stop].transpose(0, 1).unsqueeze(0)
                         for t, (start, stop) in ((q, bounds_q[i:i + 2]), (k, bounds_k[i:i + 2]),
                                                  (v, bounds_k[i:i + 2]))]
                out = F.scaled_dot_product_attention(*views, attn_mask=mask, enable_gqa=gqa)
                outs.append(out.squeeze(0).transpose(0, 1))
            return torch.cat(outs)
    elif variant == FLEX:
        forward = _flex(q, k, v, inputs, lq, lk, causal, gqa, device)
    elif variant == VARLEN:
        from torch.nn.attention.varlen import varlen_attn

        parameters = inspect.signature(varlen_attn).parameters
        options = {}
        # torch 2.12 added enable_gqa; before it, FlashAttention's kernels get Hk < Hq as they are (they take
        # grouped-query heads natively), and a version that refuses them fails in the worker, saying why.
        if gqa and "enable_gqa" in parameters:
            options["enable_gqa"] = True
        if causal:  # FlashAttention's causal mask is aligned bottom-right, as mmfast's (2.9: is_causal; later: window)
            if "is_causal" in parameters:
                options["is_causal"] = True
            else:
                options["window_size"] = (-1, 0)

        def forward():
            return varlen_attn(q, k, v, inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], max(lq), max(lk), **options)
    elif variant == XFORMERS:
        forward = _xformers(q, k, v, lq, lk, causal, shape["Hq"], shape["Hk"])
    else:
        backend = variant.removeprefix(MMFAST)

        def forward():
            return mmfast.ops.cross_modal_attention(
                q, k, v, cu_seqlens_q=inputs["cu_seqlens_q"], cu_seqlens_k=inputs["cu_seqlens_k"],
                max_seqlen_q=max(lq), max_seqlen_k=max(lk), causal=causal, backend=backend)
    return Attention(forward=forward, grad=grad, leaves=leaves, packed=same)


def _causal_mask(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """(lq, lk) bool, True where query i may attend key j <= i + lk - lq (bottom-right aligned)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def _padded(inputs: dict, lq: list[int], lk: list[int], causal: bool, gqa: bool, backward: bool) -> Attention:
    """SDPA on the batch padded to the longest sample (B, H, N, D), with the key padding mask."""
    device = inputs["q"].device
    batch, longest_q, longest_k = len(lq), max(lq), max(lk)
    # The real rows' places in the padded (B * N) rows.
    rows = {"q": torch.tensor([b * longest_q + i for b, n in enumerate(lq) for i in range(n)], device=device),
            "k": torch.tensor([b * longest_k + j for b, n in enumerate(lk) for j in range(n)], device=device)}
    longest = {"q": longest_q, "k": longest_k}

    def pad(packed, which):
        padded = packed.new_zeros(batch * longest[which], *packed.shape[1:])
        padded[rows[which]] = packed
        return padded.view(batch, longest[which], *packed.shape[1:]).transpose(1, 2).contiguous()

    def unpad(padded, which):
        heads, head_dim = padded.shape[1], padded.shape[3]
        return padded.transpose(1, 2).reshape(batch * longest[which], heads, head_dim)[rows[which]]

    q, k, v = pad(inputs["q"], "q"), pad(inputs["k"], "k"), pad(inputs["v"], "k")
    for leaf in (q, k, v):
        leaf.requires_grad_(backward)
    grad = pad(inputs["grad"], "q")  # zero on the padded query rows: no loss reads them
    key_lengths = torch.tensor(lk, device=device)[:, None]
    mask = torch.arange(longest_k, device=device)[None, :] < key_lengths  # (B, Nk) the key padding mask
    if causal:  # (B, 1, Nq, Nk): key j <= i + lk - lq of the sample, as well as a real key
        shift = (key_lengths - torch.tensor(lq, device=device)[:, None])[:, :, None]
        rows_i = torch.arange(longest_q, device=device)[None, :, None]
        attn_mask = (mask[:, None, :] & (torch.arange(longest_k, device=device)[None, None, :] <= rows_i + shift))
        attn_mask = attn_mask[:, None]
    else:
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, Nk)

    def forward():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)

    return Attention(forward=forward, grad=grad, leaves=[q, k, v], packed=unpad)


def _flex(q, k, v, inputs: dict, lq: list[int], lk: list[int], causal: bool, gqa: bool, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    samples = torch.arange(len(lq), device=device)
    lengths_q, lengths_k = torch.tensor(lq, device=device), torch.tensor(lk, device=device)
    sample_q, sample_k = samples.repeat_interleave(lengths_q), samples.repeat_interleave(lengths_k)
    position_q = torch.arange(q.shape[0], device=device) - inputs["cu_seqlens_q"][:-1].long()[sample_q]
    position_k = torch.arange(k.shape[0], device=device) - inputs["cu_seqlens_k"][:-1].long()[sample_k]
    shift = (lengths_k - lengths_q)[sample_q]

    def document(b, h, q_index, k_index):
        return sample_q[q_index] == sample_k[k_index]

    def causal_document(b, h, q_index, k_index):
        return document(b, h, q_index, k_index) & (position_k[k_index] <= position_q[q_index] + shift[q_index])

    # Built once, untimed; compiled on CUDA, where the eager one would materialise all Tq x Tk pairs.
    block_mask = create_block_mask(causal_document if causal else document, None, None, q.shape[0], k.shape[0],
                                   device=device, _compile=device.type == "cuda")
    compiled = torch.compile(flex_attention, dynamic=False)  # compiled on the first (warmup) step

    def forward():
        views = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        return compiled(*views, block_mask=block_mask, enable_gqa=gqa).squeeze(0).transpose(0, 1)

    return forward


def _xformers(q, k, v, lq: list[int], lk: list[int], causal: bool, heads_q: int, heads_k: int):
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias

    bias_type = attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else attn_bias.BlockDiagonalMask
    bias = bias_type.from_seqlens(q_seqlen=lq, kv_seqlen=lk)
    groups = heads_q // heads_k

    def forward():
        if groups == 1:  # (1, T, H, D)
            return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
        # Grouped-query: (1, T, G, H, D) with the key heads expanded (stride 0) over each group's query heads.
        shape_k = (1, k.shape[0], heads_k, groups, k.shape[-1])
        out = xops.memory_efficient_attention(
            q.view(1, q.shape[0], heads_k, groups, q.shape[-1]), k[None, :, :, None].expand(shape_k),
            v[None, :, :, None].expand(shape_k), attn_bias=bias)
        return out.reshape(q.shape)

    return forward


def _matmul(shape: dict, dtype: torch.dtype, device: torch.device) -> Workload:
    inner, blocks = matmul_blocks(shape)
    generator = torch.Generator(device).manual_seed(0)
    gemms = [(torch.randn(m, inner, generator=generator, device=device).to(dtype),
              torch.randn(inner, n, generator=generator, device=device).to(dtype),
              torch.empty(m, n, dtype=dtype, device=device)) for m, n in blocks]

    def step():
        for a, b, out in gemms:
            torch.mm(a, b, out=out)

    return Workload(step=step, refresh=lambda: None)


def build(variant: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Workload:
    if variant == MATMUL:
        check_shape(shape)
        return _matmul(shape, dtype, device)
    run = attention(variant, shape, dtype, device)

    def refresh():
        for leaf in run.leaves:
            leaf.grad = None

    if shape["backward"]:
        def step():
            run.forward().backward(run.grad)
    else:
        def step():
            run.forward()  # no input requires grad: no graph is kept

    return Workload(step=step, refresh=refresh)
