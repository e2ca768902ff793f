"""Plain-torch implementations: the oracle for the tests and the `torch` backend.

Each op has the same signature as its kernels (see csrc/*.h for the contract). Math runs in float32,
or float64 for float64 inputs, so that a float64 call is the reference the kernels are checked against.
"""

from __future__ import annotations

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _capped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    x = _acc(logits)
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def _valid_rows(target, vocab, ignore_index):
    return (target != ignore_index) & (target >= 0) & (target < vocab)


def cross_entropy_forward(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    x = _capped(logits, softcap)
    valid = _valid_rows(target, x.shape[1], ignore_index)
    lse = torch.logsumexp(x, dim=1)
    x_target = x.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * x_target + z_loss * lse * lse
    if label_smoothing > 0:
        loss = loss - label_smoothing * x.mean(dim=1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


def cross_entropy_backward(logits, target, lse, grad_loss, grad_logits, ignore_index, label_smoothing, z_loss, softcap):
    x = _capped(logits, softcap)
    vocab = x.shape[1]
    valid = _valid_rows(target, vocab, ignore_index)
    grad = torch.exp(x - lse[:, None]) * (1 + 2 * z_loss * lse[:, None]) - label_smoothing / vocab
    rows = valid.nonzero()[:, 0]
    grad[rows, target[rows]] -= 1 - label_smoothing
    grad *= torch.where(valid, grad_loss, 0)[:, None]  # ignored rows get 0 even when grad_loss is nan
    if softcap > 0:
        grad *= 1 - (x / softcap) ** 2
    grad_logits.copy_(grad)


def linear_cross_entropy_forward(hidden, weight, bias, target, grad_loss, label_smoothing, z_loss, softcap,
                                 chunk_size, need_grad_hidden, need_grad_weight, need_grad_bias, return_argmax):
    """Chunks of `chunk_size` rows: logits for the chunk, the cross-entropy above, its gradient in place."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    stat_dtype = _acc(hidden[:0]).dtype
    loss = hidden.new_empty(rows, dtype=stat_dtype)
    lse = torch.empty_like(loss)
    argmax = hidden.new_empty(rows, dtype=torch.long) if return_argmax else None
    grads = grad_loss is not None
    grad_hidden = torch.empty_like(hidden) if grads and need_grad_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=stat_dtype) if grads and need_grad_weight else None
    grad_bias = (torch.zeros(vocab, dtype=stat_dtype, device=hidden.device)
                 if grads and need_grad_bias and bias is not None else None)
    no_ignore = -1  # every target is in [0, vocab): the caller dropped the ignored rows
    for start in range(0, rows, chunk_size):
        chunk = slice(start, start + chunk_size)
        h, t = hidden[chunk], target[chunk]
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        loss[chunk], lse[chunk] = cross_entropy_forward(logits, t, no_ignore, label_smoothing, z_loss, softcap)
        if return_argmax:
            argmax[chunk] = logits.argmax(dim=1)
        if not grads:
            continue
        cross_entropy_backward(logits, t, lse[chunk], grad_loss[chunk], logits, no_ignore, label_smoothing, z_loss,
                               softcap)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[chunk])
        if grad_weight is not None:
            grad_weight += (logits.T @ h).to(stat_dtype)
        if grad_bias is not None:
            grad_bias += logits.sum(dim=0, dtype=stat_dtype)
    return (loss, lse, argmax, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def lora_linear_mask(seed, rows, cols, dropout_p, device):
    generator = torch.Generator(device).manual_seed(seed)
    return torch.rand(rows, cols, generator=generator, device=device) >= dropout_p


def _dropout(x, seed, dropout_p):
    if dropout_p == 0:
        return x
    return x * lora_linear_mask(seed, *x.shape, dropout_p, x.device) / (1 - dropout_p)


def lora_linear_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """The mask is redrawn from the seed in the backward, so none is returned."""
    acc = _acc(x)
    xa = _dropout(acc, seed, dropout_p) @ _acc(lora_A).T
    out = acc @ _acc(weight).T + scaling * (xa @ _acc(lora_B).T)
    if bias is not None:
        out += _acc(bias)
    return out.to(x.dtype), xa.to(x.dtype), x.new_empty(0, dtype=torch.uint8)


def lora_linear_backward(grad_out, x, weight, lora_A, lora_B, scaling, xa, mask, dropout_p, seed, grad_x,
                         need_grad_x, need_grad_weight, need_grad_bias, need_grad_A, need_grad_B):
    g = _acc(grad_out)
    gxa = scaling * (g @ _acc(lora_B))
    if need_grad_x:
        total = g @ _acc(weight) + _dropout(gxa @ _acc(lora_A), seed, dropout_p)
        if grad_x is None:
            grad_x = total.to(x.dtype)
        else:
            grad_x += total.to(grad_x.dtype)
    else:
        grad_x = None
    grad_weight = (g.T @ _acc(x)).to(weight.dtype) if need_grad_weight else None
    grad_bias = g.sum(dim=0).to(x.dtype) if need_grad_bias else None
    grad_A = (gxa.T @ _dropout(_acc(x), seed, dropout_p)).to(lora_A.dtype) if need_grad_A else None
    grad_B = (scaling * (g.T @ _acc(xa))).to(lora_B.dtype) if need_grad_B else None
    return grad_x, grad_weight, grad_bias, grad_A, grad_B


def _attention_samples(cu_seqlens_q, cu_seqlens_k):
    """(b, q rows, k rows) per sample, as slices of the packed tensors."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        yield b, slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])


def _attention_scores(q, k, causal, scale):
    """Scores (Hq, lq, lk) of one sample in the accumulation dtype, -inf where a key is not allowed."""
    groups = q.shape[1] // k.shape[1]
    keys = _acc(k).repeat_interleave(groups, dim=1)
    scores = scale * torch.einsum("ihd,jhd->hij", _acc(q), keys)
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        rows = torch.arange(lq, device=q.device)[:, None]
        allowed = torch.arange(lk, device=q.device)[None, :] <= rows + lk - lq
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _attention_probs(scores, lse):
    """softmax from the row logsumexp; rows with no allowed key (lse = -inf) are all zero."""
    finite = torch.isfinite(lse)
    return torch.where(finite[..., None], torch.exp(scores - torch.where(finite, lse, 0)[..., None]), 0)


def cross_modal_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                  gate, residual):
    """Per-sample attention over the real lengths only; rows with no allowed key get exactly zero."""
    acc_dtype = _acc(q).dtype
    groups = q.shape[1] // k.shape[1]
    attn = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype, device=q.device)
    for _, rows, keys in _attention_samples(cu_seqlens_q, cu_seqlens_k):
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        scores = _attention_scores(q[rows], k[keys], causal, scale)
        lse[:, rows] = torch.logsumexp(scores, dim=-1)
        probs = _attention_probs(scores, lse[:, rows])
        values = _acc(v[keys]).repeat_interleave(groups, dim=1)
        attn[rows] = torch.einsum("hij,jhd->ihd", probs, values)
    out = None
    if gate is not None or residual is not None:
        out = attn if gate is None else torch.tanh(gate.to(acc_dtype))[:, None] * attn
        if residual is not None:
            out = out + _acc(residual)
        out = out.to(q.dtype)
    return out, attn.to(q.dtype), lse.float() if acc_dtype != torch.float64 else lse


