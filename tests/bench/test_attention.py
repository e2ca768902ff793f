"""`mmfast bench attention` at tiny sizes: the variants run end to end, compute the same attention, and
the FLOPs (of the attention and of the matmul limit) are counted exactly.

A quick run spawns one worker process per variant (two steps each, paired with the loop) and measures
the copy bandwidth, so it runs once here, on the variants that run on any CPU.
"""

import warnings

import pytest
import torch

from mmfast.bench import BENCHMARKS, attention, format_table, run_benchmark

CPU = torch.device("cpu")
# Tiny, grouped-query and causal (every sample with at least as many keys as queries), in the layouts'
# corner cases: a one-query sample, a sample whose queries and keys are as many.
CAUSAL = {"lq": [1, 9, 20], "lk": [5, 9, 48], "Hq": 4, "Hk": 2, "D": 8, "causal": True, "backward": True}


def _runnable(variants):
    with warnings.catch_warnings():  # the extension's build warning, when it cannot build
        warnings.simplefilter("ignore")
        return [v for v in variants if attention.skip_reason(v, CPU) is None]


def test_attention_is_registered():
    assert "attention" in BENCHMARKS


def test_quick_run_prints_ratios_to_padded_sdpa_and_the_loop(monkeypatch):
    always = (attention.MATMUL, attention.PADDED, attention.LOOP, "mmfast-torch")
    monkeypatch.setattr(attention, "VARIANTS", (*always, attention.FLEX, attention.VARLEN, "mmfast-cuda"))
    result = run_benchmark("attention", device="cpu", dtype="float32", quick=True)
    rows = {row["name"]: row for row in result["variants"]}
    assert result["shape"] == attention.QUICK and result["paired"] == attention.LOOP
    assert result["flops"] == attention.flops(attention.QUICK, torch.float32)
    for name in always:
        row = rows[name]
        assert row["status"] == "ok", (name, row.get("error"))
        # On the tiny quick shape RSS can end a few pages below where it started (the allocator returns them).
        assert row["median_ms"] > 0 and row["peak_extra_bytes"] > -(1 << 20)
        assert row["gflops"] == pytest.approx(result["flops"] / row["median_ms"] / 1e6)
        assert set(row["time_ratio"]) == {attention.PADDED, attention.LOOP}
        if name != attention.LOOP:
            assert len(row["paired_times_ms"]) == result["iters"]
    assert rows[attention.PADDED]["time_ratio"][attention.PADDED] == 1.0
    assert rows[attention.LOOP]["time_ratio"][attention.LOOP] == 1.0
    # Neither runs forward + backward on CPU tensors in torch 2.13: skipped, saying why, not failed.
    for name in (attention.FLEX, attention.VARLEN, "mmfast-cuda"):
        assert rows[name]["status"] == "skipped" and rows[name]["reason"], name
    assert "backward on CPU" in rows[attention.FLEX]["reason"]
    table = format_table(result)
    for column in ("time/sdpa-padded", "time/sdpa-loop", "paired time/sdpa-loop", "GFLOP/s"):
        assert column in table


@pytest.mark.parametrize("shape", [attention.QUICK, CAUSAL], ids=["quick", "causal"])
def test_every_variant_computes_the_same_attention_and_gradients(shape):
    # In float64 and in this process: the layouts (padded, sliced, packed) must map back to the same rows.
    variants = [v for v in _runnable(attention.VARIANTS) if v not in (attention.MATMUL, attention.FLEX)]
    assert {attention.PADDED, attention.LOOP, "mmfast-torch"} <= set(variants)
    results = {}
    for variant in variants:
        run = attention.attention(variant, shape, torch.float64, CPU)
        out = run.forward()
        out.backward(run.grad)
        results[variant] = [run.packed(out.detach(), "q")] + [run.packed(leaf.grad, which)
                                                              for leaf, which in zip(run.leaves, "qkk")]
    inputs = attention.packed_inputs(shape, torch.float64, CPU)
    expected = results["mmfast-torch"]
    assert expected[0].shape == inputs["q"].shape and expected[2].shape == inputs["k"].shape
    for variant, tensors in results.items():
        for name, value, reference in zip(("out", "dq", "dk", "dv"), tensors, expected):
            torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-10, msg=f"{variant} {name}")


