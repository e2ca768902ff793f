"""Tiny fixtures shared by tests/train: a two-modality PreTrainedModel small enough to train in milliseconds,
its samples and collate function, and a TrainConfig for fast runs.

TinyModel stands in for a Bundle's model where a test checks trainer mechanics (adversarial gradients,
accumulation, early stopping, output-dir handling) and must not depend on the real encoders' randomness or
cost. It has what the contract asks of a Bundle: forward(**batch) -> loss + logits, and one embedding module
per modality whose output is that modality's input embedding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class TinyConfig(PretrainedConfig):
    model_type = "mmfast_tiny_test"

    def __init__(self, image_dim=4, vocab=12, dim=8, num_labels=3, **kwargs):
        self.image_dim, self.vocab, self.dim = image_dim, vocab, dim
        super().__init__(num_labels=num_labels, **kwargs)


class TinyModel(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.image_embed = nn.Linear(config.image_dim, config.dim)   # "image" input embedding
        self.text_embed = nn.Embedding(config.vocab, config.dim)     # "text" input embedding
        self.mix = nn.Linear(config.dim, config.dim)
        self.head = nn.Linear(config.dim, config.num_labels)
        self.post_init()

    def forward(self, image=None, text=None, text_mask=None, labels=None):
        parts = []
        if image is not None:
            parts.append(torch.tanh(self.image_embed(image)))
        if text is not None:
            tokens = self.text_embed(text)
            mask = text_mask.unsqueeze(-1).to(tokens.dtype)
            parts.append((tokens * mask).sum(1) / mask.sum(1).clamp_min(1))
        # tanh makes the loss non-linear in the embeddings, so an adversarial shift changes the gradient
        hidden = torch.tanh(self.mix(sum(parts)))
        logits = self.head(hidden)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def tiny_samples(n=24, seed=0, num_labels=3):
    """Samples whose label is readable from both modalities (so a few steps learn something)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % num_labels
        image = rng.normal(0, 0.3, 4).astype(np.float32)
        image[label] += 1.0
        text = [label + 1, int(rng.integers(4, 12)), int(rng.integers(4, 12))]
        out.append({"id": f"s{i}", "image": image, "text": text, "audio": None, "label": label})
    return out


def tiny_collate(samples):
    batch = {"image": torch.tensor(np.stack([s["image"] for s in samples])),
             "text": torch.tensor([s["text"] for s in samples]),
             "text_mask": torch.ones(len(samples), 3, dtype=torch.long)}
    if samples[0].get("label") is not None:
        batch["labels"] = torch.tensor([s["label"] for s in samples])
    return batch


def tiny_model(seed=0, num_labels=3):
    torch.manual_seed(seed)
    return TinyModel(TinyConfig(num_labels=num_labels))


NAMES = ["cat", "dog", "owl"]
WORDS = ["zero", "one", "two"]


def write_manifest(directory, n=30, seed=0, name="data.jsonl", names=NAMES, extra=None):
    """A JSONL manifest with real files: PNG images (16x16, a bright band whose column is the class), WAV
    audio (a tone whose pitch is the class, 8 kHz), a text with the class word, and the class label."""
    import json
    import wave
    from pathlib import Path

    from PIL import Image

    directory = Path(directory)
    (directory / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % len(names)
        image = (rng.random((16, 16, 3)) * 60).astype(np.uint8)
        image[:, 5 * y:5 * y + 5] += 150
        Image.fromarray(image).save(directory / "media" / f"{name}-{i}.png")
        t = np.arange(2000) / 8000
        audio = (0.5 * np.sin(2 * np.pi * (500 + 700 * y) * t) * 32767).astype(np.int16)
        with wave.open(str(directory / "media" / f"{name}-{i}.wav"), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(8000)
            f.writeframes(audio.tobytes())
        rows.append({"id": f"{name}-{i}", "text": f"a {WORDS[y % len(WORDS)]} here",
                     "image": f"media/{name}-{i}.png", "audio": f"media/{name}-{i}.wav", "label": names[y]})
    if extra:
        rows += extra
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_args(out, data, *more):
    """Overrides for a few-second real run (fusion, LoRA, 2 epochs) on write_manifest's data."""
    return ["--output_dir", str(out), "--data.path", str(data), "--data.image_size", "16",
            "--data.max_audio_seconds", "0.25", "--data.max_text_length", "8", "--model.dim", "16",
            "--model.heads", "2", "--model.kv_heads", "1", "--optim.epochs", "2", "--optim.batch_size", "8",
            "--optim.lr", "0.01", "--data.split", "[0.6, 0.2, 0.2]", *more]


def tiny_model_config(task: str, **model):
    """A TrainConfig for a tiny CLIP / LLaVA built from config (16 px images, width 32), model.* overridden."""
    from mmfast.train.config import TrainConfig

    cfg = TrainConfig()
    cfg.task = task
    cfg.data.image_size = 16
    cfg.model.dim, cfg.model.heads, cfg.model.kv_heads, cfg.model.layers = 32, 2, 1, 1
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg
