"""pytest plugin (-p peer_select_peft): the LoRA subset of PEFT's tests/test_custom_models.py that the peer runs
take, sized to run in a few minutes on 2 cores. Deselected tests are reported to pytest (and so counted).

  - TestPeftCustomModel, cases of plain LoRA on its MLP model (CUSTOM_MODEL_CASES, every one of its tests):
    torch.nn.Linear layers, which are what mmfast fuses: one target, both targets, modules_to_save, dropout
    with lora_alpha, lora_bias. Its other cases are other tuners, LoRA variants (DoRA, KaSA, VeLoRA, ...: PEFT's
    forward, patched or not) and LoRA on Embedding, Conv1D, ConvNd and MultiheadAttention layers, which mmfast
    never patches; the cases left out repeat these (target "lin0" as a string, target "lin1" alone);
  - every other class's LoRA tests (repr, several active adapters, mixed-adapter batches, requires_grad,
    dispatch, default targets), except the FSDP and checkpoint-wrapper classes (torch.distributed process
    groups) and test_loading_model_requires_grad_set_correctly_moving_parameters (392 device-move variants of
    test_loading_model_requires_grad_set_correctly, which runs).
"""

from __future__ import annotations

import pytest

CUSTOM_MODEL_CASES = {"Vanilla MLP 2 LoRA", "Vanilla MLP 4 LoRA", "Vanilla MLP 5 LoRA", "Vanilla MLP 6 LoRA",
                      "Vanilla MLP 1 LoRA with lora_b bias"}
EXCLUDED_CLASSES = {"TestPeftFsdpStateDict", "TestPeftCheckpointWrapperStateDict", "TestFsdp2UnshardedParams"}
EXCLUDED_TESTS = {"test_loading_model_requires_grad_set_correctly_moving_parameters"}


def _selected(item) -> bool:
    test_class = item.cls.__name__ if item.cls is not None else ""
    if test_class == "TestPeftCustomModel":
        callspec = getattr(item, "callspec", None)
        return callspec is not None and callspec.params.get("test_name") in CUSTOM_MODEL_CASES
    if test_class in EXCLUDED_CLASSES or item.originalname in EXCLUDED_TESTS:
        return False
    return "lora" in item.nodeid.lower()


def pytest_collection_modifyitems(config, items):
    found = {item.callspec.params.get("test_name") for item in items if hasattr(item, "callspec")}
    if not CUSTOM_MODEL_CASES <= found:
        # A PEFT release that renamed its cases must not shrink the run unnoticed.
        raise pytest.UsageError(f"peer_select_peft: PEFT's tests have no case {sorted(CUSTOM_MODEL_CASES - found)}")
    kept = [item for item in items if _selected(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _selected(item)])
    items[:] = kept
