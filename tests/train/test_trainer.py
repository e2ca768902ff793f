"""MultimodalTrainer mechanics on TinyModel: arguments mapping, FGM/PGD gradients against a hand-written
reference, accumulation, mixed precision, early stopping, throughput count; report.py's metrics and files."""

import json
import types

import numpy as np
import pytest
import torch
from transformers import EarlyStoppingCallback

from mmfast.train.config import load_config
from mmfast.train.report import metrics_fn, plot_curves, write_test_report
from mmfast.train.trainer import MultimodalTrainer, ThroughputCallback, training_arguments

from .conftest import tiny_collate, tiny_model, tiny_samples


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _args(tmp_path, *overrides, **extra):
    cfg = _cfg("--optim.grad_clip", "0", *overrides)
    return training_arguments(cfg, str(tmp_path / "ckpt"), **extra)


def test_arguments_from_config(tmp_path):
    cfg = _cfg("--optim.optimizer", "sgd", "--optim.lr", "0.05", "--optim.schedule", "cosine",
               "--optim.warmup_ratio", "0.1", "--optim.weight_decay", "0.01", "--optim.batch_size", "6",
               "--optim.epochs", "4", "--optim.grad_clip", "0.5", "--optim.grad_accum", "3",
               "--early_stopping.metric", "loss", "--seed", "5", "--optim.precision", "bf16")
    args = training_arguments(cfg, str(tmp_path))
    assert args.optim.value == "sgd" and args.learning_rate == 0.05
    assert args.lr_scheduler_type.value == "cosine"
    assert args.get_warmup_steps(100) == 10
    assert (args.weight_decay, args.per_device_train_batch_size, args.num_train_epochs) == (0.01, 6, 4)
    assert (args.max_grad_norm, args.gradient_accumulation_steps, args.seed) == (0.5, 3, 5)
    assert args.bf16 and not args.fp16
    assert args.eval_strategy.value == "epoch" and args.save_strategy.value == "epoch"
    assert args.load_best_model_at_end and args.metric_for_best_model == "loss" and args.greater_is_better is False
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    assert training_arguments(_cfg(), str(tmp_path)).optim.value == "adamw_torch"
    assert training_arguments(_cfg(), str(tmp_path)).greater_is_better is True  # accuracy


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_fp16_refused_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="optim.precision: fp16 needs a CUDA GPU"):
        training_arguments(_cfg("--optim.precision", "fp16"), str(tmp_path))


def _trainer(tmp_path, model, *overrides, samples=None, callbacks=None, **extra):
    cfg = _cfg("--optim.grad_clip", "0", *overrides)
    args = training_arguments(cfg, str(tmp_path / "ckpt"), **extra)
    samples = samples or tiny_samples(8)
    return MultimodalTrainer(model=model, args=args, data_collator=tiny_collate, train_dataset=samples,
                             eval_dataset=samples, compute_metrics=metrics_fn("classification"),
                             embeddings={"image": model.image_embed, "text": model.text_embed},
                             adversarial=cfg.adversarial, callbacks=callbacks or [])


