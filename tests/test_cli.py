"""`mmfast info | build | bench` as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

from mmfast import backends, bench, cli
from mmfast.bench import BENCHMARKS


def test_info_prints_versions_and_the_whole_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "build cache" in out
    rows = {tuple(line.split()[:2]) for line in out.splitlines() if line.strip()}
    for op in backends.OPS:
        for backend in backends.BACKENDS:
            assert (op, backend) in rows, (op, backend)


def test_info_on_an_empty_cache_never_compiles(tmp_path):
    # A compiler wrapper that logs every call but the `--version` the cache key asks for.
    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\n[ "$*" = "--version" ] || echo "$*" >> "$COMPILER_LOG"\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    cache, log = tmp_path / "cache", tmp_path / "compiler.log"
    env = {**os.environ, "MMFAST_CACHE": str(cache), "CXX": str(compiler), "COMPILER_LOG": str(log)}
    run = subprocess.run([sys.executable, "-m", "mmfast.cli", "info"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert not log.exists(), log.read_text()
    assert not list(tmp_path.rglob("*.so"))
    assert "(not built yet)" in run.stdout
    rows = {tuple(line.split()[:2]): line for line in run.stdout.splitlines() if line.strip()}
    for op in backends.OPS:
        for backend in backends.BACKENDS:
            assert (op, backend) in rows, (op, backend)
        assert "not built yet: `mmfast build` (or first use) compiles it" in rows[(op, "cpu")]


def test_build_says_what_it_built_and_how_long_it_took(capsys):
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert "built " in out and "backends: " in out and "cpu" in out.split("backends: ")[1] and " s" in out


def test_info_build_builds_then_prints_the_table(capsys):
    assert cli.main(["info", "--build"]) == 0
    out = capsys.readouterr().out
    assert "built " in out and "(built)" in out
    rows = {tuple(line.split()[:2]): line.split()[2] for line in out.splitlines() if len(line.split()) > 2}
    assert all(rows[(op, "cpu")] == "yes" for op in backends.OPS)


def test_bench_quick_prints_the_side_by_side_table_and_saves_json(tmp_path):
    path = tmp_path / "ce.json"
    run = subprocess.run(
        [sys.executable, "-m", "mmfast.cli", "bench", "cross_entropy", "--quick", "--json", str(path)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    for variant in ("eager", "compile", "mmfast-cpu"):
        assert variant in run.stdout
    result = json.loads(path.read_text())
    assert result["device"] == "cpu"


@pytest.mark.parametrize("op", BENCHMARKS)
def test_bench_accepts_every_benchmark(op, monkeypatch, capsys):
    # Only the command line is under test here: a real run of the larger benchmarks takes minutes.
    monkeypatch.setattr(bench, "run_benchmark", lambda name, **options: {"benchmark": name, **options})
    monkeypatch.setattr(bench, "format_table", lambda result: f"table of {result['benchmark']}")
    assert cli.main(["bench", op, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == f"table of {op}\n"


def test_bench_passes_a_named_shape_on(monkeypatch, capsys):
    seen = {}

    def run_benchmark(name, **options):
        seen.update(options)
        return {"benchmark": name}

    monkeypatch.setattr(bench, "run_benchmark", run_benchmark)
    monkeypatch.setattr(bench, "format_table", lambda result: "table")
    assert cli.main(["bench", "lora", "--device", "cpu", "--shape", "tall-dropout"]) == 0
    assert seen["shape"] == "tall-dropout" and not seen["quick"]
    assert cli.main(["bench", "lora", "--device", "cpu"]) == 0
    assert seen["shape"] is None


@pytest.mark.parametrize("argv, expected", [
    (["lora", "--shape", "huge"], "square, square-dropout, tall-dropout"),
    (["cross_entropy", "--shape", "square"], "this benchmark has one shape"),
    (["lora", "--quick", "--shape", "square"], "quick runs the benchmark's small shape"),
])
def test_bench_refuses_a_shape_the_benchmark_does_not_name(argv, expected, capsys):
    # Refused before any worker starts: these calls run the real run_benchmark.
    assert cli.main(["bench", *argv, "--device", "cpu"]) == 2
    assert expected in capsys.readouterr().err


def test_bench_help_lists_the_named_shapes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "lora: square, square-dropout, tall-dropout" in " ".join(capsys.readouterr().out.split())


def test_unknown_op_is_refused():
    with pytest.raises(SystemExit):
        cli.main(["bench", "softmax"])


def test_an_input_error_raised_in_a_dataloader_worker_is_its_own_one_line(capsys):
    from torch._utils import ExceptionWrapper

    try:
        raise ValueError("sample 'a7': image data/a7.png: cannot decode it (truncated)")
    except ValueError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ValueError, match="Original Traceback") as caught:
        wrapped.reraise()  # what torch's DataLoader raises in the main process
    assert cli._input_error("train", caught.value) == 2
    assert capsys.readouterr().err == "mmfast train: error: sample 'a7': image data/a7.png: cannot decode it (truncated)\n"
