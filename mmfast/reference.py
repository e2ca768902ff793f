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
