"""Metrics by task, and the test-time report: sklearn classification_report, confusion matrix, curves.

    compute = metrics_fn("classification")            # Trainer(compute_metrics=compute)
    evaluate = split_evaluator("generation", bundle)  # contrastive / generation: (model, samples) -> metrics
    report = write_test_report("classification", names, predictions, label_ids, out_dir)   # writes files, returns dict
    plot_curves(trainer.state.log_history, out_dir / "curves.png", "accuracy")

Metrics (validation every epoch, test at the end):
  classification  accuracy, f1_macro, f1_weighted     (argmax of the logits)
  multilabel      f1_micro, f1_macro, subset_accuracy  (logit > 0, i.e. sigmoid > 0.5)
  regression      mse, mae, r2
  generation      token_accuracy, perplexity          (generation.generation_metrics, over the whole split)
  contrastive     retrieval_accuracy, zero_shot_accuracy (dual_encoder.contrastive_metrics, whole split)
The Trainer adds the eval loss ("eval_loss"); the split evaluators return "loss": "loss" is a metric everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["metrics_fn", "preprocess_logits", "split_evaluator", "decisions", "write_test_report",
           "write_classification_report", "plot_curves", "plot_confusion"]


def _first(predictions):
    """The logits: Trainer hands a tuple when the model returns more than logits (the first is logits)."""
    while isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return np.asarray(predictions)


def decisions(task: str, predictions) -> np.ndarray:
    """Predicted class indices (classification), multi-hot 0/1 rows (multilabel) or values (regression)."""
    logits = _first(predictions)
    if task == "classification":
        return logits.reshape(len(logits), -1).argmax(-1)
    if task == "multilabel":
        return (logits > 0).astype(np.int64)
    if task == "regression":
        return logits.reshape(len(logits), -1)[:, 0] if logits.ndim > 1 else logits
    raise ValueError(f"task: decisions are defined for classification, multilabel and regression, not {task!r}")


def split_evaluator(task: str, bundle, batch_size: int = 32):
    """For contrastive and generation: (model, samples) -> metrics over the whole split, exact, from the
    Bundle's own module (dual_encoder.contrastive_metrics: retrieval over every text of the split, zero-shot
    accuracy; generation.generation_metrics: token-weighted NLL from the model's logits, patched or not).
    The Trainer's batch-by-batch path fits neither (retrieval needs the whole split at once; a patched
    causal-LM head returns no logits with labels). None for the other tasks (the Trainer's own path)."""
    if task == "contrastive":
        from .dual_encoder import contrastive_metrics

        return lambda model, samples: contrastive_metrics(bundle, samples, batch_size=batch_size, model=model)
    if task == "generation":
        from .generation import generation_metrics

        return lambda model, samples: generation_metrics(bundle, samples, batch_size=batch_size, model=model)
    return None


def metrics_fn(task: str):
    """Trainer's compute_metrics for this task: EvalPrediction -> {metric: float}."""

    def compute(eval_prediction) -> dict:
        predictions, label_ids = eval_prediction.predictions, eval_prediction.label_ids
        from sklearn import metrics as m

        y_pred = decisions(task, predictions)
        y_true = np.asarray(label_ids)
        if task == "classification":
            y_true = y_true.reshape(-1).astype(np.int64)
            return {"accuracy": float(m.accuracy_score(y_true, y_pred)),
                    "f1_macro": float(m.f1_score(y_true, y_pred, average="macro", zero_division=0)),
                    "f1_weighted": float(m.f1_score(y_true, y_pred, average="weighted", zero_division=0))}
        if task == "multilabel":
            y_true = (y_true > 0.5).astype(np.int64)
            return {"f1_micro": float(m.f1_score(y_true, y_pred, average="micro", zero_division=0)),
                    "f1_macro": float(m.f1_score(y_true, y_pred, average="macro", zero_division=0)),
                    "subset_accuracy": float(m.accuracy_score(y_true, y_pred))}
        if task == "regression":
            y_true = y_true.reshape(-1).astype(np.float64)
            return {"mse": float(m.mean_squared_error(y_true, y_pred)),
                    "mae": float(m.mean_absolute_error(y_true, y_pred)),
                    "r2": float(m.r2_score(y_true, y_pred)) if len(y_true) > 1 else float("nan")}
        raise ValueError(f"task: {task!r} has no per-batch metrics; use split_evaluator")

    return compute


def preprocess_logits(logits, labels):
    """Trainer's preprocess_logits_for_metrics: keep the logits only (a model returning more than logits
    would otherwise have every extra output gathered over the whole split)."""
    return logits[0] if isinstance(logits, (tuple, list)) else logits


# ------------------------------------------------------------------------------------------------ test report


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(y_true, y_pred, names: list[str], path) -> None:
    from sklearn.metrics import confusion_matrix

    plt = _matplotlib()
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(names))))
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black", fontsize=8)
    ax.set_title(f"confusion matrix (test, {len(y_true)} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_multilabel_confusion(y_true, y_pred, names: list[str], path) -> None:
    from sklearn.metrics import multilabel_confusion_matrix

    plt = _matplotlib()
    matrices = multilabel_confusion_matrix(y_true, y_pred)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        ax.imshow(matrices[k], cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(matrices[k][i, j]), ha="center", va="center", fontsize=8)
        ax.set_xticks([0, 1], ["no", "yes"])
        ax.set_yticks([0, 1], ["no", "yes"])
        ax.set_title(names[k], fontsize=9)
    fig.suptitle("per-label confusion (rows true, columns predicted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_test_report(task: str, names: list[str], predictions, label_ids, out_dir, prefix: str = "") -> dict:
    """The test-set report from the Trainer's logits: see write_classification_report. Tasks without classes
    (regression) get none: {"text": None, "files": []} (their metrics are in metrics.json)."""
    if task not in ("classification", "multilabel"):
        return {"text": None, "files": []}
    y_true = np.asarray(label_ids)
    y_true = y_true.reshape(-1).astype(np.int64) if task == "classification" else (y_true > 0.5).astype(np.int64)
    return write_classification_report(names, y_true, decisions(task, predictions), out_dir, prefix)


def write_classification_report(names: list[str], y_true, y_pred, out_dir, prefix: str = "") -> dict:
    """Write {prefix}classification_report.txt and .json (sklearn's classification_report: per-class
    precision, recall, F1, support, macro and weighted averages) and {prefix}confusion_matrix.png into
    out_dir. y_true / y_pred: class indices, or multi-hot rows (multilabel: per-label confusion grid).
    Returns {"text", "dict", "files"}."""
    from sklearn.metrics import classification_report

    out = Path(out_dir)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    kwargs = dict(labels=list(range(len(names))), target_names=list(names), zero_division=0)
    text = classification_report(y_true, y_pred, digits=3, **kwargs)
    data = classification_report(y_true, y_pred, output_dict=True, **kwargs)
    files = [out / f"{prefix}classification_report.txt", out / f"{prefix}classification_report.json",
             out / f"{prefix}confusion_matrix.png"]
    files[0].write_text(text)
    files[1].write_text(json.dumps(data, indent=2))
    if y_true.ndim == 1:
        plot_confusion(y_true, y_pred, names, files[2])
    else:
        _plot_multilabel_confusion(y_true, y_pred, names, files[2])
    return {"text": text, "dict": data, "files": [str(f) for f in files]}


def plot_curves(log_history: list[dict], path, metric: str) -> None:
    """Training loss per logging step, validation loss and validation `metric` per evaluation, from
    Trainer.state.log_history; x axis in epochs."""
    plt = _matplotlib()
    train = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e and "epoch" in e]
    evals = [e for e in log_history if "eval_loss" in e and "epoch" in e]
    key = "eval_" + metric
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        left.plot(*zip(*train), label="train loss")
    if evals:
        left.plot([e["epoch"] for e in evals], [e["eval_loss"] for e in evals], marker="o", label="validation loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    left.set_title("loss")
    points = [(e["epoch"], e[key]) for e in evals if key in e]
    if metric != "loss" and points:
        right.plot(*zip(*points), marker="o", color="tab:green")
        right.set_title(f"validation {metric}")
        right.set_xlabel("epoch")
        right.set_ylabel(metric)
    else:
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
