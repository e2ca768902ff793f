"""Bundle: a model with everything the trainer needs around it, built by task / model kind.

    bundle = build_bundle(cfg, labels, train_samples)   # fusion | dual_encoder | generation, from cfg
    bundle = load_bundle(model_dir)                     # what Bundle.save wrote (base + adapters)

Dispatch: cfg.model.kind when set (fusion | dual_encoder | vlm), else by task: contrastive -> dual_encoder,
generation -> vlm (LLaVA-style generation), classification / multilabel / regression -> fusion. The dual
encoder and generation builders live in dual_encoder.py and generation.py (imported only when used).
load_bundle reads the directory: mmfast_bundle.json {"kind": ...} (written by those two), else config.json's
model_type "mmfast_fusion".

Batches: Bundle.collate(list of Samples) -> dict of tensors for model(**batch), with "labels" when the samples
carry labels. The fusion model's batch: input_ids / attention_mask (text; an all-zero mask row = no text),
pixel_values (B, 3, H, W) / image_mask (B,) (image presence), input_values (B, S) / audio_lengths (B,)
(0 = no audio), labels (class indices (B,), multi-hot (B, C) floats, or regression targets (B,)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Bundle", "build_bundle", "load_bundle", "model_kind"]

KINDS = ("fusion", "dual_encoder", "vlm")
_TASK_KIND = {"classification": "fusion", "multilabel": "fusion", "regression": "fusion",
              "contrastive": "dual_encoder", "generation": "vlm"}


@dataclass
class Bundle:
    model: Any                                   # transformers PreTrainedModel (or a PEFT PeftModel around one)
    collate: Callable[[list], dict[str, torch.Tensor]]
    processor: Any                               # saved beside the model (save_pretrained)
    labels: Any                                  # data.LabelSpace
    predict: Callable[[Any, dict], list]         # (model, batch) -> decoded predictions
    embeddings: dict[str, torch.nn.Module]       # modality -> module whose output is its input embedding
    save: Callable[[str], None] | None           # writes model + processor + labels.json (+ adapters)
    head_modules: list[str] = field(default_factory=list)  # the task head's module names (methods.py); [] = guess
    kind: str = ""                               # fusion | dual_encoder | vlm


def model_kind(cfg) -> str:
    """fusion | dual_encoder | vlm: cfg.model.kind, else from cfg.task."""
    kind = getattr(cfg.model, "kind", None)
    if kind is None:
        if cfg.task not in _TASK_KIND:
            raise ValueError(f"task: expected one of {', '.join(_TASK_KIND)}, got {cfg.task!r}")
        return _TASK_KIND[cfg.task]
    if kind not in KINDS:
        raise ValueError(f"model.kind: expected one of {', '.join(KINDS)} or null, got {kind!r}")
    return kind


def _builder(module_name: str, names: tuple[str, ...]):
    import importlib

    module = importlib.import_module(f"{__package__}.{module_name}")
    for name in names:
        if callable(getattr(module, name, None)):
            return getattr(module, name)
    raise ImportError(f"mmfast.train.{module_name} has none of {', '.join(names)}")


def build_bundle(cfg, labels, train_samples) -> Bundle:
    """A fresh Bundle for cfg (task, data, model, augment.mixup, seed); labels: the LabelSpace; train_samples: the
    training split (vocabularies, regression statistics)."""
    kind = model_kind(cfg)
    if kind == "fusion":
        from .fusion import build_fusion_bundle
        bundle = build_fusion_bundle(cfg, labels, train_samples)
    elif kind == "dual_encoder":
        bundle = _builder("dual_encoder", ("build_bundle", "build_dual_encoder_bundle"))(cfg, labels, train_samples)
    else:
        bundle = _builder("generation", ("build_bundle", "build_generation_bundle"))(cfg, labels, train_samples)
    if not bundle.kind:
        bundle.kind = kind
    return bundle


def load_bundle(model_dir) -> Bundle:
    """The Bundle saved in model_dir by Bundle.save. FileNotFoundError / ValueError name the directory and file."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected a saved mmfast model)")
    marker = directory / "mmfast_bundle.json"
    if marker.exists():
        kind = json.loads(marker.read_text()).get("kind")
    else:
        config = directory / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"{config}: missing; {directory} is not a saved mmfast model")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "mmfast_fusion":
            raise ValueError(f"{config}: model_type {model_type!r} without {marker.name}; {directory} is not a "
                             "saved mmfast model")
        kind = "fusion"
    if kind == "fusion":
        from .fusion import load_fusion_bundle
        bundle = load_fusion_bundle(directory)
    elif kind == "dual_encoder":
        bundle = _builder("dual_encoder", ("load_bundle", "load_dual_encoder_bundle"))(directory)
    elif kind in ("generation", "vlm"):
        bundle = _builder("generation", ("load_bundle", "load_generation_bundle"))(directory)
    else:
        raise ValueError(f"{marker}: unknown kind {kind!r}; expected fusion, dual_encoder or generation")
    if not bundle.kind:
        bundle.kind = "vlm" if kind == "generation" else kind
    return bundle
