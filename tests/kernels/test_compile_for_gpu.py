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


COMPILE_LINEAR_CROSS_ENTROPY = textwrap.dedent(
    """
    import itertools
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mmfast.kernels import linear_cross_entropy as lce

    # The shapes only pick the block sizes; the launcher's own GPU choice is what gets compiled.
    rows, vocab, hidden_dim = 8192, 128256, 4096
    gpu = torch.device("cuda")
    scalars = {"rows_total": "i32", "vocab": "i32", "hidden_dim": "i32", "label_smoothing": "fp32", "z_loss": "fp32",
               "softcap": "fp32"}
    forward_flags = ("HAS_BIAS", "HAS_SOFTCAP", "HAS_SMOOTHING", "RETURN_ARGMAX")
    backward_flags = ("HAS_BIAS", "HAS_SOFTCAP", "NEED_GRAD_HIDDEN", "NEED_GRAD_WEIGHT", "NEED_GRAD_BIAS")
    # Every flag on; grad_hidden alone; grad_weight alone, softcapped, without bias.
    backward_variants = ((True,) * 5, (False, False, True, False, False), (False, True, False, True, False))
    for torch_dtype, dtype in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        dot_configs = [lce._dot_config(torch_dtype, gpu)]
        if torch_dtype == torch.float32:  # torch.set_float32_matmul_precision("high") gives tf32 dots
            dot_configs.append((tl.float32, "tf32"))
        forward = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "target_ptr": "*i64",
                   "loss_ptr": "*fp32", "lse_ptr": "*fp32", "argmax_ptr": "*i64", **scalars}
        backward = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
                    "target_ptr": "*i64", "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32", "grad_hidden_ptr": "*fp32",
                    "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32", **scalars}
        jobs = [(lce._linear_cross_entropy_forward_kernel, forward, forward_flags, (on,) * 4, False)
                for on in (False, True)]
        jobs += [(lce._linear_cross_entropy_backward_kernel, backward, backward_flags, flags, True)
                 for flags in backward_variants]
        for (fn, signature, names, flags, is_backward), (dot_dtype, precision) in itertools.product(jobs, dot_configs):
            block_n, block_v, block_h, warps, stages = lce._blocks(rows, vocab, hidden_dim, torch_dtype, gpu,
                                                                   is_backward)
            constexprs = {**dict(zip(names, flags)), "DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision,
                          "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h}
            source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                               constexprs=constexprs)
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps, "num_stages": stages})
            assert kernel.asm["cubin"], (fn.__name__, dtype, flags, precision)
    print("compiled")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real in the gpu tests")
def test_linear_cross_entropy_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", COMPILE_LINEAR_CROSS_ENTROPY], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
