"""Without a GPU the Triton kernels run in the interpreter, which accepts code the compiler rejects.
So also compile each kernel for the GPUs we target (sm_90) down to a cubin: no GPU is needed for that."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

COMPILE_CROSS_ENTROPY = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mmfast.kernels import cross_entropy as ce

    common = {"vocab": "i32", "ignore_index": "i64", "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32",
              "HAS_SOFTCAP": "constexpr", "BLOCK_V": "constexpr"}
    for dtype, softcap, smoothing in itertools.product(("fp32", "bf16", "fp16"), (False, True), (False, True)):
        forward = {"logits_ptr": f"*{dtype}", "logits_row_stride": "i64", "target_ptr": "*i64", "loss_ptr": "*fp32",
                   "lse_ptr": "*fp32", **common, "HAS_SMOOTHING": "constexpr"}
        backward = {"logits_ptr": f"*{dtype}", "logits_row_stride": "i64", "grad_ptr": f"*{dtype}",
                    "grad_row_stride": "i64", "target_ptr": "*i64", "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32", **common}
        for fn, signature in ((ce._cross_entropy_forward_kernel, forward), (ce._cross_entropy_backward_kernel, backward)):
            constexprs = {"HAS_SOFTCAP": softcap, "BLOCK_V": 8192}
            if "HAS_SMOOTHING" in signature:
                constexprs["HAS_SMOOTHING"] = smoothing
            source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
            assert kernel.asm["cubin"], (fn.__name__, dtype)
    print("compiled")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real in the gpu tests")
def test_cross_entropy_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", COMPILE_CROSS_ENTROPY], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