def _reference_fgm_grads(model, batch, epsilon):
    """FGM written out directly: clean grads + grads at embeddings + eps * g / ||g|| (per sample)."""
    model.zero_grad()
    outputs = {}

    def capture(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output
        return hook

    handles = [model.image_embed.register_forward_hook(capture("image")),
               model.text_embed.register_forward_hook(capture("text"))]
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    shifts = {}
    for name, out in outputs.items():
        g = out.grad
        norm = g.reshape(len(g), -1).norm(dim=1).reshape(-1, *[1] * (g.dim() - 1))
        shifts[name] = epsilon * g / norm
    handles = [model.image_embed.register_forward_hook(lambda m, a, o: o + shifts["image"]),
               model.text_embed.register_forward_hook(lambda m, a, o: o + shifts["text"])]
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _trainer_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # the training loop sets it per step
    trainer.training_step(trainer.model, dict(batch))
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def test_fgm_matches_reference(tmp_path):
    batch = tiny_collate(tiny_samples(6))
    model = tiny_model()
    model.config.use_cache = False
    trainer = _trainer(tmp_path, model, "--adversarial.method", "fgm", "--adversarial.epsilon", "0.5",
                       "--model.dropout", "0")
    model.train()
    got = _trainer_grads(trainer, batch)
    want = _reference_fgm_grads(model, batch, 0.5)
    clean = _trainer(tmp_path, tiny_model(), "--model.dropout", "0")
    plain = _trainer_grads(clean, batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    # and the adversarial pass really added something (not just the clean gradient)
    assert any((got[n] - plain[n]).abs().max() > 1e-4 for n in got)


def test_pgd_one_step_is_fgm_and_stays_in_the_ball(tmp_path):
    batch = tiny_collate(tiny_samples(6))
    fgm = _trainer_grads(_trainer(tmp_path, tiny_model(), "--adversarial.method", "fgm",
                                  "--adversarial.epsilon", "0.3"), batch)
    pgd1 = _trainer_grads(_trainer(tmp_path, tiny_model(), "--adversarial.method", "pgd", "--adversarial.epsilon",
                                   "0.3", "--adversarial.steps", "1", "--adversarial.alpha", "0.3"), batch)
    for name in fgm:
        torch.testing.assert_close(pgd1[name], fgm[name], rtol=1e-5, atol=1e-6)

    # several steps: the final perturbation is within epsilon of the clean embedding, and further than one step
    model = tiny_model()
    trainer = _trainer(tmp_path, model, "--adversarial.method", "pgd", "--adversarial.epsilon", "0.3",
                       "--adversarial.steps", "4", "--adversarial.alpha", "0.1")
    seen = []
    # registered after the trainer's hook, so it sees the perturbed output; the input recomputes the clean one
    handle = model.image_embed.register_forward_hook(
        lambda m, a, o: seen.append((o - torch.nn.functional.linear(a[0], m.weight, m.bias)).detach()))
    _trainer_grads(trainer, batch)
    handle.remove()
    assert len(seen) == 5  # clean, 3 ascent passes, the adversarial pass
    norms = [s.norm(dim=1) for s in seen]
    assert torch.all(norms[0] == 0)
    assert torch.all(norms[-1] <= 0.3 + 1e-5) and torch.all(norms[-1] > 0.1 + 1e-3)


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_adversarial_with_accumulation_equals_whole_batch(tmp_path, method):
    """Per-sample perturbations and the Trainer's loss scaling: 2 micro-batches of 4 with grad_accum 2 make
    the same update as one batch of 8 (SGD, lr 1, one step, the whole 8-sample set)."""
    common = ["--adversarial.method", method, "--adversarial.epsilon", "0.4", "--optim.optimizer", "sgd",
              "--optim.lr", "1.0", "--optim.schedule", "constant"]
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        model = tiny_model()
        trainer = _trainer(tmp_path / f"{batch}", model, *common, "--optim.batch_size", str(batch),
                           "--optim.grad_accum", str(accum), max_steps=1, evaluate=False)
        trainer.train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = dict(tiny_model().named_parameters())
    assert any((results[0][n] - start[n]).abs().max() > 1e-3 for n in start)  # it did train
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-5)


def test_bf16_adversarial_trains(tmp_path):
    model = tiny_model()
    trainer = _trainer(tmp_path, model, "--adversarial.method", "pgd", "--optim.precision", "bf16",
                       "--optim.batch_size", "4", max_steps=3, evaluate=False)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e] or [trainer.state.log_history[-1]["train_loss"]]
    assert all(np.isfinite(losses))


def test_adversarial_needs_embeddings(tmp_path):
    cfg = _cfg("--adversarial.method", "fgm")
    with pytest.raises(ValueError, match="adversarial.method: fgm needs"):
        MultimodalTrainer(model=tiny_model(), args=training_arguments(cfg, str(tmp_path), evaluate=False), data_collator=tiny_collate,
                          train_dataset=tiny_samples(4), embeddings={}, adversarial=cfg.adversarial)


