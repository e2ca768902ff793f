"""Per-sample multimodal augmentations for the training split (data.py's raw Samples in, Samples out).

    train = AugmentedDataset(splits["train"], cfg.augment, cfg.data, seed=cfg.seed)
    train.set_epoch(epoch)     # new draws each epoch; the same (seed, epoch, index) always gives the same sample

cfg.augment (TrainConfig's section, or a dict of the same shape):
  image: crop_scale  < 1: RandomResizedCrop — a crop of area fraction U(crop_scale, 1) and aspect ratio
                     log-U(3/4, 4/3), resized back to the image's size (torchvision's rule, 10 tries, then a
                     central crop)
         flip        a horizontal flip with probability 1/2 (off by default: digits and text are not
                     mirror-invariant)
         noise       std of Gaussian pixel noise (then clipped to [0, 1])
  text:  token_dropout  probability that a word is removed;  mask  probability that a word is replaced by the
                     mask word; a text never becomes empty (one word is kept)
  audio: noise       std of Gaussian noise (full scale 1); gain_db  a gain drawn in [-gain_db, +gain_db] dB;
         shift_seconds  a time shift drawn in [-shift, +shift] s, circular (samples wrap round) or zero-filled
                     (shift_mode, default "zero"); then clipped to [-1, 1]
  modality_dropout  per sample, each present modality is dropped (set to None: masked by the collator, not
                     zero-filled) with this probability, in random order, never the last one left
  mixup             batch-level: the fusion model's (ignored here)
Probability 0 / scale 1 / std 0 leave a sample exactly as it is. Inputs are never modified in place.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["augment_image", "augment_text", "augment_audio", "modality_dropout", "augment_sample",
           "augment_enabled", "AugmentedDataset", "MASK_TOKEN"]

MASK_TOKEN = "[MASK]"
_SECTIONS = {
    "image": {"crop_scale": 1.0, "flip": False, "noise": 0.0},
    "text": {"token_dropout": 0.0, "mask": 0.0},
    "audio": {"noise": 0.0, "gain_db": 0.0, "shift_seconds": 0.0, "shift_mode": "zero"},
}


# ------------------------------------------------------------------------------------------------ image


def augment_image(image: np.ndarray, rng: np.random.Generator, crop_scale: float = 1.0, flip: bool = False,
                  noise: float = 0.0) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] -> the same shape, dtype and range."""
    out = image
    h, w = image.shape[:2]
    if crop_scale < 1.0:
        top, left, ch, cw = _crop_box(h, w, crop_scale, rng)
        out = _resize(out[top:top + ch, left:left + cw], h, w)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if noise > 0:
        out = np.clip(out + rng.normal(0.0, noise, out.shape), 0.0, 1.0)
    return np.ascontiguousarray(out, dtype=np.float32) if out is not image else image.copy()


