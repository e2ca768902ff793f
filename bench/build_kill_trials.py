"""Killed-build trials of the extension build cache: does any kill leave something a later process hangs on?

Each trial starts from an empty cache: two processes build the tiny extension of tests/test_build.py at once,
one of them is killed (SIGKILL or SIGTERM) at a random moment (in half the trials the one compiling, during its
compile or before its move), the other must finish, and then a fresh process must load the extension. A process that does not finish within --timeout seconds counts as a hang. Then a few
concurrent trials: two processes started at once must compile once.

    python bench/build_kill_trials.py --trials 20 [--json bench/results/build_kill_trials.json]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_build import TinyBuilds  # noqa: E402  (the tiny extension and its build process)


def _finished(process: subprocess.Popen, timeout: float) -> str:
    """'ok', 'hang' or 'failed (...)' for a build process that was not killed."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang"
    if process.returncode != 0 or "tag A" not in process.out.read_text():
        return f"failed ({process.returncode}): {process.err.read_text().strip()[-300:]}"
    return "ok"


def _stage(builds: TinyBuilds, victim: subprocess.Popen) -> str:
    """Where the killed process was: judged from the compile log and the cache."""
    if "tag A" in victim.out.read_text():
        return "done"
    if "mmfast: waiting" in victim.err.read_text():
        return "waiting for the lock"
    if builds.compiles() and not builds.build_folders():
        return "compiling or before the move"
    return "starting" if not builds.cache.exists() else "holding the lock, before compiling or done by the other"


def kill_trial(root: Path, rng: random.Random, window: float, timeout: float) -> dict:
    builds = TinyBuilds(root)
    source = builds.checkout("A")
    try:
        processes = [builds.start(source, compile_delay=2) for _ in range(2)]
        kill_signal = rng.choice([signal.SIGKILL, signal.SIGTERM])
        # Half the trials kill the compiling process (the lock holder) at a random moment of its compile and
        # move; the other half either process at a random moment from the start.
        if rng.random() < 0.5:
            moment = "from the compile's start"
            start = time.monotonic()
            while not builds.compiles() and time.monotonic() - start < timeout:
                time.sleep(0.05)
            holder = int(next(builds.cache.glob("*.lock")).read_text().split()[1].rstrip(","))
            victim, survivor = sorted(processes, key=lambda p: p.pid != holder)
            kill_at = rng.uniform(0, 4)  # the compile is held back 2 s, then takes about 2 s more
        else:
            moment = "from the processes' start"
            victim, survivor = rng.sample(processes, 2)
            kill_at = rng.uniform(0, window)
        time.sleep(kill_at)
        stage = _stage(builds, victim)
        victim.send_signal(kill_signal)
        victim.wait(timeout=timeout)
        survivor_result = _finished(survivor, timeout)
        start = time.monotonic()
        fresh_result = _finished(builds.start(source), timeout)
        return {"signal": kill_signal.name, "kill_at_s": round(kill_at, 2), "counted": moment, "victim_stage": stage,
                "survivor": survivor_result, "fresh_process": fresh_result,
                "fresh_process_s": round(time.monotonic() - start, 1), "compiles": builds.compiles(),
                "temp_folders_left": len(builds.temp_folders())}
    finally:
        builds.kill_all()


def concurrent_trial(root: Path, timeout: float) -> dict:
    builds = TinyBuilds(root)
    source = builds.checkout("A")
    try:
        processes = [builds.start(source, compile_delay=2) for _ in range(2)]
        results = [_finished(p, timeout) for p in processes]
        return {"results": results, "compiles": builds.compiles()}
    finally:
        builds.kill_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--concurrent-trials", type=int, default=3)
    parser.add_argument("--window", type=float, default=15.0,
                        help="kill moments are drawn from [0, window] s after the start (covers import, lock, compile)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds after which a process counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kills, concurrent = [], []
    with tempfile.TemporaryDirectory(prefix="mmfast-kill-trials-") as tmp:
        for i in range(args.trials):
            kills.append(kill_trial(Path(tmp) / f"kill-{i}", rng, args.window, args.timeout))
            print(f"kill trial {i + 1}/{args.trials}: {json.dumps(kills[-1])}", flush=True)
        for i in range(args.concurrent_trials):
            concurrent.append(concurrent_trial(Path(tmp) / f"concurrent-{i}", args.timeout))
            print(f"concurrent trial {i + 1}/{args.concurrent_trials}: {json.dumps(concurrent[-1])}", flush=True)
    hangs = sum(r[k] == "hang" for r in kills for k in ("survivor", "fresh_process"))
    failures = sum(r[k] not in ("ok", "hang") for r in kills for k in ("survivor", "fresh_process"))
    stages = {}
    for r in kills:
        stages[r["victim_stage"]] = stages.get(r["victim_stage"], 0) + 1
    summary = {"kill_trials": len(kills), "hangs": hangs, "failures": failures, "victim_stages": stages,
               "temp_folders_left": sum(r["temp_folders_left"] for r in kills),
               "concurrent_trials": len(concurrent),
               "concurrent_compiled_once": sum(r["compiles"] == 1 and r["results"] == ["ok", "ok"] for r in concurrent)}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "kill_trials": kills, "concurrent_trials": concurrent},
                                        indent=1))
    return 0 if hangs == failures == 0 and summary["concurrent_compiled_once"] == len(concurrent) else 1


if __name__ == "__main__":
    sys.exit(main())
