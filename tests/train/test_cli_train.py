"""`mmfast train / predict / eval` as a user runs them (subprocesses): a cut-down demo end to end with every
output file, and bad input -> one line naming the key or sample, exit code 2, no finished-looking directory."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

ROOT = Path(__file__).resolve().parents[2]


def _mmfast(*args, timeout=170):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MMFAST_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "mmfast.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(result, *words):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("mmfast ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo (default data, fusion, LoRA, kernels on) cut down: small sizes, 6 optimizer steps."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "demo"
    result = _mmfast("train", "--output_dir", out, "--data.cache_dir", root / "cache", "--optim.max_steps", "6",
                     "--model.dim", "16", "--model.heads", "2", "--model.kv_heads", "1")
    return result, out, root


def test_cut_down_demo_writes_everything(demo):
    result, out, _ = demo
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("run.json", "config.yaml", "metrics.json", "classification_report.txt", "classification_report.json",
                 "confusion_matrix.png", "curves.png", "model/train_config.yaml", "model/labels.json",
                 "model/config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert not (out.parent / "demo.partial").exists()
    assert "weighted avg" in result.stdout and "macro avg" in result.stdout  # the report is printed
    assert "trainable parameters: method lora" in result.stdout
    assert "kernels: attention" in result.stdout and "samples/s" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_predict_and_eval_commands(demo, tmp_path):
    _, out, root = demo
    samples = tmp_path / "in.jsonl"
    samples.write_text(json.dumps({"id": "a", "text": "seven"}) + "\n" + json.dumps({"id": "b", "text": "one"}) + "\n")
    result = _mmfast("predict", out / "model", samples, '{"id": "c", "text": "three"}')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    names = json.loads((out / "model" / "labels.json").read_text())["names"]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and all(r["prediction"] in names for r in rows)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"id": f"x{i}", "text": t, "label": l}) + "\n"
                                for i, (t, l) in enumerate([("seven", names[0]), ("one", names[1])])))
    result = _mmfast("eval", out / "model", labelled)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples"] == 2
    _one_line_error(_mmfast("predict", root / "nowhere", samples), "nowhere")
    _one_line_error(_mmfast("predict", out / "model", '{"id": "z", "image": "missing.png"}'), "missing.png")


def test_bad_input_exits_2_and_leaves_no_run(tmp_path):
    out = tmp_path / "run"
    _one_line_error(_mmfast("train", "--output_dir", out, "--data.path", tmp_path / "missing.jsonl"), "missing.jsonl",
                    "output: removed")
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    _one_line_error(_mmfast("train", "--output_dir", out, "--optim.lrr", "1"), "optim.lrr", "valid keys of optim")
    config = tmp_path / "bad.yaml"
    config.write_text("method: {name: qlora}\n")
    _one_line_error(_mmfast("train", config, "--output_dir", out), "method.name", "qlora")
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def _cut_wav_manifest(folder: Path) -> Path:
    """Nine text samples, then sample 'bad' (line 10) whose WAV file ends in the middle of its data."""
    wav = io.BytesIO()
    wavfile.write(wav, 8000, np.zeros(400, np.int16))
    (folder / "cut.wav").write_bytes(wav.getvalue()[:300])
    rows = [{"id": f"ok{i}", "text": f"word{i % 3}", "label": "abc"[i % 3]} for i in range(9)]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"id": "bad", "audio": "cut.wav", "label": "a"}]))
    return path


def _latin1_csv(folder: Path) -> Path:
    path = folder / "data.csv"
    path.write_bytes("id,text,label\n".encode() + "".join(f"r{i},caf\xe9 {i},{'abc'[i % 3]}\n"
                                                          for i in range(9)).encode("latin-1"))
    return path


@pytest.mark.parametrize("make,words", [
    (_cut_wav_manifest, ["data.jsonl:10", "sample 'bad'", "cut.wav", "cut short"]),
    (_latin1_csv, ["data.csv:2", "not UTF-8", "0xe9"]),
])
def test_bad_data_is_one_line_and_leaves_no_run(tmp_path, make, words):
    out = tmp_path / "run"
    result = _mmfast("train", "--output_dir", out, "--data.path", make(tmp_path), "--optim.max_steps", "1")
    _one_line_error(result, *words)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "run.partial").exists()
