"""Benchmark harness shared by `mmfast bench` and the pytest-benchmark suites in bench/.

    result = run_benchmark("cross_entropy", device="cpu", dtype="float32", quick=False)
    print(format_table(result))
    save(result, "bench/results/cross_entropy-cpu-float32.json")  # + a .png chart beside it

See harness.py for how time and memory are measured.
"""

from .harness import BENCHMARKS, format_table, run_benchmark, save

__all__ = ["BENCHMARKS", "format_table", "run_benchmark", "save"]
