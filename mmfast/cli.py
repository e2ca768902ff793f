"""`mmfast info | build | bench`: what runs here, ahead-of-time build, benchmarks against baselines."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import _build, backends
from .bench import BENCHMARKS, harness


def _info(args) -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"mmfast      {__import__('mmfast').__version__}")
    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'}, CPU {torch.backends.cpu.get_cpu_capability()})")
    print(f"triton      {triton_version}")
    print(f"GPU         {gpu}")
    print(f"build cache {_build.cache_dir()}")
    print()
    rows = backends.table()
    widths = [max(len(str(r[k])) for r in rows + [{"op": "op", "backend": "backend", "cpu": "CPU tensors"}]) for k in ("op", "backend", "cpu")]
    header = ("op", "backend", "CPU tensors", "CUDA tensors")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths + [0])).rstrip())
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(("op", "backend", "cpu", "cuda"), widths + [0])).rstrip())
    return 0


def _build_command(args) -> int:
    start = time.perf_counter()
    try:
        module = _build.build(verbose=args.verbose)
    except Exception as exc:
        print(f"mmfast: build failed: {exc}", file=sys.stderr)
        return 1
    parts = [name for name in backends.BACKENDS if hasattr(module, name)]
    print(f"built {module.__file__}")
    print(f"backends: {', '.join(parts)}; sources: {len(_build.sources())} files; {time.perf_counter() - start:.1f} s")
    return 0


def _bench(args) -> int:
    from .bench import format_table, run_benchmark, save

    try:
        result = run_benchmark(args.op, device=args.device, dtype=args.dtype, quick=args.quick, shape=args.shape)
    except ValueError as exc:  # a bad combination of options, refused before anything runs
        print(f"mmfast bench: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        save(result, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="versions and the op x backend table").set_defaults(run=_info)

    build = commands.add_parser("build", help="compile the C++/CUDA extension now (it is cached)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    build.set_defaults(run=_build_command)

    bench = commands.add_parser("bench", help="time and memory of an op against its baselines, in one run")
    bench.add_argument("op", choices=BENCHMARKS)  # the ops that have a benchmark module
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    named = {op: list(getattr(harness.benchmark_module(op), "SHAPES", ())) for op in BENCHMARKS}
    bench.add_argument("--shape", metavar="NAME", help="one of the benchmark's named full-size shapes, in place of "
                       "its default: " + "; ".join(f"{op}: {', '.join(names)}" for op, names in named.items() if names))
    bench.add_argument("--json", metavar="PATH", help="save the results as JSON, with a PNG chart beside it")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
