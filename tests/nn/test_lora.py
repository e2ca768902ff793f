"""mmfast.nn.LoRALinear: PEFT's initialisation and scaling, from_linear, merge and unmerge."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmfast.nn import LoRALinear
from tests.helpers import DEVICE


def test_fresh_layer_is_the_base_linear_and_trains_only_the_adapter():
    torch.manual_seed(0)
    linear = nn.Linear(17, 33, device=DEVICE)
    layer = LoRALinear.from_linear(linear, r=4, alpha=8, dropout=0.1)
    assert layer.weight is linear.weight and layer.bias is linear.bias, "from_linear shares, never copies"
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    x = torch.randn(3, 5, 17, device=DEVICE)
    torch.testing.assert_close(layer(x), linear(x))  # B starts at zero, whatever the dropout draws
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(use_rslora, expected):
    layer = LoRALinear(8, 8, r=4, alpha=16, use_rslora=use_rslora)
    assert layer.scaling == expected


def test_forward_is_the_lora_formula_in_eval():
    torch.manual_seed(0)
    layer = LoRALinear(17, 9, r=3, alpha=6, dropout=0.5, device=DEVICE).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 17, device=DEVICE)
    expected = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected.detach())


def test_merge_then_unmerge_round_trips():
    torch.manual_seed(0)
    layer = LoRALinear(17, 9, r=3, alpha=6, device=DEVICE).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 17, device=DEVICE)
    before, weight = layer(x), layer.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_bad_arguments():
    with pytest.raises(ValueError, match="r:"):
        LoRALinear(8, 8, r=0, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(8, 8, r=2, alpha=1, dropout=1.0)
    with pytest.raises(TypeError, match="linear"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=2)
