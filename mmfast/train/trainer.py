"""MultimodalTrainer: transformers.Trainer plus adversarial training on the modalities' input embeddings.

    args = training_arguments(cfg, output_dir="runs/x.partial/checkpoints")
    trainer = MultimodalTrainer(model=model, args=args, data_collator=bundle.collate, train_dataset=...,
                                eval_dataset=..., compute_metrics=report.metrics_fn(cfg.task),
                                embeddings=bundle.embeddings, adversarial=cfg.adversarial,
                                callbacks=[EarlyStoppingCallback(cfg.early_stopping.patience)])

Everything else (loop, accumulation, clipping, mixed precision, DDP/FSDP, best-model reload, checkpoint rotation)
is the Trainer's own.

Checkpoints are written whole or not at all: the Trainer writes checkpoint-N into a temporary sibling,
OUTPUT/tmp-checkpoint-N/checkpoint-N (model, optimizer, scheduler, scaler, every process's RNG state,
trainer_state.json), the files are flushed to disk, and only then is it renamed to OUTPUT/checkpoint-N. A process
killed at any moment leaves either a complete checkpoint-N or a tmp-checkpoint-N, which complete_checkpoints()
and discard_incomplete_checkpoints() tell apart and clean up. (transformers writes checkpoint-N in place; a
kill -9 during the write leaves a folder that looks like the newest checkpoint and cannot be resumed.)
MMFAST_TEST_CHECKPOINT_RENAME_DELAY=SECONDS (tests only) sleeps between "written" and "renamed" so that a test
can kill a run inside that window.

Adversarial training (cfg.adversarial.method):
  fgm  one clean forward/backward, then per modality delta = epsilon * g / ||g||, g the gradient of the
       loss with respect to that modality's input embedding (the output of Bundle.embeddings[modality]),
       then one forward/backward with the embeddings shifted by delta: the parameters get clean +
       adversarial gradients (Goodfellow et al. 2015; Miyato et al. 2017 on embeddings).
  pgd  the clean gradient gives the first step; `steps - 1` more ascent steps, each
       delta <- project_eps(delta + alpha * g / ||g||) with g from a forward at the current delta
       (gradients taken with respect to delta only: the parameters' gradients are untouched), then the
       adversarial forward/backward at the final delta (Madry et al. 2018). steps=1 with alpha >= epsilon is FGM.
  The norms are per sample (over all dimensions but the first), so each sample moves within its own
  epsilon-ball however the batch is split: a run with gradient accumulation perturbs exactly as one with
  the whole batch at once. A sample whose gradient is zero (its modality is missing) is not moved.
  The adversarial loss gets the same scaling the Trainer gave the clean one (1 / accumulation steps, or
  the num_items_in_batch normalisation), and goes through accelerator.backward, so mixed precision's loss
  scaling and DDP's gradient all-reduce apply to it as to the clean loss. Non-finite gradients (an fp16
  overflow the scaler will skip) give a zero perturbation.
  The perturbation enters through forward hooks on the embedding modules: no model code changes. The
  logged training loss is the clean loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

__all__ = ["MultimodalTrainer", "training_arguments", "ThroughputCallback", "precision_error",
           "complete_checkpoints", "discard_incomplete_checkpoints"]


# ------------------------------------------------------------------------------------------------ arguments


def precision_error(precision: str, use_cuda: bool) -> str | None:
    """Why optim.precision cannot run here, or None."""
    if precision == "fp16" and not use_cuda:
        return ("optim.precision: fp16 needs a CUDA GPU (PyTorch's fp16 autocast with loss scaling); on CPU use "
                "bf16 (fast where the CPU has AMX/AVX-512 bf16) or fp32")
    if precision == "bf16" and use_cuda and not torch.cuda.is_bf16_supported():
        return f"optim.precision: bf16 is not supported by this GPU ({torch.cuda.get_device_name(0)}); use fp16 or fp32"
    return None


def training_arguments(cfg, output_dir: str, *, evaluate: bool = True, max_steps: int | None = None,
                       logging_steps: int | None = None, **extra) -> TrainingArguments:
    """TrainingArguments from a TrainConfig. evaluate=False: no evaluation, no checkpoints, no best-model
    reload (the kernels-off timing run); max_steps overrides cfg.optim.max_steps."""
    o = cfg.optim
    use_cuda = torch.cuda.is_available()
    problem = precision_error(o.precision, use_cuda)
    if problem:
        raise ValueError(problem)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    metric = cfg.early_stopping.metric
    from .config import greater_is_better

    kwargs = dict(
        output_dir=output_dir,
        optim="adamw_torch" if o.optimizer == "adamw" else "sgd",
        learning_rate=o.lr,
        lr_scheduler_type=o.schedule,
        weight_decay=o.weight_decay,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps if max_steps is None else max_steps,
        max_grad_norm=o.grad_clip,  # 0 = no clipping (Trainer clips only when > 0)
        gradient_accumulation_steps=o.grad_accum,
        bf16=o.precision == "bf16",
        fp16=o.precision == "fp16",
        eval_strategy="epoch" if evaluate else "no",
        save_strategy="epoch" if evaluate else "no",
        load_best_model_at_end=evaluate,
        metric_for_best_model=metric if evaluate else None,
        greater_is_better=greater_is_better(metric) if evaluate else None,
        # best + last survive (load_best_model_at_end keeps the best one): enough to resume and to reload
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=logging_steps or 10,
        remove_unused_columns=False,  # the datasets hold raw samples; Bundle.collate builds the tensors
        label_names=["labels"],  # PEFT wrappers hide forward's signature, from which Trainer would guess it
        report_to="none",
        use_cpu=not use_cuda,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.data.num_workers,
        dataloader_pin_memory=use_cuda,
        # a batch may lack a modality, leaving that encoder without gradients; DDP must not wait for them
        ddp_find_unused_parameters=True,
        disable_tqdm=False,
    )
    # transformers 5.x: warmup_steps < 1 is a ratio (warmup_ratio is deprecated, then removed)
    if "warmup_ratio" in fields and o.warmup_ratio and not _warmup_steps_takes_ratio():
        kwargs["warmup_ratio"] = o.warmup_ratio
    else:
        kwargs["warmup_steps"] = o.warmup_ratio
    if cfg.distributed.fsdp:
        kwargs["fsdp"] = cfg.distributed.fsdp
        if cfg.distributed.fsdp_config is not None:
            kwargs["fsdp_config"] = cfg.distributed.fsdp_config
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def _warmup_steps_takes_ratio() -> bool:
    field = {f.name: f for f in dataclasses.fields(TrainingArguments)}["warmup_steps"]
    return field.type in (float, "float") or "float" in str(field.type)


# ------------------------------------------------------------------------------------------------ throughput


class _DatasetEpoch(TrainerCallback):
    """Tell the training dataset the epoch at each epoch's start (augment.AugmentedDataset draws new
    augmentations per epoch). The Trainer calls set_epoch on its DataLoader and sampler only, not on a
    map-style dataset. state.epoch is the fractional epoch so far: its floor is the epoch now starting, also
    when a run resumes mid-epoch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


