"""pytest-benchmark suite for cross-modal attention forward + backward on a ragged batch:
`pytest bench/test_attention.py --benchmark-only`.

The same variants and named shapes as `mmfast bench attention --shape NAME` (mmfast/bench/attention.py),
timed in this process by pytest-benchmark, with the useful GFLOP/s in extra_info (the `matmul` variant's
is the machine's matmul rate on GEMMs of the same FLOPs); peak memory, the paired timing against the loop
and the copy-bandwidth comparison are only in `mmfast bench`, which runs each variant in its own process.
The CPU shapes run in float32 on CPU, the GPU shapes (attention.GPU_SHAPES, and the CPU ones) in bfloat16
on CUDA.
"""

import pytest
import torch

from mmfast.bench import attention, harness

WARMUP, ROUNDS = harness.ITERATIONS[False]
DEVICES = [("cpu", "float32"), pytest.param("cuda", "bfloat16", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("variant", attention.VARIANTS)
@pytest.mark.parametrize("shape", attention.SHAPES)
@pytest.mark.parametrize("device, dtype", DEVICES)
def test_attention(benchmark, device, dtype, shape, variant):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible")
    if device == "cpu" and shape in attention.GPU_SHAPES:
        pytest.skip(f"{shape} is a GPU shape: one step takes minutes on a few CPU cores")
    reason = attention.skip_reason(variant, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    torch_dtype = getattr(torch, dtype)
    workload = attention.build(variant, attention.SHAPES[shape], torch_dtype, torch.device(device))

    def step():
        workload.step()
        if device == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times on the host clock

    benchmark.group = f"attention {shape} {device} {dtype}"
    # setup frees the previous round's gradients, untimed. The warmup rounds include torch.compile's compilation.
    benchmark.pedantic(step, setup=workload.refresh, rounds=ROUNDS, warmup_rounds=WARMUP)
    flops = attention.flops(attention.SHAPES[shape], torch_dtype)
    benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9
