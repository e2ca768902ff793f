"""`mmfast info | build | bench | train | predict | eval`: what runs here, ahead-of-time build, benchmarks
against baselines, and the multimodal fine-tuning job (mmfast.train)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from . import _build, backends
from .bench import BENCHMARKS, harness


def _info(args) -> int:
    if args.build and _build_command(args) != 0:
        return 1
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
    print(f"build cache {_build.cache_dir()} ({'built' if _build.built_library() else 'not built yet'})")
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


# ------------------------------------------------------------------------------------------------ train


TRAIN_USAGE = """usage: mmfast train [CONFIG.yaml] [--section.key value ...]
       (the same as: python -m mmfast.train ..., torchrun --nproc_per_node N -m mmfast.train ...,
        accelerate launch -m mmfast.train ...)

With no arguments: the demo (digits as image + text + DTMF audio, fusion classifier, LoRA, kernels on).
Options override the config file; values are YAML (numbers, true/false, null, [a, b]). Flags: --resume,
--compare-kernels, --no-kernels, --init-from MODEL_DIR. Bad input ends with one line naming the key or sample
and exit code 2 (MMFAST_TRACEBACK=1 shows the traceback). Every option and its default:
"""

# Input errors get one line and exit code 2; anything else is a bug and keeps its traceback.
# MMFAST_TRACEBACK=1 shows the traceback of input errors too.
_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _input_error(command: str, exc: BaseException) -> int:
    if os.environ.get("MMFAST_TRACEBACK") == "1":
        raise exc
    message = str(exc)
    if "\nOriginal Traceback" in message:
        # Re-raised by a DataLoader worker (data decoded during training): the worker's traceback is in the
        # message and its last line is the original error, "ValueError: sample ...".
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    message = " ".join(message.split()) or type(exc).__name__
    notes = getattr(exc, "__notes__", None) or []  # e.g. what happened to the output directory
    if notes:
        message += " (" + "; ".join(" ".join(str(n).split()) for n in notes) + ")"
    print(f"mmfast {command}: error: {message}", file=sys.stderr)
    return 2


def train_main(argv: list[str]) -> int:
    """`mmfast train` / `python -m mmfast.train`: argv after the command."""
    if any(a in ("-h", "--help") for a in argv):
        from .train.config import help_text

        print(TRAIN_USAGE + help_text())
        return 0
    config = None
    if argv and not argv[0].startswith("--"):
        config, argv = argv[0], argv[1:]
    try:
        from .train import load_config

        cfg = load_config(config, argv)
        from .train import train

        train(cfg)
    except _INPUT_ERRORS as exc:
        return _input_error("train", exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (train.Terminated): exit 128 + the signal's number
        import signal

        number = getattr(exc, "signal_number", signal.SIGINT)
        notes = "".join(f" ({' '.join(str(n).split())})" for n in getattr(exc, "__notes__", None) or [])
        # on a line of its own: the interrupt may come in the middle of a progress bar's line
        print(f"\nmmfast train: interrupted by {signal.Signals(number).name}{notes}", file=sys.stderr)
        return 128 + number
    return 0


def _predict(args) -> int:
    from .train import predict

    try:
        rows = predict(args.model_dir, args.inputs, batch_size=args.batch_size)
    except _INPUT_ERRORS as exc:
        return _input_error("predict", exc)
    for row in rows:
        print(json.dumps(row, default=float))
    return 0


def _eval(args) -> int:
    from .train import evaluate

    try:
        result = evaluate(args.model_dir, args.data, out_dir=args.out, batch_size=args.batch_size)
    except _INPUT_ERRORS as exc:
        return _input_error("eval", exc)
    if result["report"]:
        print(result["report"])
    print(json.dumps({"samples": result["samples"], **result["metrics"]}, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions and the op x backend table (at once: it never compiles)")
    info.add_argument("--build", action="store_true", help="compile the C++/CUDA extension first (cached)")
    info.add_argument("--verbose", action="store_true", help="with --build: show the compiler's commands")
    info.set_defaults(run=_info)

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

    # `train` takes free-form --section.key options, which argparse would misread (a value such as 3e-4 would
    # become the config positional): its arguments go to train_main as they are.
    commands.add_parser("train", help="fine-tune a multimodal model (no arguments: the demo); "
                        "`mmfast train --help` lists every option", add_help=False)

    predict = commands.add_parser("predict", help="run a saved model on new samples: JSON lines in, JSON lines out")
    predict.add_argument("model_dir", help="a model directory written by mmfast train (OUT/model)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="a JSONL file of samples (text, image, audio paths) or one JSON object")
    predict.add_argument("--batch-size", type=int, default=None)
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser("eval", help="re-evaluate a saved model on labelled data")
    evaluate.add_argument("model_dir")
    evaluate.add_argument("data", help="a JSONL/CSV manifest or a datasets folder (its test split if it has splits)")
    evaluate.add_argument("--out", metavar="DIR", help="also write the classification report and confusion matrix")
    evaluate.add_argument("--batch-size", type=int, default=None)
    evaluate.set_defaults(run=_eval)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
