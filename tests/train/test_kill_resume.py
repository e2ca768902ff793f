"""A real `python -m mmfast.train` killed and resumed, in one chain, ends exactly as the same run uninterrupted:

  1. SIGKILL inside a checkpoint save (the files written, not yet renamed: MMFAST_TEST_CHECKPOINT_RENAME_DELAY
     holds the save in that window), then --resume: it deletes the unfinished save and resumes from the
     previous, complete checkpoint, saying so;
  2. SIGKILL at a random moment, then --resume;
  3. SIGTERM: exit code 143, one line, run.json "interrupted", the partial run kept; then --resume to the end.

Equal means: the same test and validation metrics, log history (timings aside), best checkpoint and final model
bytes. bench/kill_resume_trials.py runs many more kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import tiny_run_args, write_manifest

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, STEPS_PER_EPOCH = 8, 3  # 18 training samples (60% of 30), batch 8; a checkpoint every epoch


def _command(out, data, *more):
    return [sys.executable, "-m", "mmfast.train",
            *tiny_run_args(out, data, "--no-kernels", "--optim.epochs", str(EPOCHS),
                           "--early_stopping.patience", str(EPOCHS), *more)]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    env.pop("MMFAST_TRACEBACK", None)
    return env


def _run(out, data, *more):
    return subprocess.run(_command(out, data, *more), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _start(out, data, *more, **env):
    return subprocess.Popen(_command(out, data, *more), cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(process, condition, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _checkpoint_steps(out) -> list[int]:
    folder = Path(f"{out}.partial") / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")) if folder.is_dir() else []


def _outcome(out):
    """What must not depend on interruptions: metrics, log history without timings, the final model."""
    metrics = json.loads((out / "metrics.json").read_text())
    timing = ("runtime", "per_second", "train_loss")  # train_loss: the Trainer averages it over this process's steps
    history = [{k: v for k, v in entry.items() if not k.endswith(timing)} for entry in metrics["log_history"]]
    model = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "model").rglob("*.safetensors"))}
    return {"test": metrics["test"], "validation": metrics["validation"], "steps": metrics["steps"],
            "best_checkpoint": metrics["best_checkpoint"], "history": history, "model": model}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=30)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(out, data)
    assert result.returncode == 0, result.stderr[-3000:]
    return _outcome(out)


def test_killed_three_times_then_resumed_equals_uninterrupted(tmp_path, data, uninterrupted):
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    staging = partial / "checkpoints" / f"tmp-checkpoint-{2 * STEPS_PER_EPOCH}"

    # 1. SIGKILL while checkpoint-6 is being saved: everything written, the rename not done
    run = _start(out, data, MMFAST_TEST_CHECKPOINT_RENAME_DELAY="60")
    written = staging / f"checkpoint-{2 * STEPS_PER_EPOCH}" / "trainer_state.json"
    _wait_for(run, written.is_file, "the second checkpoint's save")
    run.kill()
    run.communicate()
    assert _checkpoint_steps(out) == [STEPS_PER_EPOCH] and staging.is_dir()
    assert json.loads((partial / "run.json").read_text())["status"] == "running"  # SIGKILL: nothing could say more

    # 2. --resume, then SIGKILL at a random moment once it has saved a checkpoint of its own
    seed = random.randrange(10**6)
    print(f"random kill: seed {seed}")
    run = _start(out, data, "--resume")
    _wait_for(run, lambda: max(_checkpoint_steps(out)) > STEPS_PER_EPOCH, "a checkpoint of the resumed run")
    # a random moment, but before the run's last checkpoints: a fast machine finishes the run within the draw
    deadline = time.monotonic() + random.Random(seed).uniform(0, 1.5)
    while time.monotonic() < deadline and max(_checkpoint_steps(out)) < (EPOCHS - 2) * STEPS_PER_EPOCH:
        time.sleep(0.01)
    run.kill()
    stdout, _ = run.communicate()
    assert f"resume: removed {staging.name} (an unfinished save)" in stdout
    assert f"resume: from {partial / 'checkpoints' / f'checkpoint-{STEPS_PER_EPOCH}'} (step {STEPS_PER_EPOCH} of " \
           f"{EPOCHS * STEPS_PER_EPOCH}, epoch 1)" in stdout
    assert not staging.exists()

    # 3. --resume, then SIGTERM once it has saved a checkpoint of its own: handled like Ctrl-C
    before = max(_checkpoint_steps(out))
    assert before < EPOCHS * STEPS_PER_EPOCH, "the random kill came after the last checkpoint"
    run = _start(out, data, "--resume")
    _wait_for(run, lambda: max(_checkpoint_steps(out)) > before, "a checkpoint of the second resumed run")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"resume: from {partial / 'checkpoints' / f'checkpoint-{before}'}" in stdout
    lines = [line for line in stderr.splitlines() if line.startswith("mmfast ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("mmfast train: interrupted by SIGTERM (output: kept ") and "--resume" in lines[0]
    status = json.loads((partial / "run.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    assert not out.exists()

    # 4. --resume to the end
    result = _run(out, data, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and not partial.exists()
    assert _outcome(out) == uninterrupted
