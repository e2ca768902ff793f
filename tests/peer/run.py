"""Peers' own test suites, plain and with mmfast applied, compared test by test.

    python tests/peer/run.py [--out DIR] [--work DIR] [--suite peft|transformers|all]

PEFT: the LoRA tests of the sdist of the installed PEFT version (`pip download --no-binary :all:`), run twice:
plain, and with every PEFT LoRA Linear layer the tests build running on mmfast's fused op (peer_patch_peft.py).
Each run records every test's outcome (peer_record.py); the patched run also counts, per test, the calls of
the fused op and the calls that fell back to PEFT's forward.

transformers: its common model tests (tests/test_modeling_common.py with tests/models/<family>/...) are looked
for in the sdist of the installed version; where they are missing, that is said loudly and recorded.

Prints a table, writes summary.json and each run's per-test records and log under --out (default $OUT, else a
new temporary folder), and exits 1 when a test fails only patched, when a test of the plain run is missing from
the patched one, when no patched test called the fused op, or when a run did not get through (pytest's usage
or internal errors, no test run).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent

# PEFT's `test` extra names more (docs tooling, torchvision, sentencepiece, ...); the LoRA subset imports these:
# tests/testing_common.py imports diffusers at its top, and parameterized, datasets, scipy come with the rest.
PEFT_TEST_DEPENDENCIES = {"diffusers": "diffusers", "parameterized": "parameterized", "datasets": "datasets",
                          "scipy": "scipy", "sklearn": "scikit-learn", "accelerate": "accelerate", "yaml": "pyyaml"}

# The LoRA subset of PEFT's tests/test_custom_models.py is chosen by peer_select_peft.py (which says why).
PEFT_FILES = ["tests/test_custom_models.py"]

TRANSFORMERS_FAMILIES = ["llava", "idefics3", "mllama", "blip_2", "clip", "siglip", "llama"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                        help="folder for summary.json and the per-test records (default $OUT, else a new "
                             "temporary folder)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the downloaded sdists (default: a temporary folder, removed after)")
    parser.add_argument("--suite", choices=["peft", "transformers", "all"], default="all")
    args = parser.parse_args(argv)
    args.out = Path(args.out or tempfile.mkdtemp(prefix="mmfast-peer-results-"))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="mmfast-peer-") as work:
            summary = run_suites(args.suite, Path(work), args.out)
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        summary = run_suites(args.suite, args.work, args.out)
    summary["wall_s"] = round(time.monotonic() - start, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    problems = print_summary(summary)
    print(f"\npeer suites: {summary['wall_s']:.0f} s; summary in {args.out / 'summary.json'}")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


def run_suites(suite: str, work: Path, out: Path) -> dict:
    summary = {"python": sys.version.split()[0], "suites": {}}
    if suite in ("peft", "all"):
        summary["suites"]["peft"] = run_peft(work, out)
    if suite in ("transformers", "all"):
        summary["suites"]["transformers"] = check_transformers(work)
    return summary


# ----------------------------------------------------------------------------------------------------- PEFT


def run_peft(work: Path, out: Path) -> dict:
    version = importlib.metadata.version("peft")
    source = fetch_sdist("peft", version, work)
    tests = source / "tests"
    if not (tests / "test_custom_models.py").is_file():
        raise SystemExit(f"the peft {version} sdist has no tests/test_custom_models.py: nothing to run")
    # The sdist leaves out tests/__init__.py, and the tests import their helpers relatively.
    (tests / "__init__.py").touch()
    install_missing(PEFT_TEST_DEPENDENCIES)
    print("== mmfast extension build (once, before the timed runs)", flush=True)
    subprocess.run([sys.executable, "-m", "mmfast.cli", "build"], check=False)

    runs = {}
    for name, plugins in (("plain", ["peer_select_peft", "peer_record"]),
                          ("patched", ["peer_select_peft", "peer_record", "peer_patch_peft"])):
        record = out / f"peft-{name}.jsonl"
        command = [sys.executable, "-m", "pytest", *PEFT_FILES,
                   *[arg for plugin in plugins for arg in ("-p", plugin)],
                   # PEFT's addopts ask for pytest-cov; its filterwarnings (errors on transformers'
                   # deprecations) stay.
                   "-o", "addopts=", "-p", "no:cacheprovider", "-q", "--tb=short", "-rfE"]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "MMFAST_PEER_RECORD": str(record),
                            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        print(f"== PEFT {version}, {name}: pytest {' '.join(command[3:])}", flush=True)
        started = time.monotonic()
        result = subprocess.run(command, cwd=source, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        (out / f"peft-{name}.log").write_text(result.stdout)
        print("\n".join(result.stdout.rstrip().splitlines()[-15:]), flush=True)
        runs[name] = read_record(record) | {"wall_s": round(time.monotonic() - started, 1),
                                            "pytest_exit": result.returncode}
    return {"version": version, "files": PEFT_FILES, "selection": "tests/peer/peer_select_peft.py"} | compare(runs)


def read_record(path: Path) -> dict:
    tests, deselected = {}, 0
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "deselected" in entry:
                deselected += entry["deselected"]
            else:
                tests[entry.pop("test")] = entry
    return {"tests": tests, "deselected": deselected}


def compare(runs: dict) -> dict:
    plain, patched = runs["plain"]["tests"], runs["patched"]["tests"]
    bad = {"failed", "error", "collection error"}
    result = {}
    for name, run in runs.items():
        tests = run.pop("tests")
        counts = Counter(entry["outcome"] for entry in tests.values())
        run["counts"] = dict(sorted(counts.items()))
        run["tests"] = len(tests)
        run["tests_with_fused_calls"] = sum(entry["fused_calls"] > 0 for entry in tests.values())
        run["fused_calls"] = sum(entry["fused_calls"] for entry in tests.values())
        run["tests_with_fallbacks"] = sum(entry["fallbacks"] > 0 for entry in tests.values())
        run["failing"] = sorted(test for test, entry in tests.items() if entry["outcome"] in bad)
        result[name] = run
    result["patched_only_failures"] = sorted(test for test, entry in patched.items()
                                             if entry["outcome"] in bad and plain.get(test, {}).get("outcome")
                                             not in bad)
    result["plain_only_failures"] = sorted(test for test, entry in plain.items()
                                           if entry["outcome"] in bad and patched.get(test, {}).get("outcome")
                                           not in bad)
    result["missing_from_patched"] = sorted(plain.keys() - patched.keys())
    passed_fused = [test for test, entry in patched.items() if entry["outcome"] == "passed" and entry["fused_calls"]]
    result["patched_passed_with_fused_calls"] = len(passed_fused)
    return result


# ------------------------------------------------------------------------------------------------ transformers


def check_transformers(work: Path) -> dict:
    """Whether the transformers sdist carries its common model tests for the families mmfast.patch claims."""
    version = importlib.metadata.version("transformers")
    source = fetch_sdist("transformers", version, work)
    needed = ["tests/test_modeling_common.py",
              # test_modeling_common.py imports these two
              "tests/generation/test_utils.py", "tests/exporters/test_export.py",
              *[f"tests/models/{family}/test_modeling_{family}.py" for family in TRANSFORMERS_FAMILIES]]
    missing = [path for path in needed if not (source / path).is_file()]
    shipped = sorted(str(path.relative_to(source)) for path in (source / "tests").rglob("*.py")) \
        if (source / "tests").is_dir() else []
    if not missing:
        # Not reached with the transformers releases this was written against (5.17 to 5.25): their sdists
        # carry only tests/*.py. A release that ships tests/models/ needs the "mmfast"-attention run built here.
        return {"version": version, "status": "NOT RUN: the sdist now ships the common model tests; running them "
                                              "with attention on \"mmfast\" is not implemented yet",
                "missing": [], "shipped_test_files": len(shipped)}
    status = (f"NOT RUN: the transformers {version} sdist on PyPI does not ship its model tests: "
              f"{len(missing)} of the {len(needed)} files they need are missing "
              f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); it ships only "
              f"{len(shipped)} files under tests/, and no other PyPI package carries them")
    banner = "!" * 100
    print(f"\n{banner}\n!! transformers common model tests: {status}\n{banner}\n", flush=True)
    return {"version": version, "status": status, "missing": missing, "shipped_test_files": shipped}


# -------------------------------------------------------------------------------------------------- helpers


def fetch_sdist(project: str, version: str, work: Path) -> Path:
    """The unpacked sdist of project==version, downloaded into `work` with pip (once per work folder)."""
    source = work / f"{project}-{version}"
    if source.is_dir():
        return source
    print(f"== pip download --no-binary :all: {project}=={version}", flush=True)
    base = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(work),
            f"{project}=={version}"]
    # Without build isolation pip reads the sdist's metadata with the setuptools already here: seconds, not a
    # fresh build environment; with it where that fails.
    if subprocess.run([*base, "--no-build-isolation", "-q"]).returncode != 0:
        subprocess.run([*base, "-q"], check=True)
    archives = [path for path in work.glob(f"{project}-{version}.tar.gz")]
    if not archives:
        raise SystemExit(f"pip download left no {project}-{version}.tar.gz in {work}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(work, filter="data")
    return source


def install_missing(modules: dict[str, str]) -> None:
    missing = [requirement for module, requirement in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"== pip install {' '.join(missing)} (the peer suite's test dependencies)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def print_summary(summary: dict) -> list[str]:
    """Prints the table; returns the problems that fail the stage."""
    problems = []
    columns = ["passed", "failed", "error", "skipped", "hub", "deselected", "fused tests", "fused calls",
               "fallback tests", "wall s"]
    print("\n" + f"{'suite':<14}{'run':<9}" + "".join(f"{c:>15}" for c in columns))
    for suite, result in summary["suites"].items():
        if "status" in result:
            print(f"{suite:<14}{result['status']}")
            continue
        for run in ("plain", "patched"):
            data = result[run]
            cells = [*(data["counts"].get(key, 0) for key in ("passed", "failed", "error", "skipped", "hub")),
                     data["deselected"], data["tests_with_fused_calls"], data["fused_calls"],
                     data["tests_with_fallbacks"], data["wall_s"]]
            print(f"{suite:<14}{run:<9}" + "".join(f"{cell:>15}" for cell in cells))
        print(f"{suite:<14}patched tests that passed with fused calls: {result['patched_passed_with_fused_calls']}"
              f" of {result['patched']['tests']}; patched-only failures: {len(result['patched_only_failures'])};"
              f" plain-only failures: {len(result['plain_only_failures'])}")
        for test in result["patched_only_failures"]:
            problems.append(f"{suite}: fails only patched: {test}")
        for test in result["missing_from_patched"]:
            problems.append(f"{suite}: ran plain but not patched: {test}")
        for run in ("plain", "patched"):
            if result[run]["pytest_exit"] not in (0, 1) or result[run]["tests"] == 0:
                problems.append(f"{suite}: the {run} run ended with pytest exit code {result[run]['pytest_exit']} "
                                f"after {result[run]['tests']} tests (see {suite}-{run}.log)")
        if result["patched"]["tests_with_fused_calls"] == 0:
            problems.append(f"{suite}: no patched test called mmfast's fused op")
    return problems


if __name__ == "__main__":
    sys.exit(main())
