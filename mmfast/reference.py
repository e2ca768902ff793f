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