def test_padded_sdpa_gives_the_padding_no_gradient():
    run = attention.attention(attention.PADDED, CAUSAL, torch.float64, CPU)
    run.forward().backward(run.grad)
    q, k, v = run.leaves
    assert q.grad.shape == (3, CAUSAL["Hq"], max(CAUSAL["lq"]), CAUSAL["D"])
    for b, (lq, lk) in enumerate(zip(CAUSAL["lq"], CAUSAL["lk"])):
        assert q.grad[b, :, lq:].count_nonzero() == 0 and q.grad[b, :, :lq].count_nonzero() > 0
        for leaf in (k, v):
            assert leaf.grad[b, :, lk:].count_nonzero() == 0 and leaf.grad[b, :, :lk].count_nonzero() > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_flops_count_the_attended_pairs_and_the_matmul_matches_them(causal, backward):
    shape = {**CAUSAL, "causal": causal, "backward": backward}
    attended = sum(int(attention._causal_mask(q, k, CPU).sum()) if causal else q * k
                   for q, k in zip(shape["lq"], shape["lk"]))
    assert attended == sum(attention.pairs(q, k, causal) for q, k in zip(shape["lq"], shape["lk"]))
    per_pair = 4 * shape["D"] * shape["Hq"] * (3.5 if backward else 1)
    assert attention.flops(shape, torch.float32) == per_pair * attended
    inner, blocks = attention.matmul_blocks(shape)
    assert 2 * inner * sum(m * n for m, n in blocks) == attention.flops(shape, torch.float32)
    # And exactly when a sample has more queries than keys (no padded SDPA then, but the count holds).
    assert attention.pairs(7, 3, True) == int(torch.ones(7, 3).tril(3 - 7).sum()) == 6


def test_forward_only_shape_keeps_no_graph():
    shape = {**CAUSAL, "backward": False}
    for variant in (attention.MATMUL, attention.PADDED, attention.LOOP, "mmfast-torch"):
        workload = attention.build(variant, shape, torch.float32, CPU)
        workload.refresh()
        workload.step()
    run = attention.attention(attention.LOOP, shape, torch.float32, CPU)
    assert not run.forward().requires_grad


def test_named_shapes():
    assert attention.shape(False) == attention.SHAPES["ragged"]
    assert set(attention.GPU_SHAPES) < set(attention.SHAPES)
    ragged = attention.SHAPES["ragged"]
    assert len(ragged["lq"]) == 8 and all(32 <= n <= 512 for n in ragged["lq"])
    assert all(64 <= n <= 576 for n in ragged["lk"]) and (ragged["Hq"], ragged["D"]) == (8, 64)
    assert any(s["Hq"] > s["Hk"] for s in attention.SHAPES.values())  # a grouped-query case
    long = attention.SHAPES["long"]
    assert long["D"] == 128 and all(2048 <= n <= 4096 for n in long["lq"] + long["lk"])
    assert not attention.SHAPES["long-forward"]["backward"]
    for shape in attention.SHAPES.values():
        attention.check_shape(shape)


def test_a_shape_it_cannot_build_is_refused():
    with pytest.raises(ValueError, match="lq <= lk"):
        attention.build(attention.PADDED, {**CAUSAL, "lq": [6, 9, 20]}, torch.float32, CPU)
    with pytest.raises(ValueError, match="multiple of Hk"):
        attention.build(attention.MATMUL, {**CAUSAL, "Hk": 3}, torch.float32, CPU)
    with pytest.raises(ValueError, match="variant"):
        attention.build("sdpa", CAUSAL, torch.float32, CPU)
