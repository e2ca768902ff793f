"""mmfast: fused Triton, CUDA and C++ kernels for training multimodal models with PyTorch."""

from . import nn, ops
from .backends import BACKENDS, BackendUnavailable, use_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailable", "nn", "ops", "use_backend"]