def cross_modal_attention_backward(grad_out, q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, causal, scale, gate):
    acc_dtype = _acc(q).dtype
    groups = q.shape[1] // k.shape[1]
    g = _acc(grad_out)
    delta = (g * _acc(attn)).sum(-1)  # (Tq, Hq)
    grad_gate = None
    if gate is not None:
        tanh = torch.tanh(gate.to(acc_dtype))
        grad_gate = ((1 - tanh * tanh) * delta.sum(0)).to(gate.dtype)
        g = g * tanh[:, None]
        delta = delta * tanh
    grad_q = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    grad_v = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    for _, rows, keys in _attention_samples(cu_seqlens_q, cu_seqlens_k):
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        scores = _attention_scores(q[rows], k[keys], causal, scale)
        probs = _attention_probs(scores, lse[:, rows].to(acc_dtype))  # (Hq, lq, lk)
        values = _acc(v[keys]).repeat_interleave(groups, dim=1)
        keys_acc = _acc(k[keys]).repeat_interleave(groups, dim=1)
        grad_probs = torch.einsum("ihd,jhd->hij", g[rows], values)
        grad_scores = probs * (grad_probs - delta[rows].T[..., None]) * scale
        grad_q[rows] = torch.einsum("hij,jhd->ihd", grad_scores, keys_acc)
        lk, hk, d = k[keys].shape
        grad_k[keys] = torch.einsum("hij,ihd->jhd", grad_scores, _acc(q[rows])).view(lk, hk, groups, d).sum(2)
        grad_v[keys] = torch.einsum("hij,ihd->jhd", probs, g[rows]).view(lk, hk, groups, d).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_gate
