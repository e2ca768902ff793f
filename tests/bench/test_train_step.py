"""`mmfast bench train-step --quick` end to end: each variant in its own worker, ratios to the unpatched model."""

import pytest
import torch

from mmfast.bench import format_table, run_benchmark, train_step
from mmfast.cli import main

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_quick_run_measures_unpatched_and_patched(monkeypatch):
    monkeypatch.setattr(train_step, "VARIANTS", (train_step.UNPATCHED, "patched-cpu", "patched-triton"))
    result = run_benchmark("train-step", device="cpu", dtype="float32", quick=True)
    rows = {row["name"]: row for row in result["variants"]}
    assert result["benchmark"] == "train-step" and result["baselines"] == ["unpatched"]
    for name in ("unpatched", "patched-cpu"):
        assert rows[name]["status"] == "ok", (name, rows[name].get("error"))
        assert rows[name]["median_ms"] > 0 and rows[name]["peak_extra_bytes"] > 0
    assert rows["patched-triton"]["status"] == "skipped" and "interpreter" in rows["patched-triton"]["reason"]
    assert rows["unpatched"]["time_ratio"]["unpatched"] == 1.0
    patched = rows["patched-cpu"]
    assert patched["time_ratio"]["unpatched"] == pytest.approx(patched["median_ms"] / rows["unpatched"]["median_ms"])
    assert patched["memory_ratio"]["unpatched"] == pytest.approx(
        patched["peak_extra_bytes"] / rows["unpatched"]["peak_extra_bytes"])
    table = format_table(result)
    assert "time/unpatched" in table and "mem/unpatched" in table


def test_every_variant_trains_one_step_in_process():
    device = torch.device("cpu")
    shape = train_step.QUICK
    for variant in train_step.VARIANTS:
        if train_step.skip_reason(variant, device) is not None:
            continue
        workload = train_step.build(variant, shape, torch.float32, device)
        workload.refresh()
        workload.step()
    with pytest.raises(ValueError, match="variant"):
        train_step.build("patched", shape, torch.float32, device)


def test_lora_shape_builds_a_peft_model():
    import peft

    net = train_step.model({**train_step.QUICK, "train": "lora"}, torch.float32, torch.device("cpu"))
    assert isinstance(net, peft.PeftModel)
    with pytest.raises(ValueError, match="train"):
        train_step.model({**train_step.QUICK, "train": "half"}, torch.float32, torch.device("cpu"))


def test_cli_names_the_benchmark_with_a_hyphen(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train_step", "--quick"])  # the module's name is not the command's
    assert "train-step" in capsys.readouterr().err
