"""train / evaluate / predict end to end on a tiny real manifest, and the output directory's life cycle:
finished runs are marked, failed ones never look finished, checkpoints survive for --resume."""

import json
import os
import signal

import pytest

from mmfast.train import evaluate, load_config, predict, train
from mmfast.train import run as run_module
from mmfast.train.run import Terminated
from mmfast.train.trainer import MultimodalTrainer

from .conftest import tiny_run_args, write_manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=30)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """One real run shared by the tests that only read its outputs (kernels on, LoRA, FGM)."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    cfg = load_config(None, tiny_run_args(out, data, "--adversarial.method", "fgm"))
    return train(cfg), out


def test_finished_run_layout(finished):
    result, out = finished
    assert not run_module.partial_dir(out).exists()
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "finished"
    for name in ("config.yaml", "metrics.json", "classification_report.txt", "classification_report.json",
                 "confusion_matrix.png", "curves.png", "model/train_config.yaml", "model/labels.json"):
        assert (out / name).is_file(), name
    # best + last kept by the Trainer's rotation, both renamed into place, naming the best by its final path
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert 1 <= len(checkpoints) <= 2 and all(p.name.startswith("checkpoint-") for p in checkpoints)
    best = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert best == str(run_module.partial_dir(out) / json.loads((out / "metrics.json").read_text())["best_checkpoint"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "f1_macro", "f1_weighted", "loss"}
    assert metrics["test"] == result.test
    assert metrics["throughput"]["samples_per_second"] > 0
    assert "trainable" in result.trainable or "parameters" in result.trainable
    report = json.loads((out / "classification_report.json").read_text())
    assert set(report) >= {"cat", "dog", "owl", "macro avg", "weighted avg"}
    assert report["macro avg"]["support"] == 6  # 20% of 30
    assert load_config(str(out / "config.yaml"), []).adversarial.method == "fgm"


def test_predict_and_evaluate_the_saved_model(finished, data, tmp_path):
    result, out = finished
    rows = predict(out / "model", [str(data), json.dumps({"id": "q", "text": "a two here"})])
    assert len(rows) == 31 and rows[-1]["id"] == "q"
    assert all(row["prediction"] in ("cat", "dog", "owl") for row in rows)
    again = evaluate(out / "model", data, out_dir=tmp_path)
    assert again["samples"] == 30 and 0 <= again["metrics"]["accuracy"] <= 1
    assert (tmp_path / "confusion_matrix.png").is_file() and "owl" in again["report"]


def test_bad_input_leaves_nothing(tmp_path, data):
    # a label outside the given label set: the data loader refuses it, naming the sample
    out = tmp_path / "run"
    bad = write_manifest(tmp_path / "bad", n=12, extra=[{"id": "odd-one", "text": "a two here", "label": "yak"}])
    with pytest.raises(ValueError, match="odd-one"):
        train(load_config(None, tiny_run_args(out, bad, "--data.labels", "[cat, dog, owl]")))
    assert not out.exists() and not run_module.partial_dir(out).exists()
    # an output_dir that is not an mmfast run is never touched
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="output_dir: .* not an mmfast run"):
        train(load_config(None, tiny_run_args(out, data)))
    assert (out / "notes.txt").read_text() == "mine" and not run_module.partial_dir(out).exists()


def _interrupt_at_evaluation(monkeypatch, number: int, interrupt):
    """Make the number-th evaluation call interrupt()."""
    calls = []
    original = MultimodalTrainer.evaluate

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            interrupt()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultimodalTrainer, "evaluate", interrupted)
    return original


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def test_interrupted_run_keeps_checkpoints_and_resumes(tmp_path, data, monkeypatch, capsys):
    """SIGTERM during epoch 2's evaluation: epoch 1's checkpoint exists, so OUT.partial is kept (status interrupted)
    and OUT does not exist. A save cut short by a kill is deleted by --resume, which resumes from the newest
    complete checkpoint and says so; a resumed run that fails before its next checkpoint does not send the user
    round again with --resume; the next --resume finishes the run."""
    out = tmp_path / "run"
    original = _interrupt_at_evaluation(monkeypatch, 2, _sigterm)
    with pytest.raises(Terminated) as info:
        train(load_config(None, tiny_run_args(out, data, "--no-kernels")))
    assert "continue it with --resume" in info.value.__notes__[0]
    partial = run_module.partial_dir(out)
    assert not out.exists()
    status = json.loads((partial / "run.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    checkpoints = partial / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGTERM) is not run_module._raise_terminated  # the handler is train()'s only

    # what kills during epoch 2's save leave: its temporary folder; an in-place checkpoint without its state
    (checkpoints / "tmp-checkpoint-6" / "checkpoint-6").mkdir(parents=True)
    (checkpoints / "checkpoint-6").mkdir()
    (checkpoints / "checkpoint-6" / "model.safetensors").write_bytes(b"")
    # a new run without --resume refuses to throw the complete checkpoint away
    monkeypatch.setattr(MultimodalTrainer, "evaluate", original)
    with pytest.raises(ValueError, match="--resume"):
        train(load_config(None, tiny_run_args(out, data, "--no-kernels")))

    def broken():
        raise ValueError("eval: disk full")

    _interrupt_at_evaluation(monkeypatch, 1, broken)
    capsys.readouterr()
    with pytest.raises(ValueError, match="disk full") as info:
        train(load_config(None, tiny_run_args(out, data, "--no-kernels", "--resume")))
    printed = capsys.readouterr().out
    assert "resume: removed checkpoint-6 (no trainer_state.json), tmp-checkpoint-6 (an unfinished save)" in printed
    assert f"resume: from {checkpoints / 'checkpoint-3'} (step 3 of 6, epoch 1)" in printed
    assert "resuming from it failed" in info.value.__notes__[0]
    assert "continue it with --resume" not in info.value.__notes__[0]
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-3"]

    monkeypatch.setattr(MultimodalTrainer, "evaluate", original)
    result = train(load_config(None, tiny_run_args(out, data, "--no-kernels", "--resume")))
    assert json.loads((out / "run.json").read_text())["status"] == "finished" and not partial.exists()
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert steps == 6 and result.timed_steps <= 3  # only epoch 2's steps ran in the resumed process


def test_interrupt_before_any_checkpoint_removes_the_run(tmp_path, data, monkeypatch):
    out = tmp_path / "run"

    def ctrl_c():
        raise KeyboardInterrupt

    _interrupt_at_evaluation(monkeypatch, 1, ctrl_c)
    with pytest.raises(KeyboardInterrupt) as info:
        train(load_config(None, tiny_run_args(out, data, "--no-kernels", "--optim.epochs", "1")))
    assert "removed" in info.value.__notes__[0]
    assert not out.exists() and not run_module.partial_dir(out).exists()


def test_resume_without_checkpoint_is_an_error(tmp_path, data):
    with pytest.raises(ValueError, match="resume: nothing to resume.*start afresh: run again without --resume"):
        train(load_config(None, tiny_run_args(tmp_path / "run", data, "--resume")))
    assert not (tmp_path / "run").exists() and not run_module.partial_dir(tmp_path / "run").exists()
    # a partial run whose only checkpoint is unfinished: nothing to resume, and it says how to start afresh
    unfinished = run_module.partial_dir(tmp_path / "run") / "checkpoints" / "tmp-checkpoint-3"
    unfinished.mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint.*start afresh") as info:
        train(load_config(None, tiny_run_args(tmp_path / "run", data, "--resume")))
    assert "run again without --resume" in str(info.value) and not unfinished.exists()


def test_failure_after_training_keeps_previous_finished_run(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    train(load_config(None, tiny_run_args(out, data, "--no-kernels", "--optim.epochs", "1")))
    before = (out / "metrics.json").read_text()

    def broken(*args, **kwargs):
        raise ValueError("report: disk full")

    monkeypatch.setattr("mmfast.train.report.write_test_report", broken)
    with pytest.raises(ValueError, match="disk full") as info:
        train(load_config(None, tiny_run_args(out, data, "--no-kernels", "--optim.epochs", "1", "--seed", "3")))
    assert "continue it with --resume" in info.value.__notes__[0]  # the error says what became of the output
    # the old finished run is intact; the failed one kept its checkpoint in OUT.partial
    assert (out / "metrics.json").read_text() == before
    assert json.loads((run_module.partial_dir(out) / "run.json").read_text())["status"] == "failed"


def test_init_from_refinetunes_with_the_saved_labels(finished, tmp_path):
    _, old = finished
    new = write_manifest(tmp_path / "new", n=15, seed=5, name="new.jsonl", names=["owl", "cat", "dog"])
    out = tmp_path / "again"
    result = train(load_config(None, tiny_run_args(out, new, "--init-from", str(old / "model"), "--no-kernels",
                                                   "--optim.epochs", "1")))
    assert json.loads((out / "model" / "labels.json").read_text())["names"] == ["cat", "dog", "owl"]
    assert result.test["accuracy"] >= 0
    # a label the saved model does not know is an error naming the sample
    odd = write_manifest(tmp_path / "odd", n=12, name="odd.jsonl",
                         extra=[{"id": "new-class", "text": "a one here", "label": "yak"}])
    with pytest.raises(ValueError, match="new-class"):
        train(load_config(None, tiny_run_args(tmp_path / "x", odd, "--init-from", str(old / "model"))))
    assert not (tmp_path / "x").exists() and not run_module.partial_dir(tmp_path / "x").exists()


def test_compare_kernels_reports_both(tmp_path, data, capsys):
    result = train(load_config(None, tiny_run_args(tmp_path / "run", data, "--compare-kernels",
                                                   "--optim.epochs", "1")))
    assert result.samples_per_second > 0 and result.samples_per_second_kernels_off > 0
    out = capsys.readouterr().out
    assert "kernels off" in out and "fresh copy of the initial model" in out


def _relabel(path, task):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        if task == "regression":
            row["label"] = float(["cat", "dog", "owl"].index(row["label"]))
        elif task == "multilabel":
            row["label"] = [row["label"]] + (["big"] if i % 2 else [])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("task, metrics, kind", [
    ("multilabel", {"f1_micro", "f1_macro", "subset_accuracy", "loss"}, list),
    ("regression", {"mse", "mae", "r2", "loss"}, float),
    ("contrastive", {"retrieval_accuracy", "zero_shot_accuracy", "loss"}, str),
    ("generation", {"token_accuracy", "perplexity", "loss"}, str),
])
def test_every_task_end_to_end(tmp_path, task, metrics, kind):
    data = _relabel(write_manifest(tmp_path / "data", n=24), task)
    more = ["--task", task, "--optim.epochs", "1"]
    if task in ("contrastive", "generation"):
        more += ["--data.modalities", "[image, text]"]
    result = train(load_config(None, tiny_run_args(tmp_path / "run", data, *more)))
    assert set(result.test) >= metrics
    if task == "contrastive":  # test split only: a probe on the fine-tuned image embeddings of the train split
        assert 0.0 <= result.test["linear_probe_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["validation"]) >= metrics  # the best epoch's validation metrics, by the task's metric
    rows = predict(tmp_path / "run" / "model", [json.dumps({"id": "q", "text": "a two here",
                                                            "image": str(data.parent / "media" / "data.jsonl-2.png")})])
    assert rows[0]["id"] == "q" and isinstance(rows[0]["prediction"], kind)
    assert set(evaluate(tmp_path / "run" / "model", data)["metrics"]) >= metrics
