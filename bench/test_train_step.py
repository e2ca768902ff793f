"""pytest-benchmark suite for one LLaVA-style training step (forward, backward, AdamW): `pytest bench --benchmark-only`.

The same variants and named shapes as `mmfast bench train-step --shape NAME` (mmfast/bench/train_step.py),
timed in this process by pytest-benchmark; peak memory and the ratios to the unpatched model are only in
`mmfast bench train-step`, which runs each variant in its own process.
"""

import pytest
import torch

from mmfast.bench import harness, train_step

WARMUP, ROUNDS = train_step.ITERATIONS[False]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", train_step.VARIANTS)
@pytest.mark.parametrize("shape", train_step.SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_train_step(benchmark, device, shape, variant, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible")
    reason = train_step.skip_reason(variant, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    torch_dtype = getattr(torch, dtype)
    workload = train_step.build(variant, train_step.SHAPES[shape], torch_dtype, torch.device(device))

    def step():
        workload.step()
        if device == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times on the host clock

    benchmark.group = f"train-step {shape} {device} {dtype}"
    # setup frees the previous round's gradients, untimed; the warmup rounds create AdamW's states.
    benchmark.pedantic(step, setup=workload.refresh, rounds=ROUNDS, warmup_rounds=WARMUP)
    flops = train_step.flops(train_step.SHAPES[shape], torch_dtype)
    benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["logits MiB"] = train_step.logits_bytes(train_step.SHAPES[shape], torch_dtype) / harness.MIB
