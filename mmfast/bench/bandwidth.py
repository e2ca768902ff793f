"""The machine's limit for memory-bound ops: GB/s of a large `dst.copy_(src)`, bytes = 2 · size.

A benchmark module like the others (see harness.py), with one variant; every run measures it so
that an op's GB/s is compared with a limit measured on the same machine at the same time.
"""

from __future__ import annotations

import torch

from .harness import MIB, Workload

VARIANTS = ("copy",)
BASELINES = ()
LEGEND = "copy: dst.copy_(src) of one large buffer"


def skip_reason(variant: str, device: torch.device) -> str | None:
    return None


def shape(quick: bool) -> dict:
    # Far beyond any last-level cache (CPU L3, GPU L2) either way, so this is DRAM / HBM bandwidth.
    return {"bytes": (128 if quick else 512) * MIB}


def bytes_moved(shape: dict, dtype) -> int:
    return 2 * shape["bytes"]  # read src, write dst


def build(variant: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Workload:
    src = torch.ones(shape["bytes"], dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)  # written once here, so the timed copies hit resident pages
    return Workload(step=lambda: dst.copy_(src), refresh=lambda: None)