class ThroughputCallback(TrainerCallback):
    """Seconds spent in optimizer steps (on_step_begin -> on_step_end: forward, backward, clipping, optimizer,
    scheduler; the Trainer fetches and collates the step's batches before on_step_begin, and evaluates and
    checkpoints after on_step_end, so neither is timed). MultimodalTrainer counts the samples."""

    def __init__(self, skip_first: int = 0):
        self.skip_first = skip_first  # warm-up steps left out (one-time JIT / allocator costs)
        self.seconds = 0.0
        self.steps = 0
        self._start = None
        self._samples_at_start = 0
        self.samples = 0
        self.trainer = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._samples_at_start = self.trainer.samples_seen if self.trainer else 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        if state.global_step > self.skip_first:
            self.seconds += elapsed
            self.steps += 1
            if self.trainer is not None:
                self.samples += self.trainer.samples_seen - self._samples_at_start
        self._start = None

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------------ checkpoints


_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step
_STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N: never matched by the Trainer's "checkpoint-*" rotation and resume
_WEIGHT_PREFIXES = ("model", "pytorch_model", "adapter_model")  # .safetensors / .bin / sharded index / FSDP folder
_RENAME_DELAY = "MMFAST_TEST_CHECKPOINT_RENAME_DELAY"


def checkpoint_step(path) -> int | None:
    """N of a checkpoint-N folder name, else None."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_problem(path) -> str | None:
    """Why the checkpoint-N folder cannot be resumed from, or None. trainer_state.json is the last file the Trainer
    writes into a checkpoint, so a folder with a valid one for step N (and model weights) is whole."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as exc:
        return f"unreadable trainer_state.json ({exc})"
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(path):
        return "its trainer_state.json is not for this step"
    if not any(entry.name.startswith(_WEIGHT_PREFIXES) for entry in path.iterdir()):
        return "no model weights"
    return None


