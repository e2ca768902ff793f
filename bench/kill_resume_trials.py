"""Kill trials: a real `python -m mmfast.train` killed with SIGKILL at random moments, then `--resume` to the end,
compared with the same run uninterrupted (same seed).

    python bench/kill_resume_trials.py                       # 20 trials, 7 of them inside a checkpoint save
    python bench/kill_resume_trials.py --trials 4 --during-save 2 --samples 150
    python bench/kill_resume_trials.py --jobs 3               # three trials at a time

The run is the demo made small: `--samples` samples of the digits demo (image + text + audio), the fusion
model at width 16, LoRA, a checkpoint at every epoch. Two kinds of kill:
  save    SIGKILL while a checkpoint is being saved: the killed process runs with
          MMFAST_TEST_CHECKPOINT_RENAME_DELAY (the save waits between its last file and the rename); the kill
          comes at a random moment after tmp-checkpoint-N appears, before the rename. N is drawn at random.
  random  SIGKILL at a random moment after the first checkpoint exists (before it, there is nothing to resume);
          a moment that falls after the run has ended is drawn again (up to 3 attempts).
Each killed run is resumed with --resume to the end; "equal" means the same test and validation metrics, the
same evaluation history and the same final model, bit for bit. The largest difference is over the test and
validation metrics and every tensor of the final model. Results go to bench/results/kill_resume_trials.json
(with the machine) and a table is printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "kill_resume_trials.json"
SAVE_WINDOW = 2.0  # seconds the killed process's saves wait before the rename


def _command(out: Path, data: Path, epochs: int, kernels: bool, *more) -> list[str]:
    return [sys.executable, "-m", "mmfast.train", "--output_dir", str(out), "--data.path", str(data),
            "--data.image_size", "16", "--data.max_audio_seconds", "0.25", "--data.max_text_length", "12",
            "--model.dim", "16", "--model.heads", "2", "--model.kv_heads", "1", "--optim.batch_size", "16",
            "--optim.epochs", str(epochs), "--early_stopping.patience", str(epochs),
            *([] if kernels else ["--no-kernels"]), *more]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    env.pop("MMFAST_TRACEBACK", None)
    return env


def _steps(out: Path, prefix: str = "checkpoint-") -> list[int]:
    folder = Path(f"{out}.partial") / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[len(prefix):]) for p in folder.glob(prefix + "*") if p.name[len(prefix):].isdigit())


def _run_to_end(command, log: Path) -> tuple[int, float]:
    start = time.monotonic()
    with open(log, "a") as f:
        code = subprocess.run(command, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - start


def _outcome(out: Path) -> dict:
    from safetensors.torch import load_file

    metrics = json.loads((out / "metrics.json").read_text())
    timing = ("runtime", "per_second", "train_loss")  # train_loss: the Trainer averages it over this process's steps
    history = [{k: v for k, v in e.items() if not k.endswith(timing)} for e in metrics["log_history"]]
    tensors = {}
    for path in sorted((out / "model").rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            tensors[f"{path.relative_to(out).as_posix()}:{name}"] = tensor
    return {"test": metrics["test"], "validation": metrics["validation"], "steps": metrics["steps"],
            "best_checkpoint": metrics["best_checkpoint"], "history": history, "tensors": tensors}


def _compare(a: dict, b: dict) -> tuple[bool, float]:
    """(equal bit for bit, largest absolute difference over the metrics and the model's tensors)."""
    largest = 0.0
    for split in ("test", "validation"):
        for key in set(a[split]) | set(b[split]):
            x, y = a[split].get(key), b[split].get(key)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                largest = max(largest, abs(x - y))
            elif x != y:
                largest = float("inf")
    if a["tensors"].keys() != b["tensors"].keys():
        largest = float("inf")
    else:
        for name, x in a["tensors"].items():
            largest = max(largest, (x.double() - b["tensors"][name].double()).abs().max().item())
    same_tensors = a["tensors"].keys() == b["tensors"].keys() and all(
        a["tensors"][n].equal(b["tensors"][n]) for n in a["tensors"])
    equal = same_tensors and all(a[k] == b[k] for k in ("test", "validation", "steps", "best_checkpoint", "history"))
    return equal, largest


def _reference_run(out: Path, data: Path, args, log: Path) -> tuple[int, float, float]:
    """(exit code, seconds, seconds from the first checkpoint to the end) of the uninterrupted run."""
    start, first = time.monotonic(), None
    with open(log, "a") as f:
        process = subprocess.Popen(_command(out, data, args.epochs, args.kernels), cwd=ROOT, env=_env(), stdout=f,
                                   stderr=subprocess.STDOUT)
        while process.poll() is None:
            if first is None and _steps(out):
                first = time.monotonic()
            time.sleep(0.01)
    end = time.monotonic()
    return process.returncode, end - start, end - (first or start)


def _kill_run(kind: str, out: Path, data: Path, args, rng: random.Random, steps_per_epoch: int, log: Path) -> dict:
    """Start a run, SIGKILL it as `kind` says; returns what was on disk at the kill."""
    env = _env(**({"MMFAST_TEST_CHECKPOINT_RENAME_DELAY": str(SAVE_WINDOW)} if kind == "save" else {}))
    with open(log, "a") as f:
        process = subprocess.Popen(_command(out, data, args.epochs, args.kernels), cwd=ROOT, env=env, stdout=f,
                                   stderr=subprocess.STDOUT)
    # a save after the first (so that a complete checkpoint precedes it), the last one included
    target = rng.randrange(2, args.epochs + 1) * steps_per_epoch if kind == "save" else None
    try:
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            if kind == "save" and target in _steps(out, "tmp-checkpoint-"):
                time.sleep(rng.uniform(0, SAVE_WINDOW * 0.9))
                break
            if kind == "random" and _steps(out):
                time.sleep(rng.uniform(0, args.after_first_checkpoint * 0.9))
                break
            time.sleep(0.01)
        staging = sorted(p.name for p in (Path(f"{out}.partial") / "checkpoints").glob("tmp-checkpoint-*"))
        process.kill()
    finally:
        process.wait()
    if process.returncode == 0:
        return {"finished_before_kill": True}
    return {"complete_at_kill": _steps(out), "unfinished_saves_at_kill": staging}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--during-save", type=int, default=7, help="how many of the trials kill inside a save")
    parser.add_argument("--samples", type=int, default=300, help="demo samples (60%% train)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--jobs", type=int, default=1, help="trials run at the same time")
    parser.add_argument("--kernels", action="store_true", help="with mmfast's kernels (the demo's default)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--json", default=str(RESULTS), help="where to save the results")
    args = parser.parse_args()
    if not 0 <= args.during_save <= args.trials:
        parser.error(f"--during-save: expected 0..{args.trials}, got {args.during_save}")
    if args.epochs < 2:
        parser.error(f"--epochs: expected at least 2 (a kill inside a save needs a checkpoint before it), got "
                     f"{args.epochs}")
    started = time.monotonic()
    scratch = Path(args.keep or tempfile.mkdtemp(prefix="mmfast-kill-trials-"))
    scratch.mkdir(parents=True, exist_ok=True)
    from mmfast.bench.harness import machine
    from mmfast.train.demo import write_demo

    data = write_demo(scratch / "data", n=args.samples)

    reference_out = scratch / "reference"
    shutil.rmtree(reference_out, ignore_errors=True)
    code, reference_seconds, args.after_first_checkpoint = _reference_run(reference_out, data, args,
                                                                          scratch / "reference.log")
    if code != 0:
        print(f"the uninterrupted run failed (exit {code}); see {scratch / 'reference.log'}", file=sys.stderr)
        return 1
    reference = _outcome(reference_out)
    last_step = reference["steps"]
    steps_per_epoch = last_step // args.epochs
    log_history = json.loads((reference_out / "metrics.json").read_text())["log_history"]
    print(f"uninterrupted: {last_step} steps, {reference_seconds:.0f} s; test {reference['test']}")

    kinds = ["save"] * args.during_save + ["random"] * (args.trials - args.during_save)
    random.Random(args.seed).shuffle(kinds)

    def trial(i: int) -> dict:
        rng = random.Random(f"{args.seed}-{i}")  # its own draws, whatever order the trials run in
        kind, out = kinds[i], scratch / f"trial-{i}"
        for attempt in range(1, 4):  # a random moment drawn after the run's end is drawn again
            for stale in (out, Path(f"{out}.partial")):
                shutil.rmtree(stale, ignore_errors=True)
            at_kill = _kill_run(kind, out, data, args, rng, steps_per_epoch, scratch / f"trial-{i}.log")
            if not at_kill.get("finished_before_kill"):
                break
        result = {"trial": i, "kind": kind, "attempts": attempt, **at_kill}
        if not at_kill.get("finished_before_kill"):
            resume_log = scratch / f"trial-{i}-resume.log"
            code, seconds = _run_to_end(_command(out, data, args.epochs, args.kernels, "--resume"), resume_log)
            resumed = [line for line in resume_log.read_text().splitlines() if line.startswith("resume: ")]
            result.update(resume_exit=code, resume_said=resumed, resume_seconds=round(seconds, 1))
        if (out / "metrics.json").is_file():
            equal, largest = _compare(_outcome(out), reference)
            result.update(equal=equal, largest_difference=largest)
        else:
            result.update(equal=False, largest_difference=float("inf"))
        print(f"trial {i:2d} {kind:6s} complete at kill {result.get('complete_at_kill')}, unfinished "
              f"{result.get('unfinished_saves_at_kill')} -> {'; '.join(result.get('resume_said', []))} -> "
              f"{'EQUAL' if result['equal'] else 'DIFFERENT'} (largest difference {result['largest_difference']:.3g})",
              flush=True)
        if result["equal"]:
            shutil.rmtree(out, ignore_errors=True)
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        trials = list(pool.map(trial, range(len(kinds))))

    killed_in_save = sum(1 for t in trials if t.get("unfinished_saves_at_kill"))  # random kills land there too
    killed = [t for t in trials if not t.get("finished_before_kill")]
    summary = {"trials": len(trials), "killed": len(killed), "killed_and_equal": sum(t["equal"] for t in killed),
               "killed_inside_a_save": killed_in_save,
               "largest_difference": max(t["largest_difference"] for t in trials),
               "wall_seconds": round(time.monotonic() - started, 1),
               "uninterrupted_seconds": round(reference_seconds, 1), "steps": last_step,
               "samples": args.samples, "epochs": args.epochs, "kernels": args.kernels, "seed": args.seed,
               "jobs": args.jobs,
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(json.dumps(summary, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"summary": summary, "machine": machine(), "trials": trials,
                                           "log_history_uninterrupted": log_history}, indent=2, default=str) + "\n")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if summary["killed_and_equal"] == summary["killed"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