def _crop_box(h: int, w: int, min_scale: float, rng) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with scale (min_scale, 1) and ratio (3/4, 4/3)."""
    area = h * w
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    # fallback: a central crop of the extreme allowed ratio (the whole image when its ratio is inside)
    in_ratio = w / h
    if in_ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float (h', w', C) array (PIL "F" mode per channel: exact float, no 8-bit rounding)."""
    from PIL import Image

    if image.shape[:2] == (h, w):
        return image
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).resize(
        (w, h), Image.BILINEAR)) for c in range(image.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ text


def augment_text(text: str, rng: np.random.Generator, token_dropout: float = 0.0, mask: float = 0.0,
                 mask_token: str = MASK_TOKEN) -> str:
    """Word dropout and masking on whitespace-separated words; never returns an empty text."""
    if token_dropout <= 0 and mask <= 0:
        return text
    words = text.split()
    if not words:
        return text
    drop = rng.random(len(words)) < token_dropout
    masked = rng.random(len(words)) < mask
    if drop.all():  # keep one word (as it is), so the text is never emptied by augmentation
        keep = int(rng.integers(len(words)))
        drop[keep] = False
        masked[keep] = False
    return " ".join(mask_token if m else word for word, d, m in zip(words, drop, masked) if not d)


# ------------------------------------------------------------------------------------------------ audio


def augment_audio(audio: np.ndarray, rng: np.random.Generator, sampling_rate: int, noise: float = 0.0,
                  gain_db: float = 0.0, shift_seconds: float = 0.0, shift_mode: str = "zero") -> np.ndarray:
    """float32 (S,) in [-1, 1] -> the same shape, dtype and range."""
    out = audio.astype(np.float32, copy=True)
    if shift_seconds > 0:
        limit = int(round(shift_seconds * sampling_rate))
        shift = int(rng.integers(-limit, limit + 1)) if limit > 0 else 0
        if shift:
            if shift_mode == "circular":
                out = np.roll(out, shift)
            elif shift_mode == "zero":
                shifted = np.zeros_like(out)
                if abs(shift) < len(out):
                    if shift > 0:
                        shifted[shift:] = out[:-shift]
                    else:
                        shifted[:shift] = out[-shift:]
                out = shifted
            else:
                raise ValueError(f"augment.audio.shift_mode: expected 'zero' or 'circular', got {shift_mode!r}")
    if gain_db > 0:
        out *= np.float32(10.0 ** (rng.uniform(-gain_db, gain_db) / 20.0))
    if noise > 0:
        out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    if gain_db > 0 or noise > 0:
        np.clip(out, -1.0, 1.0, out=out)
    return out


# ------------------------------------------------------------------------------------------------ cross-modal


def modality_dropout(sample: dict, rng: np.random.Generator, p: float,
                     modalities=("text", "image", "audio")) -> dict:
    """A copy of sample where each present modality is set to None with probability p — visited in random
    order so none is favoured, and never the last one present (a sample must keep some input)."""
    out = dict(sample)
    if p <= 0:
        return out
    present = [m for m in modalities if out.get(m) is not None]
    for i in rng.permutation(len(present)):
        left = sum(out.get(m) is not None for m in present)
        if left > 1 and rng.random() < p:
            out[present[i]] = None
    return out


# ------------------------------------------------------------------------------------------------ config


def _value(cfg, key, default):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _settings(cfg) -> dict:
    """The augment section as plain numbers, validated (errors name the key)."""
    allowed = set(_SECTIONS) | {"modality_dropout", "mixup"}
    if isinstance(cfg, dict):
        unknown = [k for k in cfg if k not in allowed]
        if unknown:
            raise ValueError(f"augment.{unknown[0]}: unknown option; the options are {', '.join(sorted(allowed))}")
    out: dict = {}
    for section, defaults in _SECTIONS.items():
        sub = _value(cfg, section, None)
        if isinstance(sub, dict):
            unknown = [k for k in sub if k not in defaults]
            if unknown:
                raise ValueError(f"augment.{section}.{unknown[0]}: unknown option; the options are "
                                 f"{', '.join(defaults)}")
        out[section] = {key: _value(sub, key, default) for key, default in defaults.items()}
    out["modality_dropout"] = _value(cfg, "modality_dropout", 0.0)
    checks = [("image", "crop_scale", lambda v: 0 < v <= 1, "in (0, 1]"),
              ("image", "noise", lambda v: v >= 0, ">= 0"),
              ("text", "token_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
              ("text", "mask", lambda v: 0 <= v <= 1, "in [0, 1]"),
              ("audio", "noise", lambda v: v >= 0, ">= 0"),
              ("audio", "gain_db", lambda v: v >= 0, ">= 0"),
              ("audio", "shift_seconds", lambda v: v >= 0, ">= 0")]
    for section, key, ok, expected in checks:
        value = out[section][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"augment.{section}.{key}: expected a number {expected}, got {value!r}")
    p = out["modality_dropout"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"augment.modality_dropout: expected a probability in [0, 1), got {p!r}")
    if not isinstance(out["image"]["flip"], bool):
        raise ValueError(f"augment.image.flip: expected true/false, got {out['image']['flip']!r}")
    if out["audio"]["shift_mode"] not in ("zero", "circular"):
        raise ValueError(f"augment.audio.shift_mode: expected 'zero' or 'circular', got {out['audio']['shift_mode']!r}")
    return out


def augment_enabled(cfg) -> bool:
    """Whether any per-sample augmentation is on (mixup, batch-level, is not counted)."""
    s = _settings(cfg)
    return bool(s["image"]["crop_scale"] < 1 or s["image"]["flip"] or s["image"]["noise"] > 0
                or s["text"]["token_dropout"] > 0 or s["text"]["mask"] > 0 or s["audio"]["noise"] > 0
                or s["audio"]["gain_db"] > 0 or s["audio"]["shift_seconds"] > 0 or s["modality_dropout"] > 0)


def augment_sample(sample: dict, settings: dict, rng: np.random.Generator, sampling_rate: int,
                   mask_token: str = MASK_TOKEN) -> dict:
    """One sample through every augmentation (settings: _settings(cfg)); a new dict, the input untouched.
    Modality dropout comes first, so no work is spent on what is dropped."""
    out = modality_dropout(sample, rng, settings["modality_dropout"])
    if out.get("image") is not None:
        out["image"] = augment_image(out["image"], rng, **settings["image"])
    if out.get("text") is not None:
        out["text"] = augment_text(out["text"], rng, mask_token=mask_token, **settings["text"])
    if out.get("audio") is not None:
        out["audio"] = augment_audio(out["audio"], rng, sampling_rate, **settings["audio"])
    return out


class AugmentedDataset(torch.utils.data.Dataset):
    """dataset (of Samples) with augmentations drawn from a generator seeded by (seed, epoch, index): the same
    sample for the same triple in any process, worker or order — so runs reproduce and resume exactly.

    set_epoch(epoch) (the trainer calls it at each epoch's start) changes the draws. The epoch lives in shared
    memory, so DataLoader workers, persistent ones too, see it change."""

    def __init__(self, dataset, augment_cfg=None, data_cfg=None, seed: int = 0, mask_token: str = MASK_TOKEN,
                 sampling_rate: int | None = None):
        self.dataset = dataset
        self.settings = _settings(augment_cfg)
        self.enabled = augment_enabled(augment_cfg)
        rate = sampling_rate or _value(data_cfg, "sampling_rate", None)
        if rate is None and self.settings["audio"]["shift_seconds"] > 0:
            raise ValueError("augment.audio.shift_seconds: needs the sampling rate (pass data_cfg or sampling_rate)")
        self.sampling_rate = int(rate or 16000)
        self.seed = int(seed) & 0xFFFFFFFF  # SeedSequence wants non-negative entropy
        self.mask_token = mask_token
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if not self.enabled:
            return sample
        rng = np.random.default_rng([self.seed, self.epoch, int(index) % len(self)])
        return augment_sample(sample, self.settings, rng, self.sampling_rate, self.mask_token)

    def __getattr__(self, name):
        # ids / labels / records of the wrapped split stay reachable (reports, class weights)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
