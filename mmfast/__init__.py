"""mmfast: fused Triton, CUDA and C++ kernels for training multimodal models with PyTorch."""

from . import nn, ops
from .backends import BACKENDS, BackendUnavailable, use_backend
# mmfast.patch (the function) shadows the submodule's attribute; `from mmfast.patch import ...` still works.
# The submodule imports transformers and peft only when patch() runs.
from .patch import PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailable", "PatchReport", "nn", "ops", "patch", "unpatch", "use_backend"]