def test_early_stopping_on_the_chosen_metric(tmp_path):
    """A learning rate too small to change the predictions: accuracy never improves after epoch 1, so with
    patience 2 training stops after epoch 3 of 20, and the best checkpoint is reloaded."""
    model = tiny_model()
    trainer = _trainer(tmp_path, model, "--optim.lr", "1e-12", "--optim.epochs", "20", "--optim.batch_size", "8",
                       "--early_stopping.patience", "2",
                       callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    assert len(evals) == 3
    assert trainer.state.best_metric == evals[0]["eval_accuracy"]


def test_throughput_counts_samples(tmp_path):
    meter = ThroughputCallback()
    trainer = _trainer(tmp_path, tiny_model(), "--optim.batch_size", "3", samples=tiny_samples(9),
                       callbacks=[meter], max_steps=3, evaluate=False)
    trainer.train()
    assert meter.steps == 3 and meter.samples == 9 and meter.samples_per_second > 0


# ---------------------------------------------------------------------------------------------- report.py


def _eval(predictions, labels):
    return types.SimpleNamespace(predictions=predictions, label_ids=labels)


def test_metrics_by_task():
    logits = np.array([[2.0, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 2]])
    got = metrics_fn("classification")(_eval((logits, np.zeros(4)), np.array([0, 1, 2, 2])))
    assert got["accuracy"] == 0.75
    assert got["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    got = metrics_fn("multilabel")(_eval(np.array([[1.0, -1], [1, 1]]), np.array([[1.0, 0], [1, 0]])))
    assert got["subset_accuracy"] == 0.5 and got["f1_micro"] == pytest.approx(0.8)
    got = metrics_fn("regression")(_eval(np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 2.0, 3.0])))
    assert got["mse"] == pytest.approx(1 / 3) and got["mae"] == pytest.approx(1 / 3)
    assert got["r2"] == pytest.approx(0.5)


def test_test_report_files(tmp_path):
    names = ["cat", "dog", "eel"]
    logits = np.eye(3)[[0, 1, 1, 2]]
    result = write_test_report("classification", names, logits, np.array([0, 1, 2, 2]), tmp_path)
    data = json.loads((tmp_path / "classification_report.json").read_text())
    assert data["eel"]["recall"] == 0.5 and data["eel"]["support"] == 2 and data["dog"]["precision"] == 0.5
    assert "macro avg" in data and "weighted avg" in data
    assert "eel" in result["text"] and (tmp_path / "classification_report.txt").read_text() == result["text"]
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [{"loss": 1.0, "epoch": 0.5}, {"eval_loss": 0.9, "eval_accuracy": 0.5, "epoch": 1.0},
               {"loss": 0.7, "epoch": 1.5}, {"eval_loss": 0.6, "eval_accuracy": 0.8, "epoch": 2.0}]
    plot_curves(history, tmp_path / "curves.png", "accuracy")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_split_evaluator_drives_best_model_and_early_stopping(tmp_path):
    """The contrastive/generation path: Trainer.evaluate replaced by a whole-split evaluator. A scripted
    evaluator (loss 3, 1, 2, 2, ...) makes epoch 2 the best: training stops at epoch 4 with patience 2 and
    the best metric is epoch 2's loss."""
    script = iter([3.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    seen = []

    def evaluator(model, samples):
        seen.append(len(samples))
        return {"loss": next(script), "token_accuracy": 0.5}

    trainer = _trainer(tmp_path, tiny_model(), "--optim.epochs", "6", "--optim.batch_size", "8",
                       "--task", "generation", "--early_stopping.metric", "loss",
                       callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.evaluator = evaluator
    trainer.train()
    assert seen == [8, 8, 8, 8]
    assert trainer.state.best_metric == 1.0
    assert [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e] == [3.0, 1.0, 2.0, 2.0]


def test_training_dataset_hears_each_epoch(tmp_path):
    """augment.AugmentedDataset draws per (seed, epoch, index): the trainer must tell it the epoch."""

    class Recording(list):
        epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    samples = Recording(tiny_samples(8))
    trainer = _trainer(tmp_path, tiny_model(), "--optim.epochs", "3", "--optim.batch_size", "4", samples=samples,
                       evaluate=False)
    trainer.train()
    # (accelerate's DataLoader may tell it too: repeats are harmless, the order is what matters)
    assert [e for i, e in enumerate(samples.epochs) if i == 0 or samples.epochs[i - 1] != e] == [0, 1, 2]


def test_fsdp_is_selected_by_config(tmp_path):
    plain = training_arguments(_cfg(), str(tmp_path))
    assert not plain.fsdp  # DDP (or one process) unless asked
    args = training_arguments(_cfg("--distributed.fsdp", "full_shard auto_wrap", "--distributed.fsdp_config",
                                   "{min_num_params: 1000}"), str(tmp_path))
    assert args.fsdp and args.fsdp_config["min_num_params"] == 1000
