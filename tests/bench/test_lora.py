"""`mmfast bench lora` at tiny sizes: every variant runs, and the saved bytes are what autograd must keep.

Each run spawns one worker process per variant and measures the copy bandwidth, so only the three
variants whose saved tensors are known by formula run here.
"""

import statistics

import pytest
import torch

from mmfast.bench import format_table, lora, run_benchmark


def _rows(result):
    return {row["name"]: row for row in result["variants"]}


@pytest.fixture
def three_variants(monkeypatch):
    monkeypatch.setattr(lora, "VARIANTS", (lora.BASE, lora.PEFT, "mmfast-torch"))


def test_quick_run_saves_less_than_peft_with_dropout(three_variants):
    result = run_benchmark("lora", device="cpu", dtype="float32", quick=True)
    rows = _rows(result)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert row["median_ms"] > 0 and row["peak_extra_bytes"] > 0
    n, i, r, dropout = (result["shape"][key] for key in ("N", "in", "r", "dropout"))
    assert dropout > 0
    size = torch.float32.itemsize
    x, xa = n * i * size, n * r * size

    # The frozen linear saves only its (excluded) weight: x's gradient needs nothing else.
    assert rows["base"]["saved"] == {"beyond_input_bytes": 0, "with_input_bytes": 0, "input_saved": False}
    # PEFT: dropout(x) for A's gradient, the dropout mask (on CPU torch keeps it in x's dtype, on CUDA
    # as bool), and xa for B's gradient; x itself is not kept.
    mask = x
    assert rows["peft"]["saved"] == {"beyond_input_bytes": x + mask + xa, "with_input_bytes": x + mask + xa,
                                     "input_saved": False}
    # mmfast's torch backend keeps x and xa, and a seed (an int64 scalar) in place of the mask.
    seed = 8
    assert rows["mmfast-torch"]["saved"] == {"beyond_input_bytes": xa + seed, "with_input_bytes": x + xa + seed,
                                             "input_saved": True}
    assert rows["mmfast-torch"]["saved_ratio"]["peft"] == pytest.approx((xa + seed) / (2 * x + xa))
    assert rows["mmfast-torch"]["saved_ratio"]["base"] is None  # base saves nothing: no ratio

    # Every variant but base is also timed step by step against base, in its own worker.
    assert result["paired"] == "base" and "paired_ratio" not in rows["base"]
    for name in ("peft", "mmfast-torch"):
        paired = rows[name]
        assert len(paired["paired_times_ms"]) == len(paired["times_ms"]) == result["iters"]
        ratios = [t / p for t, p in zip(paired["times_ms"], paired["paired_times_ms"])]
        assert paired["paired_ratio"] == pytest.approx(statistics.median(ratios))

    table = format_table(result)
    assert "saved MiB" in table and "saved w/ x MiB" in table and "saved/peft" in table
    assert "saved/base" not in table and "paired time/base" in table


def test_named_shape_runs_in_place_of_the_default(monkeypatch):
    tiny = {**lora.QUICK, "dropout": 0.0}
    monkeypatch.setitem(lora.SHAPES, "tiny", tiny)
    monkeypatch.setattr(lora, "VARIANTS", lora.BASELINES)
    result = run_benchmark("lora", device="cpu", dtype="bfloat16", shape="tiny")
    assert result["shape_name"] == "tiny" and result["shape"] == tiny
    assert result["iters"] == 10  # a named shape is a full run, not a quick one
    peft = _rows(result)["peft"]
    assert peft["status"] == "ok", peft.get("error")
    # Without dropout PEFT's A reads x itself, so x is what it saves, besides xa.
    size = torch.bfloat16.itemsize
    x, xa = tiny["N"] * tiny["in"] * size, tiny["N"] * tiny["r"] * size
    assert peft["saved"] == {"beyond_input_bytes": xa, "with_input_bytes": x + xa, "input_saved": True}
    assert "tiny (N=256" in format_table(result)


def test_every_variant_builds_and_measures_its_saved_bytes():
    # In this process and without timing: catches a variant that cannot even run one forward.
    device = torch.device("cpu")
    for variant in lora.VARIANTS:
        if lora.skip_reason(variant, device) is not None or variant == lora.PEFT_COMPILED:
            continue  # compiling takes a minute on 2 cores; the quick CLI run covers it
        workload = lora.build(variant, lora.QUICK, torch.float32, device)
        workload.step()
        saved = workload.saved()
        assert saved["with_input_bytes"] >= saved["beyond_input_bytes"] >= 0, variant


def test_a_shape_must_be_one_the_benchmark_names():
    with pytest.raises(ValueError, match="square-dropout"):
        run_benchmark("lora", shape="huge")
    with pytest.raises(ValueError, match="one shape"):
        run_benchmark("cross_entropy", shape="square")
    with pytest.raises(ValueError, match="quick"):
        run_benchmark("lora", quick=True, shape="square")
