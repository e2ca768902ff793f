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


COMPILE_LORA = textwrap.dedent(
    """
    import itertools
    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from mmfast.kernels import lora

    # The launchers run for real on meta tensors of a large shape, so their own block and flag choices are
    # what gets compiled; each launch is compiled instead, specialised as the JIT would specialise it (an
    # argument equal to 1 becomes a constant, multiples of 16 and pointers are marked divisible), since that
    # decides whether loads vectorise and pipeline.
    compiled = {}

    def compile_launch(kernel, grid, args, constexprs, options):
        signature, constants, attrs = {}, dict(constexprs), {}
        for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
            kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = attr
            elif attr:
                attrs[(index,)] = BaseBackend.parse_attr(attr)
        signature.update({name: "constexpr" for name in constexprs})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
        key = (source.hash(), tuple(sorted(options.items())))
        if key in compiled:
            return
        binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        name = (kernel.__name__, signature[kernel.arg_names[0]], constexprs)
        assert binary.asm["cubin"], name
        assert binary.metadata.shared <= 227 * 1024, (name, binary.metadata.shared)  # sm_90's opt-in limit
        # The GEMMs run on Hopper's warpgroup MMA; the memory-bound skinny products, at 32 rows, on mma.sync.
        if kernel is lora._lora_gemm_kernel and (constexprs["DOT_PRECISION"] == "tf32" or "16" in signature["a_ptr"]):
            assert "wgmma.mma_async" in binary.asm["ptx"], ("no Hopper tensor-core MMA", name)
        compiled[key] = binary

    lora._launch = compile_launch
    rows, features, out_features, rank, seed = 8192, 4096, 4096, 16, 1 << 60
    for dtype, precision in ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"),
                             (torch.float16, "highest")):
        torch.set_float32_matmul_precision(precision)  # "high": tf32 dots, other fp32 blocks

        def meta(*shape):
            return torch.empty(*shape, dtype=dtype, device="meta")

        x, weight, bias, lora_A, lora_B = (meta(rows, features), meta(out_features, features), meta(out_features),
                                           meta(rank, features), meta(out_features, rank))
        grad_out = meta(rows, out_features)
        for with_bias, dropout_p in itertools.product((False, True), (0.0, 0.1)):
            _, xa, mask = lora.lora_linear_forward(x, weight, bias if with_bias else None, lora_A, lora_B, 2.0,
                                                   dropout_p, seed)
        # Without dropout into a new grad_x; with dropout added into a given one; grad_bias alone.
        for dropout_p, grad_x in ((0.0, None), (0.1, meta(rows, features))):
            lora.lora_linear_backward(grad_out, x, weight, lora_A, lora_B, 2.0, xa, mask, dropout_p, seed, grad_x,
                                      True, True, True, True, True)
        lora.lora_linear_backward(grad_out, x, weight, lora_A, lora_B, 2.0, xa, mask, 0.0, seed, None, False, False,
                                  True, False, False)
    lora.lora_linear_mask(seed, rows, features, 0.1, "meta")
    print("compiled", len(compiled))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real in the gpu tests")
def test_lora_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", COMPILE_LORA], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


COMPILE_ATTENTION = textwrap.dedent(
    """
    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from mmfast.kernels import attention

    # The launchers run for real on meta tensors, so their own flags and GPU dot settings are what gets compiled;
    # each launch is compiled instead of run, specialised as the JIT would (see the LoRA test), once per config the
    # autotuner could time for it, or for the first of them only where ALL is False.
    compiled = {}
    ALL = True

    def compile_launch(kernel, grid, args, constexprs, options=None):
        if isinstance(kernel, Autotuner):
            fn, configs = kernel.fn, attention.candidate_configs(kernel, constexprs)
            assert configs, (kernel.fn.__name__, constexprs)
            variants = [({**constexprs, **c.kwargs}, {"num_warps": c.num_warps, "num_stages": c.num_stages})
                        for c in (configs if ALL else configs[:1])]
        else:
            fn, variants = kernel, [(constexprs, options)]
        for constexprs, options in variants:
            signature, constants, attrs = {}, dict(constexprs), {}
            for index, (name, value) in enumerate(zip(fn.arg_names, args)):
                kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
                signature[name] = kind
                if kind == "constexpr":
                    constants[name] = attr
                elif attr:
                    attrs[(index,)] = BaseBackend.parse_attr(attr)
            signature.update({name: "constexpr" for name in constexprs})
            source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
            key = (source.hash(), tuple(sorted(options.items())))
            if key in compiled:
                continue
            binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            name = (fn.__name__, signature[fn.arg_names[0]], constexprs, options)
            assert binary.asm["cubin"], name
            assert binary.metadata.shared <= 227 * 1024, (name, binary.metadata.shared)  # sm_90's opt-in limit
            # 16-bit and tf32 products run on Hopper's warpgroup MMA.
            if fn is not attention._attention_backward_preprocess_kernel and (
                    constexprs["DOT_PRECISION"] == "tf32" or "16" in signature["q_ptr"]):
                assert "wgmma.mma_async" in binary.asm["ptx"], ("no Hopper tensor-core MMA", name)
            compiled[key] = binary

    attention._launch = compile_launch
    samples, max_q, max_k = 8, 1024, 1536
    # dtype, matmul precision, head dim, (Hq, Hk), causal, gate, residual, every candidate config
    cases = [
        (torch.bfloat16, "highest", 128, (32, 8), True, True, True, True),  # training's case: all configs
        (torch.float16, "highest", 80, (16, 16), False, False, False, False),  # padded head dim, no epilogue
        (torch.bfloat16, "highest", 64, (8, 8), False, False, True, False),
        (torch.float32, "high", 32, (8, 2), True, True, False, False),  # tf32
        (torch.float32, "highest", 32, (4, 4), False, False, True, False),  # fp32 on FMA units
    ]
    for dtype, precision, head_dim, (heads_q, heads_k), causal, gated, with_residual, every in cases:
        torch.set_float32_matmul_precision(precision)
        ALL = every

        def meta(*shape, dtype=dtype):
            return torch.empty(*shape, dtype=dtype, device="meta")

        q = meta(samples * max_q, heads_q, head_dim)
        k, v = (meta(samples * max_k, heads_k, head_dim) for _ in range(2))
        cu_seqlens_q, cu_seqlens_k = (meta(samples + 1, dtype=torch.int32) for _ in range(2))
        gate = meta(heads_q, dtype=torch.float32) if gated else None
        residual = meta(*q.shape) if with_residual else None
        options = (cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, head_dim**-0.5)
        _, attn, lse = attention.cross_modal_attention_forward(q, k, v, *options, gate, residual)
        attention.cross_modal_attention_backward(meta(*q.shape), q, k, v, attn, lse, *options, gate)
    print("compiled", len(compiled))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real in the gpu tests")
def test_attention_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", COMPILE_ATTENTION], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
