"""mmfast.nn.CrossEntropyLoss as a drop-in for torch.nn.CrossEntropyLoss."""

import pytest
import torch

import mmfast
from tests.ops.test_cross_entropy import make_inputs


def test_module_is_a_drop_in_for_torch():
    logits, target = make_inputs((2, 9, 40), torch.float32)
    flat_logits, flat_target = logits.view(-1, 40), target.view(-1).clamp(min=3)
    for kwargs in ({}, {"reduction": "sum", "label_smoothing": 0.1}, {"ignore_index": 3}):
        ours = mmfast.nn.CrossEntropyLoss(**kwargs)(flat_logits, flat_target)
        theirs = torch.nn.CrossEntropyLoss(**kwargs)(flat_logits, flat_target)
        torch.testing.assert_close(ours, theirs)
    assert mmfast.nn.CrossEntropyLoss(size_average=False).reduction == "sum"
    with pytest.raises(ValueError, match="weight"):
        mmfast.nn.CrossEntropyLoss(weight=torch.ones(40))