def complete_checkpoints(directory) -> list[Path]:
    """The whole checkpoint-N folders in directory, oldest (lowest N) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and checkpoint_problem(p) is None]
    return sorted(found, key=checkpoint_step)


def discard_incomplete_checkpoints(directory) -> list[str]:
    """Delete what a killed save left in directory (tmp-checkpoint-N folders, checkpoint-N folders that are not
    whole); returns "NAME (why)" for each."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(_STAGING_PREFIX):
            why = "an unfinished save"
        elif checkpoint_step(path) is not None:
            why = checkpoint_problem(path)
            if why is None:
                continue
        else:
            continue
        shutil.rmtree(path)
        removed.append(f"{path.name} ({why})")
    return removed


def _fsync(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # folders cannot be fsynced on some systems (Windows)
        pass
    finally:
        os.close(fd)


def _flush_to_disk(folder: Path) -> None:
    """fsync every file and folder under folder, so that the rename publishes data that is on disk (a kill -9
    alone loses nothing written; a power cut would)."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)) + [folder]:
        _fsync(path)


def _rotate(run_dir: str, trainer) -> None:
    from transformers import trainer_utils

    if hasattr(trainer_utils, "rotate_checkpoints"):
        trainer_utils.rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                                         best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
    else:  # older transformers: a Trainer method
        trainer._rotate_checkpoints(use_mtime=True, output_dir=run_dir)


# ------------------------------------------------------------------------------------------------ adversarial


def _batch_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against t."""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
    return flat.norm(dim=1).reshape((-1,) + (1,) * max(t.dim() - 1, 0))


def _unit(g: torch.Tensor) -> torch.Tensor:
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).float()
    norm = _batch_norm(g)
    return torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g))


def _project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    norm = _batch_norm(delta)
    return delta * torch.clamp(epsilon / norm.clamp_min(1e-30), max=1.0)


