"""Timing and memory machinery shared by `mmfast bench` and the pytest-benchmark suites in bench/.

A benchmark is a module in this package (cross_entropy.py, linear_cross_entropy.py, lora.py,
bandwidth.py) that defines:

    VARIANTS                    names of the variants, run side by side
    BASELINES                   the variants every other one is compared with (time and memory ratios)
    LEGEND                      one line saying what each variant runs
    skip_reason(variant, device)    None when the variant can run on `device`, else why not
    shape(quick)                the problem size, a JSON-able dict
    bytes_moved(shape, dtype)   the least traffic one step needs (for GB/s)
    build(variant, shape, dtype, device) -> Workload

and, where they apply:

    flops(shape, dtype)         the floating-point operations of one step (for GFLOP/s, where matmuls bound the time)
    memory_floor(shape, dtype)  the least extra memory any implementation needs (peak memory is shown as a multiple)
    ITERATIONS, WORKER_TIMEOUT_S    in place of the harness's own, for steps too slow for them
    SHAPES                      named full-size shapes, for a benchmark measured at several: `--shape NAME`
                                runs SHAPES[NAME] in place of shape(False)
    PAIRED                      a variant every other one is also timed against step by step, in one
                                process: for a small difference on a noisy machine (see measure_paired)

and a Workload may carry `saved`, what autograd keeps for the backward (see saved_tensor_bytes).

Every variant runs in its own subprocess (`python -m mmfast.bench.worker`): peak RSS is a
per-process number, a crash or a CUDA error in one variant cannot take the others down, and no
variant inherits another's allocator caches or compiled graphs. Inside the worker, time is the median
of several steps after warmup (CUDA events on GPU), and memory is the peak of one more step above
what was allocated before it: RSS on CPU, torch.cuda.max_memory_allocated on CUDA.

What to read are ratios measured in one run, not absolute times: each variant against the
baselines, and its GB/s against the machine's copy bandwidth (bandwidth.py) measured in the same run.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCHMARKS = ("cross_entropy", "linear_cross_entropy", "lora", "attention", "train-step")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")

# (warmup, timed) steps per variant. Warmup also triggers torch.compile and the extension's load.
ITERATIONS = {False: (2, 10), True: (1, 3)}
WORKER_TIMEOUT_S = 900  # generous: torch.compile of a cold cache on 2 cores takes a minute or more

MIB = 1 << 20


@dataclasses.dataclass
class Workload:
    """One variant ready to measure: `refresh` restores fresh inputs and frees the previous step's
    outputs (not timed); `step` is the timed work (forward + backward), keeping nothing but outputs
    the inputs hold (a .grad); `saved`, where given, runs one forward and returns what autograd saved for
    its backward (saved_tensor_bytes)."""

    step: Callable[[], None]
    refresh: Callable[[], None]
    saved: Callable[[], dict] | None = None


def benchmark_module(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"name: expected one of {', '.join(BENCHMARKS)}, got {name!r}")
    return importlib.import_module(f"mmfast.bench.{name.replace('-', '_')}")  # train-step: train_step.py


# ---------------------------------------------------------------- inside the worker process


def saved_tensor_bytes(forward: Callable[[], torch.Tensor], parameters, input: torch.Tensor) -> dict:
    """The bytes of the distinct storages autograd saves for the backward of one `forward()`.

    Parameters are left out: they exist before and after the step. The input is counted apart: it
    exists anyway as the previous layer's output, but only while something holds it, and a backward
    that saves it is what holds it. So `beyond_input_bytes` leaves it out, `with_input_bytes` counts
    it when it is saved (`input_saved`). A saved view counts its whole storage: it keeps that alive.
    """
    skipped = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage  # held here, so no address is reused while counting
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    input_storage = input.untyped_storage()
    input_saved = input_storage.data_ptr() in storages
    skipped.add(input_storage.data_ptr())
    beyond = sum(s.nbytes() for address, s in storages.items() if address not in skipped)
    return {
        "beyond_input_bytes": beyond,
        "with_input_bytes": beyond + (input_storage.nbytes() if input_saved else 0),
        "input_saved": input_saved,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step_ms(workload: Workload, device: torch.device) -> float:
    workload.refresh()
    if device.type == "cuda":
        # Events on the stream exclude the refresh kernels queued before `start` and the launch gap.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        workload.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    workload.step()
    return (time.perf_counter() - begin) * 1e3


def _peak_extra_bytes(workload: Workload, device: torch.device) -> int:
    """Memory one step needs above what exists before it (inputs, and nothing left from earlier steps)."""
    workload.refresh()  # frees the previous step's outputs (the .grad)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        workload.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    workload.step()
    return (_status_kib("VmHWM") - before) * 1024


def measure(workload: Workload, device: torch.device, warmup: int, iters: int) -> dict:
    """Median time of `iters` steps after `warmup` untimed ones, then the peak memory of one step."""
    for _ in range(warmup):
        workload.refresh()
        workload.step()
    _sync(device)
    times = [_time_step_ms(workload, device) for _ in range(iters)]
    return {"times_ms": times, "peak_extra_bytes": _peak_extra_bytes(workload, device)}


def measure_paired(workload: Workload, paired: Workload, device: torch.device, warmup: int, iters: int) -> dict:
    """measure() of `workload`, with each timed step right after a step of `paired`.

    On a shared machine the speed drifts by more than the few percent a variant may differ from its
    baseline; the ratio of two adjacent steps cancels the drift, and their median is robust to outliers.
    """
    for _ in range(warmup):
        for w in (paired, workload):
            w.refresh()
            w.step()
    _sync(device)
    times, paired_times = [], []
    for _ in range(iters):
        paired_times.append(_time_step_ms(paired, device))
        times.append(_time_step_ms(workload, device))
    paired.refresh()
    ratios = [t / p for t, p in zip(times, paired_times)]
    return {"times_ms": times, "paired_times_ms": paired_times, "paired_ratio": statistics.median(ratios),
            "peak_extra_bytes": _peak_extra_bytes(workload, device)}


def worker_main(spec: dict) -> dict:
    """Build and measure one variant; any exception becomes a `failed` result with its message."""
    try:
        module = importlib.import_module(spec["module"])
        device = torch.device(spec["device"])
        dtype = DTYPES[spec["dtype"]]
        workload = module.build(spec["variant"], spec["shape"], dtype, device)
        if spec.get("paired"):
            paired = module.build(spec["paired"], spec["shape"], dtype, device)
            result = {"status": "ok", **measure_paired(workload, paired, device, spec["warmup"], spec["iters"])}
        else:
            result = {"status": "ok", **measure(workload, device, spec["warmup"], spec["iters"])}
        if workload.saved is not None:
            workload.refresh()
            result["saved"] = workload.saved()
        return result
    except Exception as exc:  # reported, not raised: the parent shows it in the table
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------- in the parent process


def _worker_env() -> dict:
    env = dict(os.environ)
    # glibc otherwise raises its mmap threshold up to 32 MiB as big blocks are freed, and then keeps
    # freed blocks in the heap, where a later step reuses them without RSS growing: peak RSS would
    # miss them. A fixed threshold makes every block over 256 KiB its own mapping, returned at free.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    # The worker must import this very checkout of mmfast, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def run_worker(spec: dict, timeout_s: float = WORKER_TIMEOUT_S) -> dict:
    """Measure one variant in a fresh interpreter; a crash or timeout is a `failed` result."""
    command = [sys.executable, "-m", "mmfast.bench.worker", json.dumps(spec)]
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=_worker_env())
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout_s} s"}
    # The worker's whole life (start-up, compilation, measurement): where a slow run's time went.
    wall = {"worker_s": round(time.perf_counter() - begin, 1)}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return {**json.loads(lines[-1]), **wall}  # the worker prints its result as the last line
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"status": "failed", "error": f"worker exited with code {done.returncode}: {tail}", **wall}


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _ratio(value, base):
    return value / base if value is not None and base else None


def run_benchmark(name: str, device: str = "cpu", dtype: str = "float32", quick: bool = False,
                  shape: str | None = None) -> dict:
    """Run every variant of benchmark `name` side by side; a JSON-able dict (see format_table).

    `shape` names one of the module's SHAPES, run in place of its default full-size shape.
    """
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    module = benchmark_module(name)
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but no CUDA device is visible")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    shapes = getattr(module, "SHAPES", {})
    if shape is not None:
        if quick:
            raise ValueError("shape: quick runs the benchmark's small shape; a named shape is a full-size one")
        if shape not in shapes:
            expected = f"one of {', '.join(shapes)}" if shapes else "none: this benchmark has one shape"
            raise ValueError(f"shape: expected {expected}, got {shape!r}")
    warmup, iters = getattr(module, "ITERATIONS", ITERATIONS)[bool(quick)]
    timeout_s = getattr(module, "WORKER_TIMEOUT_S", WORKER_TIMEOUT_S)
    if shape is None:
        shape = module.shape(quick)
        # The default shape may be one of the named ones: say which.
        shape_name = next((key for key, value in shapes.items() if value == shape), None)
    else:
        shape_name, shape = shape, shapes[shape]
    moved = module.bytes_moved(shape, DTYPES[dtype])
    flops = module.flops(shape, DTYPES[dtype]) if hasattr(module, "flops") else None
    floor = module.memory_floor(shape, DTYPES[dtype]) if hasattr(module, "memory_floor") else None

    paired_with = getattr(module, "PAIRED", None)

    def spec(mod, variant, shape):
        paired = paired_with if mod is module and variant != paired_with else None
        return {"module": mod.__name__, "variant": variant, "shape": shape, "device": device, "dtype": dtype,
                "warmup": warmup, "iters": iters, "paired": paired}

    def summarise(row, bytes_moved):
        if row["status"] == "ok":
            row["median_ms"] = statistics.median(row["times_ms"])
            row["gbps"] = bytes_moved / row["median_ms"] / 1e6
        return row

    from . import bandwidth  # imported here: it imports this module

    copy_shape = bandwidth.shape(quick)
    copy = summarise(run_worker(spec(bandwidth, "copy", copy_shape)), bandwidth.bytes_moved(copy_shape, None))

    variants = []
    for variant in module.VARIANTS:
        reason = module.skip_reason(variant, torch.device(device))
        row = {"name": variant, "status": "skipped", "reason": reason}
        if reason is None:
            row = summarise({"name": variant, **run_worker(spec(module, variant, shape), timeout_s)}, moved)
        if row["status"] == "ok":
            fraction = _ratio(row["gbps"], copy.get("gbps"))
            row["percent_of_copy"] = None if fraction is None else 100 * fraction
            if flops is not None:
                row["gflops"] = flops / row["median_ms"] / 1e6
            if floor is not None:
                row["memory_floor_ratio"] = _ratio(row["peak_extra_bytes"], floor)
        variants.append(row)

    # Ratios below 1 mean faster / smaller than the baseline.
    by_name = {row["name"]: row for row in variants}
    for row in variants:
        if row["status"] != "ok":
            continue
        row["time_ratio"], row["memory_ratio"] = {}, {}
        for base in module.BASELINES:
            other = by_name[base] if by_name[base]["status"] == "ok" else {}
            row["time_ratio"][base] = _ratio(row["median_ms"], other.get("median_ms"))
            row["memory_ratio"][base] = _ratio(row["peak_extra_bytes"], other.get("peak_extra_bytes"))
        if "saved" in row:
            row["saved_ratio"] = {}
            for base in module.BASELINES:
                other = by_name[base].get("saved", {})
                row["saved_ratio"][base] = _ratio(row["saved"]["beyond_input_bytes"], other.get("beyond_input_bytes"))

    return {
        "benchmark": name,
        "timestamp": started,
        "machine": machine(),
        "device": device,
        "dtype": dtype,
        "quick": bool(quick),
        "shape_name": shape_name,
        "shape": shape,
        "paired": paired_with,
        "bytes_moved": moved,
        "flops": flops,
        "memory_floor_bytes": floor,
        "warmup": warmup,
        "iters": iters,
        "baselines": list(module.BASELINES),
        "legend": module.LEGEND,
        "method": {
            "time": "median of the timed steps, inputs refreshed outside the timing; "
            + ("CUDA events" if device == "cuda" else "time.perf_counter"),
            "memory": "torch.cuda.max_memory_allocated minus memory_allocated before one step"
            if device == "cuda"
            else "peak RSS (VmHWM) minus RSS before one step, each variant in its own process",
            "gbps": "bytes_moved / median time",
            "gflops": "flops / median time",
            "memory_floor_ratio": "peak extra memory / memory_floor_bytes",
            "paired_ratio": "median over steps of (this variant's step time / the step of `paired` just before it), "
            "both in this variant's worker",
            "saved": "bytes of the distinct storages autograd saves for the backward in one forward "
            "(saved_tensors_hooks), parameters left out; beyond_input_bytes leaves the layer's input out too, "
            "with_input_bytes counts it where it is saved; saved_ratio compares beyond_input_bytes",
        },
        "copy_bandwidth": {"shape": copy_shape, **copy},
        "variants": variants,
    }


# ---------------------------------------------------------------- reporting


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(result: dict) -> str:
    """A plain-text table of the variants side by side, with a header saying what and where."""
    m, copy = result["machine"], result["copy_bandwidth"]
    shape = _shape_text(result)
    copy_text = f"{copy['gbps']:.1f} GB/s" if copy["status"] == "ok" else f"failed ({copy['error']})"
    # Results saved before flops and memory floors existed have neither key.
    flops, floor = result.get("flops"), result.get("memory_floor_bytes")
    lines = [
        f"{result['benchmark']}  {shape}  {result['dtype']}  on {result['device']}"
        + ("  (quick)" if result["quick"] else "")
        + f"  median of {result['iters']} after {result['warmup']} warmup",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']})"
        + (f", {m['gpu']}" if m["gpu"] else "")
        + f", torch {m['torch']}; {result['timestamp']}",
        result["legend"],
        f"copy bandwidth: {copy_text}"
        + (f"; memory floor: {floor / MIB:.1f} MiB" if floor else "")
        + "; ratios < 1 are faster / smaller than the baseline",
        "",
    ]
    baselines = result["baselines"]
    # Only benchmarks whose workloads measure it have saved bytes; a ratio to a baseline that saves
    # nothing (or failed) is no column.
    saved = any("saved" in row for row in result["variants"])
    saved_bases = [b for b in baselines
                   if any(row.get("saved_ratio", {}).get(b) is not None for row in result["variants"])]
    paired = result.get("paired")  # results saved before paired timing existed have none
    header = ["variant", "status", "median ms"]
    header += [f"time/{b}" for b in baselines] + ([f"paired time/{paired}"] if paired else [])
    header += ["peak MiB"] + [f"mem/{b}" for b in baselines] + (["mem/floor"] if floor else [])
    header += (["saved MiB", "saved w/ x MiB"] if saved else []) + [f"saved/{b}" for b in saved_bases]
    header += ["GB/s", "% copy"] + (["GFLOP/s"] if flops else []) + ["note"]
    rows = [header]
    for row in result["variants"]:
        if row["status"] != "ok":
            note = (row.get("reason") or row.get("error") or "").strip().splitlines()
            rows.append([row["name"], row["status"]] + [""] * (len(header) - 3) + (note[:1] or [""]))
            continue
        cells = [row["name"], "ok", _fmt(row["median_ms"], ".2f")]
        cells += [_fmt(row["time_ratio"][b], ".2f", "x") for b in baselines]
        cells += [_fmt(row.get("paired_ratio", 1.0 if row["name"] == paired else None), ".3f", "x")] if paired else []
        cells += [_fmt(row["peak_extra_bytes"] / MIB, ".1f")]
        cells += [_fmt(row["memory_ratio"][b], ".3f", "x") for b in baselines]
        cells += [_fmt(row["memory_floor_ratio"], ".3f", "x")] if floor else []
        if saved:
            counted = row.get("saved", {})
            cells += [_fmt(counted[key] / MIB if key in counted else None, ".2f")
                      for key in ("beyond_input_bytes", "with_input_bytes")]
        cells += [_fmt(row.get("saved_ratio", {}).get(b), ".3f", "x") for b in saved_bases]
        cells += [_fmt(row["gbps"], ".1f"), _fmt(row["percent_of_copy"], ".0f", "%")]
        cells += [_fmt(row["gflops"], ".1f")] if flops else []
        cells += [""]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        # Names left-aligned, numbers right-aligned; the free-text note goes last, unpadded.
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:-1], widths[2:])]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines)


def _shape_text(result: dict) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in result["shape"].items())
    name = result.get("shape_name")  # results saved before named shapes existed have none
    return f"{name} ({shape})" if name else shape


def save(result: dict, json_path) -> None:
    """Write `result` as JSON, and a bar chart of its ratios as a PNG beside it (same stem)."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    try:
        from matplotlib.figure import Figure  # without pyplot: no GUI backend, no global state
    except ImportError:
        print(f"mmfast bench: matplotlib is not installed; wrote {path} without the PNG chart")
        return
    rows = [r for r in result["variants"] if r["status"] == "ok"]
    series = [(f"time / {b}", "time_ratio", b) for b in result["baselines"]]
    series += [(f"peak memory / {b}", "memory_ratio", b) for b in result["baselines"]]
    series += [(f"saved / {b}", "saved_ratio", b) for b in result["baselines"]
               if any(r.get("saved_ratio", {}).get(b) is not None for r in rows)]
    if not rows or not series:
        print(f"mmfast bench: no ratios to chart; wrote {path} without the PNG chart")
        return
    fig = Figure(figsize=(9, 1.2 + 0.9 * len(rows)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(series)
    for i, (label, key, base) in enumerate(series):
        values = [r.get(key, {}).get(base) or 0.0 for r in rows]  # a missing ratio (failed baseline) draws no bar
        bars = ax.barh([y + i * height for y in range(len(rows))], values, height=height, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(rows))], [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ratio to baseline (lower is better)")
    shape = _shape_text(result)
    ax.set_title(f"{result['benchmark']} {shape} {result['dtype']} on {result['device']}: "
                 f"{result['machine']['gpu'] or result['machine']['cpu']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path.with_suffix(".png"), dpi=120)
