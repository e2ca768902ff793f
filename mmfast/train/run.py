"""train / evaluate / predict end to end, and the output directory's life cycle.

    result = train(cfg)                         # -> RunResult; prints progress, the report and a summary
    metrics = evaluate("runs/demo/model", "data/new.jsonl")
    rows = predict("runs/demo/model", ["inputs.jsonl", {"id": "x", "text": "seven"}])  # [{"id", "prediction"}]

train(cfg): seed; data.load_splits; bundle.build_bundle (or bundle.load_bundle(cfg.init_from) to re-fine-tune a
saved model on new data, with its label set); methods.apply_method (prints the trainable parameters);
mmfast.patch(model) when cfg.kernels; MultimodalTrainer on the train split (augment.AugmentedDataset) with
validation every epoch, early stopping and the best model reloaded at the end; the test split; the best model
saved with Bundle.save; reports and plots; a summary.

Output directory (cfg.output_dir = OUT):
  the run writes into OUT.partial/ (run.json {"status": "running"}); at the end OUT.partial is renamed to OUT
  (a finished run it replaces is removed only then), with run.json {"status": "finished"}. So OUT, when it
  exists, always holds a finished run. On any error (bad input) or interrupt (Ctrl-C = SIGINT, SIGTERM: both
  raise KeyboardInterrupt, the CLI exits 130 / 143) OUT.partial is removed, unless it holds a complete
  checkpoint (an epoch finished): then it is kept with run.json {"status": "failed", "error"} or
  {"status": "interrupted", "signal"}, and `--resume` continues it (the message says which). A previous OUT
  that is not an mmfast run (no run.json) is never deleted: the run refuses to start.
  Checkpoints are written to a temporary name and renamed when whole (trainer.MultimodalTrainer), so a kill -9
  at any moment, even mid-save, leaves only whole checkpoints or temporary folders: `--resume` deletes the
  latter (and any checkpoint folder without its trainer_state.json or weights), says which checkpoint it
  resumes from (step, epoch), and reproduces the uninterrupted run. With no complete checkpoint it says so:
  start afresh.
  OUT/ config.yaml  run.json  metrics.json  classification_report.txt/.json  confusion_matrix.png
       curves.png  model/ (Bundle.save + train_config.yaml)  checkpoints/ (the Trainer's, best and last)

Distributed: every process runs train(); the Trainer does DDP (gloo on CPU, NCCL on GPUs); only the main
process writes files, the others wait for it. Launch with
    torchrun --standalone --nproc_per_node N -m mmfast.train [CONFIG.yaml] [--key value ...]
    accelerate launch --multi_gpu --num_processes N -m mmfast.train ...      (GPUs; on CPU accelerate's multi-CPU
                                                                              mode goes through mpirun: use torchrun)
optim.batch_size is per process (global batch = N x batch_size x grad_accum). FSDP: distributed.fsdp is
TrainingArguments.fsdp (e.g. "full_shard auto_wrap") and distributed.fsdp_config its fsdp_config mapping;
adversarial pgd is refused with FSDP (its ascent passes run the unwrapped module). Under DDP the validation and
test losses come from the Trainer, which pads the last evaluation batch with repeated samples when the split is
not a multiple of N x batch_size: accuracy / F1 are exact (predictions are de-duplicated), the loss slightly
off; with early_stopping.metric loss on tiny splits prefer one process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, TrainConfig, config_from_dict, save_config, validate

__all__ = ["RunResult", "train", "evaluate", "predict", "partial_dir", "Terminated"]


@dataclass
class RunResult:
    output_dir: str
    model_dir: str
    test: dict                                   # test metrics, unprefixed (accuracy, f1_macro, loss, ...)
    validation: dict                             # the best epoch's validation metrics
    trainable: str                               # methods.apply_method's summary
    samples_per_second: float                    # kernels as configured (training steps only)
    samples_per_second_kernels_off: float | None = None   # compare_kernels
    timed_steps: int = 0
    report: str | None = None                    # the classification report text
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def partial_dir(output_dir) -> Path:
    final = Path(output_dir)
    return final.with_name(final.name + ".partial")


def _checkpoints(directory: Path) -> list[Path]:
    """The complete Trainer checkpoints of the run in directory (OUT.partial), oldest first."""
    from .trainer import complete_checkpoints

    return complete_checkpoints(directory / "checkpoints")


def _checkpoint_position(checkpoint: Path) -> str:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    epoch = state.get("epoch")
    return f"step {state.get('global_step')} of {state.get('max_steps')}, epoch " + (
        f"{epoch:g}" if isinstance(epoch, (int, float)) else "?")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler's stop, torchrun stopping its workers) handled as Ctrl-C is."""

    signal_number = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _prepare_output(cfg: TrainConfig) -> Path:
    """Create OUT.partial for this run (main process); raises ValueError naming output_dir / resume."""
    final, partial = Path(cfg.output_dir), partial_dir(cfg.output_dir)
    if final.exists() and not final.is_dir():
        raise ValueError(f"output_dir: {final} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not (final / "run.json").is_file():
        raise ValueError(f"output_dir: {final} exists and is not an mmfast run (no run.json); choose another "
                         f"output_dir or empty it")
    if cfg.resume:
        from .trainer import discard_incomplete_checkpoints

        if not partial.is_dir():
            raise ValueError(f"resume: nothing to resume: {partial} does not exist; start afresh: run again "
                             f"without --resume")
        removed = discard_incomplete_checkpoints(partial / "checkpoints")
        if removed:
            print(f"resume: removed {', '.join(removed)} from {partial / 'checkpoints'}")
        if not _checkpoints(partial):
            raise ValueError(f"resume: nothing to resume in {partial}: no complete checkpoint there (a run keeps "
                             f"one once its first epoch has finished); start afresh: run again without --resume "
                             f"(that replaces {partial})")
    elif partial.exists():
        if _checkpoints(partial):
            raise ValueError(f"output_dir: {partial} holds an interrupted run with checkpoints; continue it with "
                             f"--resume, or delete it")
        shutil.rmtree(partial)  # a run killed before its first checkpoint: nothing to keep
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / "run.json", {"status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "pid": os.getpid(), "argv": sys.argv, "resumed": cfg.resume})
    save_config(cfg, partial / "config.yaml")
    return partial


def _fail(partial: Path, error: BaseException, resumed_from: Path | None) -> str:
    """Clean up after an error or interrupt (main process): remove OUT.partial, or keep it when it has a
    complete checkpoint. Returns what became of it."""
    if not partial.exists():
        return ""
    kept = _checkpoints(partial)
    if not kept:
        shutil.rmtree(partial, ignore_errors=True)
        return f"removed {partial} (no checkpoint to resume from)"
    ended = time.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(error, KeyboardInterrupt):
        name = signal.Signals(getattr(error, "signal_number", signal.SIGINT)).name
        _write_json(partial / "run.json", {"status": "interrupted", "signal": name, "checkpoint": str(kept[-1]),
                                           "ended": ended})
        return f"kept {partial} (last checkpoint {kept[-1].name}): continue it with --resume"
    _write_json(partial / "run.json", {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                       "checkpoint": str(kept[-1]), "ended": ended})
    if resumed_from is not None and kept[-1].name == resumed_from.name:
        # the resumed run failed before its next checkpoint: --resume again would start from the same place
        return (f"kept {partial} (last checkpoint {kept[-1].name}); resuming from it failed, so fix the cause "
                f"first, or start afresh: delete {partial} and run again without --resume")
    return f"kept {partial} (last checkpoint {kept[-1].name}): continue it with --resume"


def _finish(partial: Path, final: Path) -> None:
    """OUT.partial -> OUT; a previous finished run at OUT goes only once the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
    partial.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ train


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _wait() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _strip(metrics: dict, prefix: str) -> dict:
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k[len(prefix) + 1:]: v for k, v in metrics.items()
            if k.startswith(prefix + "_") and not k.endswith(skip)}


def _module_names(model, modules: dict) -> dict:
    names = {id(m): n for n, m in model.named_modules()}
    return {modality: names[id(module)] for modality, module in modules.items() if id(module) in names}


def train(cfg: TrainConfig) -> RunResult:
    """Run the whole job (see the module doc). Raises ValueError / FileNotFoundError naming the key or sample
    for bad input, after cleaning up the output directory."""
    cfg = validate(copy.deepcopy(cfg))
    started = time.perf_counter()
    from .trainer import training_arguments

    final, partial = Path(cfg.output_dir), partial_dir(cfg.output_dir)
    # TrainingArguments first: it checks precision against the hardware before anything is written, and it
    # sets up torch.distributed under torchrun / accelerate launch (so is_main below is per process)
    args = training_arguments(cfg, str(partial / "checkpoints"))
    main = _is_main()
    with _sigterm_as_interrupt():
        if main:
            _prepare_output(cfg)
        _wait()
        resume_from = _checkpoints(partial)[-1] if cfg.resume else None  # every process, after the clean-up
        try:
            result = _train(cfg, args, partial, main, started, resume_from)
        except BaseException as error:
            if main:
                note = _fail(partial, error, resume_from)
                if note:  # shown by tracebacks (Python 3.11+) and appended to the CLI's one-line message
                    notes = getattr(error, "__notes__", None)
                    if notes is None:
                        notes = []
                        try:
                            error.__notes__ = notes
                        except AttributeError:
                            notes = None
                    if notes is not None:
                        notes.append(f"output: {note}")
            raise
        _wait()
    if main:
        _finish(partial, final)
        result.files = [str(final / Path(f).relative_to(partial)) for f in result.files]
        result.model_dir = str(final / "model")
        result.output_dir = str(final)
        print(_summary(cfg, result))
    return result


def _train(cfg: TrainConfig, args, partial: Path, main: bool, started: float, resume_from: Path | None) -> RunResult:
    import torch
    from transformers import EarlyStoppingCallback, set_seed

    from . import augment, bundle as bundles, data, methods, report
    from .trainer import MultimodalTrainer, ThroughputCallback, training_arguments

    set_seed(cfg.seed)
    bundle = None
    if cfg.init_from:
        bundle = bundles.load_bundle(cfg.init_from)
        if bundle.labels.task != cfg.task:
            raise ValueError(f"task: {cfg.task!r}, but the model in init_from ({cfg.init_from}) was trained for "
                             f"{bundle.labels.task!r}")
        if bundle.labels.names:  # new data must use the saved model's label set (its head's outputs)
            cfg.data.labels = list(bundle.labels.names)
    with args.main_process_first(desc="loading the data"):  # the demo is generated once, by the main process
        splits, labels = data.load_splits(cfg.data, cfg.task)
    for name in ("train", "validation", "test"):
        if len(splits[name]) == 0:
            raise ValueError(f"data: the {name} split is empty")
    if bundle is None:
        train_samples = [splits["train"][i] for i in range(len(splits["train"]))]
        bundle = bundles.build_bundle(cfg, labels, train_samples)

    model, trainable = methods.apply_method(bundle, cfg.method)
    bundle.model = model  # Bundle.save saves the current model (with its method's adapters)
    if main:
        print(f"trainable parameters: {trainable}")
    initial = copy.deepcopy(model) if cfg.compare_kernels else None  # same start for the kernels-off timing
    patched = None
    if cfg.kernels:
        import mmfast

        patched = mmfast.patch(model)
        if main:
            print("kernels: " + "; ".join(f"{kind} {len(r.swapped)} on mmfast, {len(r.left_alone)} left alone"
                                          for kind, r in patched.kinds().items()))
    elif main:
        print("kernels: off (--no-kernels)")

    n_train = len(splits["train"])
    world = args.world_size
    steps_per_epoch = max(1, math.ceil(n_train / (cfg.optim.batch_size * world * cfg.optim.grad_accum)))
    args.logging_steps = max(1, steps_per_epoch // 2)  # two training-loss points per epoch for the curves
    train_dataset = augment.AugmentedDataset(splits["train"], cfg.augment, cfg.data, seed=cfg.seed)
    evaluator = report.split_evaluator(cfg.task, bundle, batch_size=cfg.optim.batch_size)
    meter = ThroughputCallback(skip_first=1)
    trainer = MultimodalTrainer(
        model=model, args=args, data_collator=bundle.collate, train_dataset=train_dataset,
        eval_dataset=splits["validation"],
        compute_metrics=None if evaluator else report.metrics_fn(cfg.task),
        preprocess_logits_for_metrics=None if evaluator else report.preprocess_logits,
        processing_class=bundle.processor if hasattr(bundle.processor, "save_pretrained") else None,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping.patience), meter],
        embeddings=bundle.embeddings, adversarial=cfg.adversarial, evaluator=evaluator,
    )
    if resume_from is not None and main:
        print(f"resume: from {resume_from} ({_checkpoint_position(resume_from)})")
    outcome = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)

    # the best epoch's model is loaded (load_best_model_at_end); now the test split
    test_samples = splits["test"]
    if evaluator:
        test = evaluator(trainer.model, [test_samples[i] for i in range(len(test_samples))])
        prediction = None
    else:
        prediction = trainer.predict(test_samples, metric_key_prefix="test")
        test = _strip(prediction.metrics, "test")
    best_eval = next((e for e in trainer.state.log_history if e.get(f"eval_{cfg.early_stopping.metric}")
                      == trainer.state.best_metric), {})
    validation = _strip(best_eval, "eval")

    off = None
    if initial is not None and meter.steps:
        off = _time_kernels_off(cfg, initial, bundle, train_dataset, trainer.state.global_step)

    result = RunResult(output_dir=str(partial), model_dir=str(partial / "model"), test=test, validation=validation,
                       trainable=str(trainable), samples_per_second=meter.samples_per_second,
                       samples_per_second_kernels_off=off, timed_steps=meter.steps)
    if main:
        if patched is not None:
            mmfast.unpatch(model)  # the saved config and weights are the model's own, not the patched copies
        bundle.save(str(partial / "model"))
        save_config(cfg, partial / "model" / "train_config.yaml")
        files = [partial / "model", partial / "config.yaml", partial / "metrics.json", partial / "curves.png",
                 partial / "run.json"]
        if prediction is not None:
            written = report.write_test_report(cfg.task, labels.names, prediction.predictions, prediction.label_ids,
                                               partial)
        elif cfg.task == "contrastive" and labels.names:
            written = _zero_shot_report(bundle, trainer.model, test_samples, labels, partial)
            test["linear_probe_accuracy"] = _linear_probe_accuracy(bundle, trainer.model, splits, labels)
        else:
            written = {"text": None, "files": []}
        result.report = written["text"]
        files += [Path(f) for f in written["files"]]
        report.plot_curves(trainer.state.log_history, partial / "curves.png", cfg.early_stopping.metric)
        result.seconds = time.perf_counter() - started
        _write_json(partial / "metrics.json", {
            "test": test, "validation": validation, "best_checkpoint": _relative(trainer.state.best_model_checkpoint, partial),
            "train": {k: v for k, v in outcome.metrics.items()}, "epochs": trainer.state.epoch,
            "steps": trainer.state.global_step, "trainable_parameters": str(trainable),
            "throughput": {"samples_per_second": result.samples_per_second,
                           "samples_per_second_kernels_off": off, "timed_steps": meter.steps,
                           "kernels": cfg.kernels,
                           "what": "training samples / seconds inside optimizer steps (forward, backward, "
                                   "clipping, optimizer; data loading, evaluation and checkpoints excluded; "
                                   "first step excluded)"},
            "log_history": trainer.state.log_history})
        if result.report:
            print(result.report)
        _write_json(partial / "run.json", {"status": "finished", "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
                                           "seconds": round(result.seconds, 1), "test": test})
        result.files = [str(f) for f in files]
    return result


def _relative(path, root: Path):
    """A path inside OUT.partial as OUT-relative (the directory is renamed at the end)."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _time_kernels_off(cfg, initial, bundle, train_dataset, steps: int) -> float:
    """samples/s of `steps` training steps with the kernels off, on `initial` (a copy of the model taken
    before mmfast.patch, i.e. the run's starting weights), same data, batch, optimizer; no evaluation."""
    import tempfile

    from transformers import set_seed

    from .trainer import MultimodalTrainer, ThroughputCallback, training_arguments

    set_seed(cfg.seed)
    embeddings = {}
    if cfg.adversarial.method != "none":
        modules = dict(initial.named_modules())
        embeddings = {m: modules[n] for m, n in _module_names(bundle.model, bundle.embeddings).items()}
    meter = ThroughputCallback(skip_first=1)
    with tempfile.TemporaryDirectory(prefix="mmfast-timing-") as scratch:
        args = training_arguments(cfg, scratch, evaluate=False, max_steps=steps, logging_steps=max(steps, 1),
                                  disable_tqdm=True)
        trainer = MultimodalTrainer(model=initial, args=args, data_collator=bundle.collate,
                                    train_dataset=train_dataset, callbacks=[meter], embeddings=embeddings,
                                    adversarial=cfg.adversarial)
        trainer.train()
    return meter.samples_per_second


def _linear_probe_accuracy(bundle, model, splits, labels) -> float | None:
    """Contrastive with class names: logistic regression on the fine-tuned image embeddings of the train split,
    scored on the test split (None when the train split holds fewer than two of the classes)."""
    from .dual_encoder import linear_probe

    def chosen(split):
        return [s for s in (split[i] for i in range(len(split))) if s.get("label") in labels.names]

    train, test = chosen(splits["train"]), chosen(splits["test"])
    if len({s["label"] for s in train}) < 2 or not test:
        return None
    return linear_probe(bundle, train, test, model=model)["accuracy"]


def _zero_shot_report(bundle, model, samples, labels, out_dir) -> dict:
    """Contrastive with class names: the classification report of zero-shot predictions (image -> the class
    whose prompt is most similar)."""
    from .dual_encoder import zero_shot_predict
    from .report import write_classification_report

    chosen = [s for s in (samples[i] for i in range(len(samples))) if s.get("label") in labels.names]
    if not chosen:
        return {"text": None, "files": []}
    predicted = zero_shot_predict(bundle, chosen, model=model)
    y_true = [labels.names.index(s["label"]) for s in chosen]
    y_pred = [labels.names.index(p) for p in predicted]
    return write_classification_report(labels.names, y_true, y_pred, out_dir)


def _summary(cfg: TrainConfig, r: RunResult) -> str:
    lines = [f"== mmfast train: finished in {r.seconds:.1f} s -> {r.output_dir}",
             f"test: {_fmt(r.test)}",
             f"best validation: {_fmt(r.validation)}",
             f"trainable parameters: {r.trainable}"]
    what = (f"training samples per second over {r.timed_steps} optimizer steps (forward, backward, optimizer; "
            f"the first step, data loading, evaluation and checkpoints not timed)")
    if r.samples_per_second_kernels_off is not None:
        ratio = r.samples_per_second / r.samples_per_second_kernels_off
        lines.append(f"samples/s: kernels {'on' if cfg.kernels else 'off'} {r.samples_per_second:.1f}, kernels off "
                     f"{r.samples_per_second_kernels_off:.1f} ({ratio:.2f}x) — {what}; kernels off = the same "
                     f"number of steps on a fresh copy of the initial model, after the run")
    else:
        lines.append(f"samples/s: {r.samples_per_second:.1f} with kernels {'on' if cfg.kernels else 'off'} — {what}")
    lines.append("files: " + ", ".join(sorted(Path(f).name + ("/" if Path(f).is_dir() else "") for f in r.files)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ evaluate / predict


def _model_config(model_dir) -> TrainConfig:
    """The TrainConfig saved beside the model (its data settings decode new inputs the same way)."""
    import yaml

    path = Path(model_dir) / "train_config.yaml"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model_dir {model_dir}: not a directory")
    if not path.is_file():
        raise FileNotFoundError(f"model_dir {model_dir}: no train_config.yaml (not a model saved by mmfast train)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _read_inputs(inputs) -> tuple[list, list]:
    """(JSONL paths, inline records) from predict's inputs: paths, JSON-object strings or dicts."""
    paths, records = [], []
    for item in inputs:
        if isinstance(item, dict):
            records.append(item)
        elif isinstance(item, (str, os.PathLike)) and str(item).lstrip().startswith("{"):
            try:
                record = json.loads(str(item))
            except json.JSONDecodeError as exc:
                raise ValueError(f"input {str(item)[:60]!r}: not a JSON object ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"input {str(item)[:60]!r}: expected a JSON object")
            records.append(record)
        else:
            paths.append(str(item))
    return paths, records


def predict(model_dir, inputs, batch_size: int | None = None) -> list[dict]:
    """Predictions of a saved model for new samples: [{"id": ..., "prediction": ...}] in input order.

    inputs: JSON-lines file paths, JSON-object strings or dicts, with the training data's keys (text, image
    path, audio path; a label is ignored). Media paths are relative to their JSONL file (inline records:
    to the working directory)."""
    import torch

    from . import bundle as bundles, data

    cfg = _model_config(model_dir)
    paths, records = _read_inputs(list(inputs))
    samples = []
    for path in paths:
        samples += data.load_samples(path, cfg.data)
    if records:
        samples += data.load_samples(records, cfg.data)
    if not samples:
        raise ValueError("inputs: no samples given")
    b = bundles.load_bundle(model_dir)
    model = b.model.to(_device()).eval()
    batch_size = batch_size or cfg.optim.batch_size
    rows = []
    for start in range(0, len(samples), batch_size):
        chunk = [{k: v for k, v in s.items() if k != "label"} for s in samples[start:start + batch_size]]
        batch = b.collate(chunk)
        batch = {k: v.to(_device()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for sample, prediction in zip(chunk, b.predict(model, batch)):
            rows.append({"id": sample["id"], "prediction": prediction})
    return rows


def evaluate(model_dir, data_path, out_dir=None, batch_size: int | None = None) -> dict:
    """Metrics of a saved model on labelled data (a manifest or a datasets folder: every sample of it; a
    folder with splits: its test split). With out_dir: the classification report and confusion matrix too.
    Returns {"metrics": {...}, "report": text or None, "samples": n}."""
    import numpy as np
    import torch

    from . import bundle as bundles, data, report

    cfg = _model_config(model_dir)
    samples = data.load_eval_samples(data_path, cfg.data, cfg.task)
    if not samples:
        raise ValueError(f"data {data_path}: no samples")
    missing = [s["id"] for s in samples if s.get("label") is None]
    if missing:
        raise ValueError(f"data {data_path}: sample {missing[0]} has no label (evaluation needs labels)")
    b = bundles.load_bundle(model_dir)
    model = b.model.to(_device()).eval()
    batch_size = batch_size or cfg.optim.batch_size
    evaluator = report.split_evaluator(cfg.task, b, batch_size=batch_size)
    text = None
    if evaluator:
        metrics = evaluator(model, samples)
        if out_dir and cfg.task == "contrastive" and b.labels.names:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            text = _zero_shot_report(b, model, samples, b.labels, out_dir)["text"]
        return {"metrics": metrics, "report": text, "samples": len(samples)}
    logits, targets, losses = [], [], []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = b.collate(samples[start:start + batch_size])
            batch = {k: v.to(_device()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**batch)
            logits.append(out.logits.float().cpu().numpy())
            targets.append(batch["labels"].float().cpu().numpy())
            losses.append((float(out.loss), len(batch["labels"])))
    predictions, label_ids = np.concatenate(logits), np.concatenate(targets)
    metrics = report.metrics_fn(cfg.task)(type("EvalPrediction", (), {"predictions": predictions,
                                                                       "label_ids": label_ids})())
    metrics["loss"] = float(sum(l * n for l, n in losses) / sum(n for _, n in losses))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        text = report.write_test_report(cfg.task, b.labels.names, predictions, label_ids, out_dir)["text"]
    elif cfg.task in ("classification", "multilabel"):
        from sklearn.metrics import classification_report

        y_true = label_ids.reshape(-1).astype(int) if cfg.task == "classification" else (label_ids > 0.5).astype(int)
        text = classification_report(y_true, report.decisions(cfg.task, predictions),
                                     labels=list(range(len(b.labels.names))), target_names=b.labels.names,
                                     digits=3, zero_division=0)
    return {"metrics": metrics, "report": text, "samples": len(samples)}