class _Perturber:
    """Forward hooks on the embedding modules. mode "record": add a zero tensor that requires grad to each
    output (so the loss's gradient with respect to the embedding lands in its .grad, whether or not the
    embedding itself requires grad); mode "shift": add the given deltas. One entry per call of the module
    in a forward (a module called twice gets two)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.mode: str | None = None
        self.deltas: dict[str, list[torch.Tensor]] = {}
        self._calls: dict[str, int] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def remove(self):
        for handle in self._handles:
            handle.remove()

    def _hook(self, name):
        def hook(module, args, output):
            if self.mode is None:
                return None
            if isinstance(output, torch.Tensor):
                tensor, rebuild = output, lambda t: t
            elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                tensor, rebuild = output[0], lambda t: type(output)([t, *output[1:]])
            else:
                raise TypeError(f"adversarial training: embeddings[{name!r}] ({type(module).__name__}) returned "
                                f"{type(output).__name__}; expected a tensor (or a tuple starting with one)")
            if not tensor.is_floating_point():
                raise TypeError(f"adversarial training: embeddings[{name!r}] returned a {tensor.dtype} tensor; "
                                f"the perturbed embedding must be floating point")
            index = self._calls.get(name, 0)
            self._calls[name] = index + 1
            if self.mode == "record":
                delta = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device, requires_grad=True)
                self.deltas.setdefault(name, []).append(delta)
            else:
                known = self.deltas.get(name, [])
                if index >= len(known) or known[index].shape != tensor.shape:
                    return None  # this call had no clean counterpart: leave it unperturbed
                delta = known[index]
            return rebuild(tensor + delta.to(tensor.dtype))

        return hook

    @contextlib.contextmanager
    def active(self, mode: str, deltas: dict[str, list[torch.Tensor]] | None = None):
        self.mode, self._calls = mode, {}
        if mode == "record":
            self.deltas = {}
        else:
            self.deltas = deltas or {}
        try:
            yield
        finally:
            self.mode = None


class MultimodalTrainer(Trainer):
    """transformers.Trainer with FGM/PGD adversarial training on input embeddings (see the module doc) and a
    count of the training samples seen (for samples/s)."""

    def __init__(self, *args, embeddings: dict[str, nn.Module] | None = None, adversarial=None, evaluator=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluator = evaluator
        self.samples_seen = 0
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_DatasetEpoch(self.train_dataset))
        self.adversarial = adversarial if adversarial is not None and adversarial.method != "none" else None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ThroughputCallback):
                callback.trainer = self
        self._perturber = None
        self._clean = None  # (unscaled loss, inputs) of the current clean pass
        self._staging_dir = None  # while a checkpoint is saved: where the Trainer writes it (see the module doc)
        if self.adversarial is not None:
            if not embeddings:
                raise ValueError(f"adversarial.method: {self.adversarial.method} needs the model's input embedding "
                                 f"modules (Bundle.embeddings), and this model has none")
            if self.args.fsdp and self.adversarial.method == "pgd":
                raise ValueError("adversarial.method: pgd's ascent steps run the unwrapped module, which FSDP "
                                 "shards; use fgm with distributed.fsdp")
            self._perturber = _Perturber(embeddings)

    def _get_output_dir(self, trial):
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The Trainer's save, into tmp-checkpoint-N/checkpoint-N, then renamed to checkpoint-N when whole; the
        Trainer's rotation (save_total_limit, the best checkpoint kept) runs after the rename."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, _STAGING_PREFIX + name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a stale one from a killed run at this step
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self._staging_dir = None
        # the Trainer named the best checkpoint by where it wrote it (if this one is the best): name it by where
        # it will be, in memory (every process) and in the saved trainer_state.json
        best = self.state.best_model_checkpoint
        staged_best = best is not None and os.path.dirname(os.path.normpath(best)) == os.path.normpath(staging)
        if staged_best:
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(os.path.normpath(best)))
        self.accelerator.wait_for_everyone()  # every process's files (rng_state_N.pth) are written
        if self.args.should_save:
            written, final = Path(staging) / name, Path(run_dir) / name
            if staged_best:
                state_file = written / "trainer_state.json"
                state = json.loads(state_file.read_text())
                state["best_model_checkpoint"] = self.state.best_model_checkpoint
                state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            _flush_to_disk(written)
            delay = float(os.environ.get(_RENAME_DELAY) or 0)
            if delay > 0:
                time.sleep(delay)
            if final.exists():  # saved twice at one step: the older copy goes once the new one is in place
                final.rename(Path(staging) / f"old-{name}")
            written.rename(final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync(run_dir)  # the rename itself
            _rotate(run_dir, self)
        self.accelerator.wait_for_everyone()  # the checkpoint is in place before anyone reads it (best reload)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """With an evaluator (contrastive, generation: report.split_evaluator): its whole-split metrics, logged
        and handed to the callbacks (early stopping, best-model tracking) as Trainer.evaluate does; every
        process computes them on the whole split (no collective), so all agree on early stopping."""
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        samples = [dataset[i] for i in range(len(dataset))]
        start = time.perf_counter()
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluator(self.model, samples).items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self._perturber is not None and self._perturber.mode == "record":
            loss = result[0] if return_outputs else result
            self._clean = (loss.detach(), inputs)  # inputs already on the device (Trainer prepared them)
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.samples_seen += _batch_size(inputs)
        if self._perturber is None:
            return super().training_step(model, inputs, num_items_in_batch)
        with self._perturber.active("record"):
            scaled = super().training_step(model, inputs, num_items_in_batch)  # clean forward + backward
        clean, prepared = self._clean
        recorded = self._perturber.deltas
        self._clean = None
        # the factor training_step applied after compute_loss (1 / accumulation steps, or 1 when the loss is
        # normalised by num_items_in_batch): the adversarial loss gets the same
        scale = (scaled.float() / clean.float()).item() if clean.item() != 0 else 1.0 / self.current_gradient_accumulation_steps
        if not math.isfinite(scale):
            scale = 1.0 / self.current_gradient_accumulation_steps
        adv = self.adversarial
        grads = {name: [d.grad if d.grad is not None else torch.zeros_like(d) for d in ds] for name, ds in recorded.items()}
        if adv.method == "fgm":
            deltas = {name: [adv.epsilon * _unit(g) for g in gs] for name, gs in grads.items()}
        else:
            deltas = {name: [_project(adv.alpha * _unit(g), adv.epsilon) for g in gs] for name, gs in grads.items()}
            ascent_model = self.accelerator.unwrap_model(model)  # no DDP hooks: these passes have no backward
            for _ in range(adv.steps - 1):
                leaves = {name: [d.detach().requires_grad_() for d in ds] for name, ds in deltas.items()}
                flat = [d for ds in leaves.values() for d in ds]
                with self._perturber.active("shift", leaves), self.compute_loss_context_manager():
                    loss = self.compute_loss(ascent_model, prepared, num_items_in_batch=num_items_in_batch)
                found = iter(torch.autograd.grad(loss, flat, allow_unused=True))
                deltas = {}
                for name, ds in leaves.items():
                    deltas[name] = []
                    for d in ds:
                        g = next(found)
                        g = torch.zeros_like(d) if g is None else g  # this call did not reach the loss
                        deltas[name].append(_project(d.detach() + adv.alpha * _unit(g), adv.epsilon))
        deltas = {name: [d.detach() for d in ds] for name, ds in deltas.items()}
        with self._perturber.active("shift", deltas), self.compute_loss_context_manager():
            adversarial_loss = self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            adversarial_loss = adversarial_loss.mean()
        self.accelerator.backward(adversarial_loss * scale)
        return scaled


def _batch_size(inputs) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0
