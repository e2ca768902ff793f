"""pytest-benchmark suite for linear cross-entropy forward + backward: `pytest bench --benchmark-only`.

The same variants, default shape and step counts as `mmfast bench linear_cross_entropy`
(mmfast/bench/linear_cross_entropy.py), timed in this process by pytest-benchmark; memory, the
memory floor and the copy-bandwidth comparison are only in `mmfast bench`, which runs each variant in
its own process.
"""

import pytest
import torch

from mmfast.bench import linear_cross_entropy

SHAPE = linear_cross_entropy.shape(quick=False)
WARMUP, ROUNDS = linear_cross_entropy.ITERATIONS[False]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", linear_cross_entropy.VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy(benchmark, device, variant, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible")
    reason = linear_cross_entropy.skip_reason(variant, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    torch_dtype = getattr(torch, dtype)
    workload = linear_cross_entropy.build(variant, SHAPE, torch_dtype, torch.device(device))

    def step():
        workload.step()
        if device == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times on the host clock

    benchmark.group = f"linear_cross_entropy {device} {dtype}"
    # setup frees the previous round's gradients (or the limit's matmul outputs), untimed.
    # The warmup rounds include torch.compile's compilation.
    benchmark.pedantic(step, setup=workload.refresh, rounds=ROUNDS, warmup_rounds=WARMUP)
    flops = linear_cross_entropy.flops(SHAPE, torch_dtype)
    benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9
