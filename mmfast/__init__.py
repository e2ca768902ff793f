"""mmfast: fused Triton, CUDA and C++ kernels for training multimodal models with PyTorch."""


def _register_kernels() -> None:
    """Make the Triton kernels importable as `mmfast.kernels` from a source checkout.

    kernels/ has no __init__.py, so with the repository root on sys.path (pytest, `python -c`, a notebook)
    it never shadows an installed top-level `kernels` (Hugging Face's, which transformers imports). A wheel
    ships it as mmfast/kernels/, found by the usual import; a checkout (editable install or not) keeps it
    beside this package, where no import finder looks for a subpackage: register it from there.
    """
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if (here / "kernels").is_dir() or not (here.parent / "kernels").is_dir():
        return
    spec = importlib.util.spec_from_loader(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(here.parent / "kernels")]
    sys.modules[spec.name] = globals()["kernels"] = importlib.util.module_from_spec(spec)


_register_kernels()

from . import nn, ops  # noqa: E402  (after the kernels are registered)
from .backends import BACKENDS, BackendUnavailable, use_backend  # noqa: E402
# mmfast.patch (the function) shadows the submodule's attribute; `from mmfast.patch import ...` still works.
# The submodule imports transformers and peft only when patch() runs.
from .patch import PatchReport, patch, unpatch  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailable", "PatchReport", "nn", "ops", "patch", "unpatch", "use_backend"]
