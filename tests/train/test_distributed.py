"""DDP through the Trainer: `torchrun --nproc_per_node 2 -m mmfast.train` on CPU (gloo) ends with the same
parameters as one process on the same global batch (16 = 2 x 8), within float tolerance.

Every step takes the whole 16-sample training set, so the sample order (which the two launches shard
differently) cannot matter; SGD keeps the update linear in the gradient (Adam's normalisation would amplify
round-off in near-zero gradients); dropout 0; best model by training loss, which falls every step.

Validation/test *losses* are not compared: with a split smaller than processes x batch, the Trainer pads the
last eval batch with repeated samples and averages the loss with them (predictions are de-duplicated, so
accuracy and F1 are exact; the loss is not). That is transformers' behaviour, documented in run.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import write_manifest

ROOT = Path(__file__).resolve().parents[2]


def _args(out, data: Path, batch: int):
    return ["--output_dir", str(out), "--data.train", str(data / "train.jsonl"),
            "--data.validation", str(data / "val.jsonl"), "--data.test", str(data / "test.jsonl"),
            "--data.image_size", "16", "--data.max_audio_seconds", "0.25", "--data.max_text_length", "8",
            "--model.dim", "16", "--model.heads", "2", "--model.kv_heads", "1", "--model.dropout", "0",
            "--method.name", "full", "--optim.optimizer", "sgd", "--optim.lr", "0.2", "--optim.schedule", "constant",
            "--optim.batch_size", str(batch), "--optim.max_steps", "3", "--optim.epochs", "3",
            "--no-kernels"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return env


def test_two_processes_match_one(tmp_path):
    data = tmp_path / "data"
    write_manifest(data, n=16, name="train.jsonl")
    write_manifest(data, n=6, seed=1, name="val.jsonl")
    write_manifest(data, n=6, seed=2, name="test.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "mmfast.train", *_args(one, data, 16)], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=170)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "mmfast.train", *_args(two, data, 8)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=170)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff < 1e-4, f"{name}: 1 process vs 2 differ by {diff}"
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert [m["steps"] for m in metrics] == [3, 3]
    # both trained, alike: the training loss of each step (gathered over both processes) fell and matches
    losses = [[e["loss"] for e in m["log_history"] if "loss" in e] for m in metrics]
    assert len(losses[0]) == 3 and losses[0][0] > losses[0][1] > losses[0][2]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert metrics[1]["test"]["accuracy"] == metrics[0]["test"]["accuracy"]
