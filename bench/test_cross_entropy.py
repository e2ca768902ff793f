"""pytest-benchmark suite for cross-entropy forward + backward: `pytest bench --benchmark-only`.

The same variants and default shape as `mmfast bench cross_entropy` (mmfast/bench/cross_entropy.py),
timed in this process by pytest-benchmark; memory and the copy-bandwidth comparison are only in
`mmfast bench`, which runs each variant in its own process.
"""

import pytest
import torch

from mmfast.bench import cross_entropy

SHAPE = cross_entropy.shape(quick=False)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", cross_entropy.VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy(benchmark, device, variant, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible")
    reason = cross_entropy.skip_reason(variant, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    torch_dtype = getattr(torch, dtype)
    workload = cross_entropy.build(variant, SHAPE, torch_dtype, torch.device(device))

    def step():
        workload.step()
        if device == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times on the host clock

    benchmark.group = f"cross_entropy {device} {dtype}"
    # setup restores fresh logits before every round, untimed: mmfast's in-place backward overwrote them.
    # The warmup rounds include torch.compile's compilation.
    benchmark.pedantic(step, setup=workload.refresh, rounds=10, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = cross_entropy.bytes_moved(SHAPE, torch_dtype) / benchmark.stats.stats.median / 1e9
