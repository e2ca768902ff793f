"""pytest plugin (-p peer_patch_peft): every PEFT LoRA Linear layer any test builds runs through mmfast.

PEFT builds its LoRA Linear layers in peft.tuners.lora.layer.Linear.__init__, whatever the entry point
(get_peft_model, PeftModel.from_pretrained, inject_adapter_in_model, add_adapter, LoraModel, mixed models), so
the plugin wraps that constructor: each new layer is handed to mmfast.integrations.peft.patch_peft_layer, which
swaps in the fused forward or leaves the layer as PEFT's with its reason (DoRA and other variants, Conv1D, ...).
Adapters added to a patched layer later are checked on every call by the fused layer itself.

Per test, the calls of the fused op (mmfast.ops.lora_linear) and the calls that fell back to PEFT's forward
are counted and handed to peer_record in the call report's user_properties.
"""

from __future__ import annotations

import pytest
from peft.tuners.lora import layer as lora_layer

import mmfast.ops
from mmfast.integrations import peft as mmfast_peft

_counts = {"fused": 0, "fallbacks": 0}  # of the running test
_peft_init = lora_layer.Linear.__init__
_lora_linear = mmfast.ops.lora_linear
_fall_back = mmfast_peft.FusedLoraLinear._fall_back


def _init_then_patch(self, *args, **kwargs):
    _peft_init(self, *args, **kwargs)
    if type(self) is lora_layer.Linear:  # a subclass (quantised, ...) ends its own __init__ after this one
        mmfast_peft.patch_peft_layer(self)


def _counted_lora_linear(*args, **kwargs):
    _counts["fused"] += 1
    return _lora_linear(*args, **kwargs)


def _counted_fall_back(self, reason):
    _counts["fallbacks"] += 1
    return _fall_back(self, reason)


def pytest_configure(config):
    lora_layer.Linear.__init__ = _init_then_patch
    mmfast.ops.lora_linear = _counted_lora_linear
    mmfast_peft.FusedLoraLinear._fall_back = _counted_fall_back


def pytest_unconfigure(config):
    lora_layer.Linear.__init__ = _peft_init
    mmfast.ops.lora_linear = _lora_linear
    mmfast_peft.FusedLoraLinear._fall_back = _fall_back


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _counts.update(fused=0, fallbacks=0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        report = outcome.get_result()
        report.user_properties += [("mmfast_fused_calls", _counts["fused"]),
                                   ("mmfast_fallbacks", _counts["fallbacks"])]
