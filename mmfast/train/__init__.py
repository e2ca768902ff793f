"""mmfast.train: multimodal fine-tuning on transformers.Trainer (`mmfast train`, `python -m mmfast.train`).

    from mmfast.train import TrainConfig, load_config, train, evaluate, predict
    result = train(load_config("run.yaml", ["--optim.lr", "1e-3"]))   # -> RunResult (metrics, paths)
    metrics = evaluate("runs/demo/model", "data/test.jsonl")
    predictions = predict("runs/demo/model", [{"id": "a", "text": "seven"}])

The config module is light (dataclasses + YAML); train/evaluate/predict import torch, transformers and the
model builders on first use, so `from mmfast.train import TrainConfig` stays fast.
"""

from __future__ import annotations

from .config import ConfigError, TrainConfig, load_config, save_config

__all__ = ["ConfigError", "RunResult", "TrainConfig", "evaluate", "load_config", "predict", "save_config", "train"]


def __getattr__(name):
    if name in ("train", "evaluate", "predict", "RunResult"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'mmfast.train' has no attribute {name!r}")
