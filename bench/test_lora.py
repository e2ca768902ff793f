"""pytest-benchmark suite for the LoRA linear layer forward + backward: `pytest bench --benchmark-only`.

The same variants and named shapes as `mmfast bench lora --shape NAME` (mmfast/bench/lora.py), timed
in this process by pytest-benchmark, with the bytes autograd saves for the backward in extra_info;
peak memory, the memory floor and the copy-bandwidth comparison are only in `mmfast bench`, which
runs each variant in its own process.
"""

import pytest
import torch

from mmfast.bench import harness, lora

WARMUP, ROUNDS = harness.ITERATIONS[False]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", lora.VARIANTS)
@pytest.mark.parametrize("shape", lora.SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_lora(benchmark, device, shape, variant, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible")
    reason = lora.skip_reason(variant, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    torch_dtype = getattr(torch, dtype)
    workload = lora.build(variant, lora.SHAPES[shape], torch_dtype, torch.device(device))

    def step():
        workload.step()
        if device == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times on the host clock

    benchmark.group = f"lora {shape} {device} {dtype}"
    # setup frees the previous round's gradients, untimed. The warmup rounds include torch.compile's compilation.
    benchmark.pedantic(step, setup=workload.refresh, rounds=ROUNDS, warmup_rounds=WARMUP)
    flops = lora.flops(lora.SHAPES[shape], torch_dtype)
    benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9
    workload.refresh()
    benchmark.extra_info.update(workload.saved())
