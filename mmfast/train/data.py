"""Multimodal samples for mmfast.train: manifests, datasets folders, splits, the label space, media decoding.

    splits, labels = load_splits(cfg.data, "classification")     # {"train", "validation", "test"} -> SampleDataset
    sample = splits["train"][0]    # {"id", "text", "image", "audio", "label"}
    labels.encode(sample["label"], sample["id"])                  # -> class index (multi-hot, float, text)
    samples = load_samples("inputs.jsonl", cfg.data)             # predict inputs (labels optional)
    samples = load_eval_samples("new.jsonl", cfg.data, task)    # labelled samples to re-evaluate a model on

A sample (the raw form that augment.py transforms and a Bundle's collate consumes):
    id     str, stable (error messages, predictions)
    text   str | None
    image  float32 (H, W, 3) in [0, 1], resized to data.image_size square (grayscale/RGBA/16-bit -> RGB) | None
    audio  float32 mono (S,) in [-1, 1] at data.sampling_rate, at most data.max_audio_seconds long | None
    label  class name (str) | list of class names | float | target text | None (unlabelled predict inputs)
A missing modality is None, never a zero array; so is every modality not in data.modalities (a single-modality
baseline is `--data.modalities image`), and such media are not even read.

Sources (data.path, or data.train / data.validation / data.test):
  - a manifest: .jsonl (one JSON object a line), .json (a list of objects) or .csv, with the columns
    id?, text?, image? (file path), audio? (.wav path), label, and optionally split (train / validation / test:
    the split is given) and group (samples sharing a group stay in one split: e.g. several views of one source).
    Media paths are relative to the manifest. In CSV a multi-label label is "a|b|c"; an empty cell is missing.
  - a folder written by datasets' save_to_disk: a DatasetDict (its train / validation / test splits; missing ones
    are carved from train) or one Dataset (split here). Image columns may be datasets Image features, paths
    (relative to the folder) or arrays; audio columns Audio features, .wav paths or arrays (an array is taken to
    be at data.sampling_rate unless it is a {"array", "sampling_rate"} mapping). ClassLabel ints become names.
  - a folder holding manifest.jsonl or manifest.csv (the demo's folder, for instance).
  - nothing (data.path and data.train unset): the offline demo dataset (demo.py), generated once into
    data.cache_dir (default ~/.cache/mmfast, or $MMFAST_CACHE).
Splits not given are made with data.split fractions and a fixed seed, stratified by class for single-label
classification when every class has at least 2 samples (sklearn's train_test_split).

Every error is a ValueError or FileNotFoundError, one line naming the sample id and the file (a manifest row as
path:line) or key: a missing, empty or broken-link file, a folder where a file belongs, an unreadable, damaged or
cut-short image or audio file (whatever the decoder raised), an image of more than data.max_image_pixels pixels
(refused before decoding: decompression bombs), a manifest that is empty, not UTF-8 (line and byte offset) or not
valid JSON / CSV, a label outside data.labels, an empty split, a sample with none of the selected modalities, an
unknown manifest column, a value of the wrong type.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig

__all__ = [
    "TASKS", "MODALITIES", "SPLITS", "COLUMNS", "LabelSpace", "SampleDataset", "load_splits", "load_samples",
    "load_eval_samples", "load_image", "load_audio", "demo_dir",
]

TASKS = ("classification", "multilabel", "regression", "generation", "contrastive")
MODALITIES = ("text", "image", "audio")
SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "text", "image", "audio", "label", "split", "group")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
# Decoded media of a split are kept in memory when they fit in this budget (else decoded on each access).
_CACHE_BYTES = 1 << 30


def _get(cfg, key, default=None):
    """cfg.key for dataclass/namespace configs, cfg[key] for plain dicts (tests and library callers)."""
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _data_cfg(cfg):
    """A TrainConfig is accepted too (its data section is used)."""
    return cfg.data if not isinstance(cfg, dict) and hasattr(cfg, "data") and hasattr(cfg, "task") else cfg


# ------------------------------------------------------------------------------------------------ labels


@dataclass
class LabelSpace:
    """What a label means for a task, and its encoding for the model (saved as labels.json in a model dir).

    classification: names = sorted class names; encode -> class index, decode(index) -> name.
    multilabel: names = sorted class names; encode(list of names) -> multi-hot floats, decode(multi-hot or
      probabilities, threshold 0.5) -> list of names.
    regression: names = []; encode -> float, decode -> float.
    generation: names = []; encode -> the target text, decode -> text.
    contrastive: names = the class names when labels are class names (repeated across samples, or given in
      data.labels), else [] (labels are captions); encode/decode -> the text.
    """

    task: str
    names: list[str] = field(default_factory=list)
    closed: bool = False  # contrastive only: names given by data.labels, so other labels are errors

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        self.names = [str(n) for n in self.names]
        self._index = {n: i for i, n in enumerate(self.names)}

    @property
    def num_labels(self) -> int:
        """Output width of a head: classes for (multi-label) classification, 1 for regression, 0 otherwise."""
        if self.task in ("classification", "multilabel"):
            return len(self.names)
        return 1 if self.task == "regression" else 0

    def encode(self, raw, sample_id: str = "?"):
        if raw is None:
            raise ValueError(f"sample {sample_id!r}: has no label")
        if self.task == "classification":
            name = _label_name(raw, sample_id)
            if name not in self._index:
                raise ValueError(f"sample {sample_id!r}: label {name!r} is not in the label set "
                                 f"{_short(self.names)} (data.labels)")
            return self._index[name]
        if self.task == "multilabel":
            hot = [0.0] * len(self.names)
            for name in _label_list(raw, sample_id):
                if name not in self._index:
                    raise ValueError(f"sample {sample_id!r}: label {name!r} is not in the label set "
                                     f"{_short(self.names)} (data.labels)")
                hot[self._index[name]] = 1.0
            return hot
        if self.task == "regression":
            return _label_float(raw, sample_id)
        text = _label_text(raw, sample_id)
        if self.task == "contrastive" and self.closed and text not in self._index:
            raise ValueError(f"sample {sample_id!r}: label {text!r} is not in the label set {_short(self.names)} "
                             "(data.labels)")
        return text

    def decode(self, value):
        if self.task == "classification":
            return self.names[int(value)]
        if self.task == "multilabel":
            values = np.asarray(value, dtype=np.float64).reshape(-1)
            if values.shape[0] != len(self.names):
                raise ValueError(f"labels: expected {len(self.names)} multi-label values, got {values.shape[0]}")
            return [n for n, v in zip(self.names, values) if v >= 0.5]
        if self.task == "regression":
            return float(value)
        return str(value)

    def to_dict(self) -> dict:
        out = {"task": self.task, "names": list(self.names)}
        if self.closed:
            out["closed"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict) -> LabelSpace:
        for key in ("task", "names"):
            if key not in d:
                raise ValueError(f"labels.json: missing key {key!r}")
        return cls(task=d["task"], names=list(d["names"]), closed=bool(d.get("closed", False)))


def _short(names, n=12) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return "[" + ", ".join(repr(x) for x in names[:n]) + more + "]"


def _label_name(raw, sample_id) -> str:
    if isinstance(raw, (bool, np.bool_)):
        return str(raw).lower()
    if isinstance(raw, (str, int, np.integer)):
        return str(raw)
    if isinstance(raw, (float, np.floating)) and float(raw).is_integer():
        return str(int(raw))  # CSV/pandas round trips turn 3 into 3.0
    raise ValueError(f"sample {sample_id!r}: key 'label': a class name (string or integer) was expected for "
                     f"classification, got {type(raw).__name__} {raw!r}")


def _label_list(raw, sample_id) -> list[str]:
    if isinstance(raw, str):  # CSV form "a|b"; an empty string is the empty set
        return [p.strip() for p in raw.split("|") if p.strip()]
    if isinstance(raw, (list, tuple, np.ndarray)):
        return [_label_name(r, sample_id) for r in raw]
    raise ValueError(f"sample {sample_id!r}: key 'label': a list of class names (or \"a|b\") was expected for "
                     f"multilabel, got {type(raw).__name__} {raw!r}")


def _label_float(raw, sample_id) -> float:
    try:
        if isinstance(raw, bool):
            raise TypeError
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"sample {sample_id!r}: key 'label': a number was expected for regression, got "
                         f"{type(raw).__name__} {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"sample {sample_id!r}: key 'label': {raw!r} is not a finite number")
    return value


def _label_text(raw, sample_id) -> str:
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"sample {sample_id!r}: key 'label': a non-empty text was expected, got "
                         f"{type(raw).__name__} {raw!r}")
    return raw


def _normalise_label(raw, task, sample_id):
    """The raw label in its canonical Python form (so datasets hold str / list[str] / float / str)."""
    if raw is None:
        return None
    if task == "classification":
        return _label_name(raw, sample_id)
    if task == "multilabel":
        return _label_list(raw, sample_id)
    if task == "regression":
        return _label_float(raw, sample_id)
    return _label_text(raw, sample_id)


def _label_space(task, records_by_split, given) -> LabelSpace:
    if given is not None:
        if task in ("regression", "generation"):
            raise ValueError(f"data.labels: a label set is meaningless for task {task!r}; leave it null")
        names = sorted({str(n) for n in given})
        if not names:
            raise ValueError("data.labels: an empty label set")
        return LabelSpace(task, names, closed=True)
    if task in ("regression", "generation"):
        return LabelSpace(task, [])
    seen: list[str] = []
    count = 0
    for records in records_by_split:
        for r in records:
            if r["label"] is None:
                continue
            count += 1
            seen.extend(r["label"] if task == "multilabel" else [r["label"]])
    names = sorted(set(seen))
    if task == "contrastive" and len(names) > count // 2:
        names = []  # mostly distinct captions, not class names
    if task in ("classification", "multilabel") and not names:
        raise ValueError("data: no labels found in the training data")
    # Inferred from every split (not only train) so that a class present only in validation/test, which a
    # random split can produce, is still in the label set instead of failing the run.
    return LabelSpace(task, names)


# ------------------------------------------------------------------------------------------------ media


def _check_file(path, what: str) -> None:
    """Raise unless path is a non-empty regular file. what starts the message: "sample 'x': image file".

    A FIFO or device would block or never end when read, so only regular files pass."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"{what} {path} is a broken symbolic link (to {os.readlink(path)})") from None
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:  # a parent that is a file, a symlink loop, no permission
        raise ValueError(f"{what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    if info.st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes)")


def _reason(error: BaseException) -> str:
    """A decoder's exception as one line; types other than ValueError / OSError come from parsers tripping over
    damaged bytes (struct.error, ZeroDivisionError, ...), so their name is kept to say what happened."""
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, OSError)) and text:
        return text
    kind = type(error).__name__ if type(error).__module__ == "builtins" else \
        f"{type(error).__module__}.{type(error).__name__}"
    return f"damaged or cut short ({kind}{': ' + text if text else ''})"


# PIL's decompression-bomb limit is a module global; it is set to the caller's limit for one decode at a time.
_PIXEL_LIMIT_LOCK = threading.Lock()


class _TooManyPixels(Exception):
    pass


def _check_pixels(image, max_pixels: int | None) -> None:
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise _TooManyPixels(f"{image.width}x{image.height} = {image.width * image.height} pixels")


def _decode_image(fp, max_pixels: int | None):
    """PIL.Image.open(fp), loaded; refuses (before decoding) an image of more than max_pixels pixels."""
    from PIL import Image

    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # the check below, on the declared size, says it with the sizes
            image = Image.open(fp)
            try:
                _check_pixels(image, max_pixels)
                Image.MAX_IMAGE_PIXELS = max_pixels  # frames and tiles met while decoding: PIL checks them
                image.load()
            except BaseException:
                image.close()
                raise
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    return image


def load_image(source, size: int | None, sample_id: str = "?",
               max_pixels: int | None = DataConfig.max_image_pixels) -> np.ndarray:
    """An image as float32 (size, size, 3) in [0, 1] (no resize when size is None).

    source: a file path, {"bytes", "path"} (datasets Image feature, undecoded), raw bytes, a PIL image or an array
    (H, W), (H, W, 1|3|4); uint8 is scaled by 255, uint16 by 65535, floats are clipped to [0, 1].
    max_pixels: an encoded image (file, bytes, PIL image) of more pixels is refused (None: no limit)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = _where(source)
    if isinstance(source, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(source)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"sample {sample_id!r}: key 'image': not an array of pixels ({_reason(e)})") from None
        return _array_image(array, size, sample_id)
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise ValueError(f"sample {sample_id!r}: key 'image': a mapping without 'bytes' or 'path'")
    if isinstance(source, (str, os.PathLike)):
        _check_file(source, f"sample {sample_id!r}: image file")
    # Any exception PIL raises while reading the bytes is the file's fault (parsers of damaged files raise
    # struct.error, IndexError, ... as well as OSError), so every one becomes the sample's error.
    try:
        if isinstance(source, Image.Image):
            image = source
            _check_pixels(image, max_pixels)
        else:
            image = _decode_image(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, max_pixels)
        if image.format in ("JPEG", "MPO", "TIFF", "WEBP"):  # photos: honour the camera's orientation tag
            image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            # 16/32-bit and float images: convert("RGB") would clip them to 0..255 wrongly
            array = np.asarray(image).astype(np.float32)
            scale = 1.0 if image.mode == "F" else (65535.0 if image.mode.startswith("I;16") or array.max() <= 65535
                                                   else 2.0**31 - 1)
        else:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # palette transparency: PIL warns unless it goes through RGBA
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.asarray(image, dtype=np.float32) / 255.0
    except _TooManyPixels as e:
        raise ValueError(f"sample {sample_id!r}: image {where} has {e}, more than data.max_image_pixels = "
                         f"{max_pixels} (refused before decoding: a decompression bomb? raise the limit to read it)"
                         ) from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"sample {sample_id!r}: image {where}: a frame or tile is too large for "
                         f"data.max_image_pixels = {max_pixels} ({_reason(e)})") from None
    except UnidentifiedImageError:
        raise ValueError(f"sample {sample_id!r}: unreadable image {where}: not an image format PIL reads") from None
    except Exception as e:
        raise ValueError(f"sample {sample_id!r}: unreadable image {where}: {_reason(e)}") from None
    return _array_image(array / scale, size, sample_id)


def _array_image(array: np.ndarray, size, sample_id) -> np.ndarray:
    from PIL import Image

    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) tensors from torch-style pipelines
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"sample {sample_id!r}: key 'image': an array (H, W), (H, W, 1|3|4) was expected, got "
                         f"shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif array.dtype.kind in "fiub":
        array = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"sample {sample_id!r}: key 'image': unsupported array dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"sample {sample_id!r}: key 'image': the array holds NaN or infinity")
    array = array[..., :3] if array.shape[-1] >= 3 else np.repeat(array, 3, axis=-1)  # alpha dropped, gray -> RGB
    if size is not None and array.shape[:2] != (size, size):
        array = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c])).resize((size, size),
                                                                                                 Image.BILINEAR))
                          for c in range(3)], axis=-1)
        array = np.clip(array, 0.0, 1.0)  # bilinear stays in range; this guards float rounding
    return np.ascontiguousarray(array, dtype=np.float32)


def load_audio(source, sampling_rate: int, max_seconds: float | None = None, sample_id: str = "?",
               source_rate: int | None = None) -> np.ndarray:
    """Audio as float32 mono (S,) in [-1, 1] at sampling_rate, cut to max_seconds (padding is the collator's).

    source: a .wav path, raw .wav bytes, {"bytes", "path"} (datasets Audio feature, undecoded),
    {"array", "sampling_rate"} (decoded) or an array (at source_rate, default sampling_rate). WAV: 8-bit unsigned,
    16/24/32-bit integer or 32/64-bit float PCM (other encodings, such as A-law, mu-law, ADPCM or MP3 in a WAV
    container, and files cut short are refused); channels are averaged; resampled with scipy's resample_poly."""
    from scipy.io import wavfile

    where = _where(source)
    if isinstance(source, dict):
        if source.get("array") is not None:
            source_rate = source.get("sampling_rate") or sampling_rate
            source = source["array"]
        elif source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise ValueError(f"sample {sample_id!r}: key 'audio': a mapping without 'array', 'bytes' or 'path'")
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        if isinstance(source, (str, os.PathLike)):
            _check_file(source, f"sample {sample_id!r}: audio file")
            if not str(source).lower().endswith(".wav"):
                raise ValueError(f"sample {sample_id!r}: audio file {source}: only .wav files are read (convert it, "
                                 "e.g. `ffmpeg -i in.mp3 out.wav`)")
        # scipy's parser fails on damaged headers with struct.error, ZeroDivisionError, ... as well as ValueError:
        # every exception of the read is the file's fault.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", wavfile.WavFileWarning)  # metadata chunks (LIST, bext): harmless
                # ... but a data chunk shorter than its header says is a file cut short, not a shorter recording
                warnings.filterwarnings("error", "Reached EOF prematurely", wavfile.WavFileWarning)
                rate, data = wavfile.read(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except wavfile.WavFileWarning as e:
            raise ValueError(f"sample {sample_id!r}: audio {where} is cut short ({' '.join(str(e).split())})"
                             ) from None
        except Exception as e:
            raise ValueError(f"sample {sample_id!r}: unreadable audio {where}: {_reason(e)}") from None
        data = np.asarray(data)
        if data.dtype == np.uint8:
            wave = (data.astype(np.float32) - 128.0) / 128.0
        elif data.dtype == np.int16:
            wave = data.astype(np.float32) / 32768.0
        elif data.dtype == np.int32:  # 24-bit files come left-justified in int32 too
            wave = data.astype(np.float32) / 2147483648.0
        elif data.dtype.kind == "f":
            wave = data.astype(np.float32)
        else:
            raise ValueError(f"sample {sample_id!r}: audio {where}: unsupported sample format {data.dtype} (8-bit "
                             "unsigned, 16/24/32-bit integer and float PCM are read)")
    else:
        try:
            wave = np.asarray(source)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"sample {sample_id!r}: key 'audio': not an array of samples ({_reason(e)})") from None
        if wave.dtype.kind not in "fiu":
            raise ValueError(f"sample {sample_id!r}: key 'audio': a numeric array was expected, got {wave.dtype}")
        if wave.dtype == np.int16:
            wave = wave.astype(np.float32) / 32768.0
        wave = wave.astype(np.float32)
        if wave.ndim == 2 and wave.shape[0] < wave.shape[1]:
            wave = wave.T  # (channels, samples) -> (samples, channels)
        rate = source_rate or sampling_rate
    try:
        valid_rate = not isinstance(rate, bool) and float(rate).is_integer() and float(rate) >= 1
    except (TypeError, ValueError):
        valid_rate = False
    if not valid_rate:
        raise ValueError(f"sample {sample_id!r}: audio {where}: the sampling rate must be a positive integer (Hz), "
                         f"got {rate!r}")
    rate = int(float(rate))
    if wave.ndim == 2:
        if wave.shape[1] == 0:
            raise ValueError(f"sample {sample_id!r}: audio {where}: no channels (shape {wave.shape})")
        wave = wave.mean(axis=1)  # stereo -> mono
    if wave.ndim != 1:
        raise ValueError(f"sample {sample_id!r}: audio {where}: expected mono or multi-channel samples, got shape "
                         f"{wave.shape}")
    if wave.size == 0:
        raise ValueError(f"sample {sample_id!r}: audio {where}: no samples")
    if not np.isfinite(wave).all():
        raise ValueError(f"sample {sample_id!r}: audio {where}: holds NaN or infinity")
    if max_seconds is not None:  # cut before resampling: no work on what is thrown away
        wave = wave[: int(math.ceil(max_seconds * rate)) + 1]
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, int(sampling_rate))
        wave = resample_poly(wave, int(sampling_rate) // g, rate // g).astype(np.float32)
    if max_seconds is not None:
        wave = wave[: max(1, int(round(max_seconds * sampling_rate)))]
    return np.ascontiguousarray(np.clip(wave, -1.0, 1.0), dtype=np.float32)


def _where(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"({type(source).__name__})"


# ------------------------------------------------------------------------------------------------ records
# A record is a sample before decoding: id, text, image/audio sources (path, bytes, mapping, array), label,
# plus the split/group columns used for splitting.


def _text_value(value, sample_id):
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"sample {sample_id!r}: key 'text': a string was expected, got {type(value).__name__}")
    _check_unicode(value, "text", sample_id)
    return value if value.strip() else None  # an empty text carries nothing: treated as missing


def _check_unicode(value: str, key: str, sample_id) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can encode: refused here, by sample."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"sample {sample_id!r}: key {key!r}: not valid Unicode (a lone surrogate "
                         f"{value[e.start]!r} at character {e.start})") from None


def _media_value(value, key, base: Path | None, sample_id):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.path.expanduser(str(value))  # plain strings: pathlib costs show on 10^5 samples
        if not os.path.isabs(path) and base is not None:
            path = os.path.join(base, path)
        return path
    if isinstance(value, dict):
        if value.get("path") and not value.get("bytes") and value.get("array") is None:
            return _media_value(value["path"], key, base, sample_id)
        if any(value.get(k) is not None for k in ("bytes", "array")):
            return value
        raise ValueError(f"sample {sample_id!r}: key {key!r}: a mapping without 'bytes', 'array' or 'path'")
    if isinstance(value, (list, tuple, np.ndarray, bytes, bytearray)):
        return value
    from PIL import Image

    if key == "image" and isinstance(value, Image.Image):
        return value
    raise ValueError(f"sample {sample_id!r}: key {key!r}: a file path, bytes, mapping or array was expected, got "
                     f"{type(value).__name__}")


def _record(row: dict, default_id: str, task: str | None, base: Path | None, source: str,
            allow_columns=COLUMNS) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{source}: sample {default_id!r}: a JSON object was expected, got {type(row).__name__}")
    unknown = [k for k in row if k not in allow_columns]
    sample_id = str(row["id"]) if row.get("id") not in (None, "") else default_id
    if unknown:
        raise ValueError(f"{source}: sample {sample_id!r}: unknown column(s) {', '.join(map(repr, unknown))}; the "
                         f"columns are {', '.join(allow_columns)} (rename or drop the others)")
    split = row.get("split")
    if split not in (None, ""):
        if str(split).strip().lower() not in _SPLIT_ALIASES:
            raise ValueError(f"{source}: sample {sample_id!r}: key 'split': {split!r} is not one of train, "
                             "validation, test")
        split = _SPLIT_ALIASES[str(split).strip().lower()]
    else:
        split = None
    group = row.get("group")
    label = row.get("label")
    if isinstance(label, str) and not label.strip() and task != "multilabel":
        label = None  # an empty CSV cell
    try:
        if isinstance(label, str):
            _check_unicode(label, "label", sample_id)
        return {
            "id": sample_id,
            "text": _text_value(row.get("text"), sample_id),
            "image": _media_value(row.get("image"), "image", base, sample_id),
            "audio": _media_value(row.get("audio"), "audio", base, sample_id),
            "label": _normalise_label(label, task, sample_id) if task else label,
            "split": split,
            "group": None if group in (None, "") else str(group),
            "origin": source,  # where the sample comes from, for the errors of later checks and decoding
        }
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _read_text(path: Path) -> str:
    """A manifest's text (UTF-8, a byte-order mark allowed); errors name the file, and for bytes that are not
    UTF-8 the line and the byte offset."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"data: manifest {path}: cannot read it ({e.strerror or e})") from None
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = raw.count(b"\n", 0, offset) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[offset]:02x} at byte offset {offset}); save "
                         "the file as UTF-8") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ValueError(f"{path}:{line}: holds NUL bytes (UTF-16 text? save the file as UTF-8)")
    if not text.strip():
        raise ValueError(f"data: manifest {path} is empty (no samples)")
    return text


def _read_manifest(path: Path, task: str | None) -> list[dict]:
    _check_file(path, "data: manifest")
    base = path.parent
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"data: {path}: a manifest must be .jsonl, .json or .csv (or a datasets folder)")
    text = _read_text(path)
    rows: list[tuple[str, str, Any]] = []  # (default id, where the row is, row)
    if suffix == ".jsonl":
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may stand unescaped in a string
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{n}", f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json manifest must be a list of objects (or use JSON lines, .jsonl)")
        if not data:
            raise ValueError(f"data: manifest {path} is an empty list (no samples)")
        rows = [(f"{path.name}:{i}", f"{path} item {i}", r) for i, r in enumerate(data)]
    else:
        # strict: a quote left open is an error, not a cell that swallows the rest of the file
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        start = 1  # the line where the row being read begins
        try:
            reader.fieldnames  # reads the header
            start = reader.line_num + 1
            for row in reader:
                n = reader.line_num
                if None in row:
                    raise ValueError(f"{path}:{n}: more cells than the header has columns")
                rows.append((f"{path.name}:{n}", f"{path}:{n}",
                             {k.strip(): (v if v != "" else None) for k, v in row.items()}))
                start = n + 1
        except csv.Error as e:
            raise ValueError(f"{path}:{start}: not valid CSV ({e})") from None
        if not rows:
            raise ValueError(f"data: manifest {path} has a header line but no samples")
    return [_record(row, default_id, task, base, where) for default_id, where, row in rows]


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json",
                                                                 "dataset_info.json"))


def _hf_records(ds, split_name: str, task: str | None, base: Path, source: str) -> list[dict]:
    from datasets import Audio, ClassLabel, Image

    features = ds.features
    unknown = [c for c in ds.column_names if c not in COLUMNS]
    if unknown:
        raise ValueError(f"{source}: unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
                         f"{', '.join(COLUMNS)} (rename them with Dataset.rename_column or drop them)")
    # Media are kept undecoded ({"bytes", "path"}) and decoded here with PIL / scipy: datasets' own decoders
    # need optional packages (torchcodec, soundfile) and would decode every image once more.
    for column, kind in (("image", Image), ("audio", Audio)):
        if column in features and isinstance(features[column], (Image, Audio)):
            if not isinstance(features[column], kind):
                raise ValueError(f"{source}: column {column!r} has feature type {type(features[column]).__name__}")
            ds = ds.cast_column(column, kind(decode=False))
    label_names = None
    if "label" in features:
        feat = features["label"]
        if isinstance(feat, ClassLabel):
            label_names = feat.names
        elif isinstance(getattr(feat, "feature", None), ClassLabel):  # List / Sequence of ClassLabel
            label_names = feat.feature.names
        elif isinstance(feat, list) and feat and isinstance(feat[0], ClassLabel):
            label_names = feat[0].names
    records = []
    for i, row in enumerate(ds):
        if label_names is not None and row.get("label") is not None:
            raw = row["label"]
            row = dict(row)
            row["label"] = [label_names[j] for j in raw] if isinstance(raw, list) else label_names[raw]
        records.append(_record(row, f"{split_name}:{i}", task, base, source))
    return records


def _read_source(path, task: str | None, split: str | None = None) -> dict[str, list[dict]] | list[dict]:
    """Records of a manifest (a list) or of a datasets folder (a dict by split for a DatasetDict)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        if _is_hf_folder(path):
            from datasets import DatasetDict, load_from_disk

            try:
                ds = load_from_disk(str(path))
            except Exception as e:  # datasets raises several types for a damaged folder
                raise ValueError(f"data: {path}: not a readable datasets folder: {_reason(e)}") from None
            if isinstance(ds, DatasetDict):
                out = {}
                for name in ds:
                    key = _SPLIT_ALIASES.get(name.lower())
                    if key is None:
                        raise ValueError(f"data: {path}: split {name!r} is not one of train, validation, test")
                    out[key] = _hf_records(ds[name], name, task, path, f"{path} [{name}]")
                return out
            return _hf_records(ds, "row", task, path, str(path))
        for name in ("manifest.jsonl", "manifest.csv", "manifest.json"):
            if os.path.lexists(path / name):  # a broken link or a folder by that name is reported, not skipped
                return _read_manifest(path / name, task)
        raise ValueError(f"data: {path}: a folder must be written by datasets' save_to_disk (dataset_dict.json "
                         "or state.json) or hold manifest.jsonl / manifest.csv")
    return _read_manifest(path, task)


# ------------------------------------------------------------------------------------------------ datasets


class SampleDataset(torch.utils.data.Dataset):
    """A split: records decoded into Samples (see the module docstring); picklable for DataLoader workers.

    Decoded media are cached (eagerly, at construction, so unreadable files fail before training starts) when
    the split fits in memory; otherwise each access decodes (every file was still checked to exist).
    __getitem__ returns a fresh dict with fresh arrays: augmentations and collators may change them."""

    def __init__(self, records: list[dict], cfg, name: str = "data", cache: bool | None = None):
        cfg = _data_cfg(cfg)
        self.name = name
        self.records = [{**{k: r[k] for k in ("id", "text", "image", "audio", "label")},
                         "origin": r.get("origin") or name} for r in records]
        self.modalities = _modalities(cfg)
        self.image_size = _get(cfg, "image_size", 32)
        self.sampling_rate = int(_get(cfg, "sampling_rate", 16000))
        self.max_audio_seconds = _get(cfg, "max_audio_seconds", None)
        self.max_image_pixels = _get(cfg, "max_image_pixels", DataConfig.max_image_pixels)
        for r in self.records:  # modalities not fed to the model are dropped before anything reads them
            for m in MODALITIES:
                if m not in self.modalities:
                    r[m] = None
            if all(r[m] is None for m in MODALITIES):
                raise ValueError(f"{r['origin']}: sample {r['id']!r} has none of the modalities "
                                 f"{', '.join(self.modalities)} (data.modalities)")
        if cache is None:
            per = (3 * 4 * (self.image_size or 224) ** 2 if "image" in self.modalities else 0) + \
                  (4 * self.sampling_rate * (self.max_audio_seconds or 10) if "audio" in self.modalities else 0)
            cache = per * len(self.records) <= _CACHE_BYTES
        if not cache:  # decoding happens later: at least every file is checked to be there, and not empty, now
            for r in self.records:
                for m in ("image", "audio"):
                    if isinstance(r[m], str):
                        _check_file(r[m], f"{r['origin']}: sample {r['id']!r}: {m} file")
        self._cache = [self._decode(r) for r in self.records] if cache else None

    def _decode(self, r: dict) -> dict:
        try:
            image = None if r["image"] is None else load_image(r["image"], self.image_size, r["id"],
                                                               self.max_image_pixels)
            audio = None if r["audio"] is None else load_audio(r["audio"], self.sampling_rate,
                                                               self.max_audio_seconds, r["id"])
        except FileNotFoundError as e:  # the errors name the sample and the media file; this adds the manifest
            raise FileNotFoundError(f"{r['origin']}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{r['origin']}: {e}") from None
        return {"id": r["id"], "text": r["text"], "image": image, "audio": audio, "label": r["label"]}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self.records)
        sample = self._cache[index] if self._cache is not None else self._decode(self.records[index])
        return {k: (v.copy() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v)
                for k, v in sample.items()}

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    @property
    def labels(self) -> list:
        """Raw labels, in order (stratification, class weights, reports)."""
        return [r["label"] for r in self.records]

    def __repr__(self) -> str:
        return f"SampleDataset({self.name}: {len(self)} samples, modalities {self.modalities})"


def _modalities(cfg) -> list[str]:
    modalities = list(_get(cfg, "modalities", None) or MODALITIES)
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ValueError(f"data.modalities: expected a non-empty subset of {', '.join(MODALITIES)}, got {modalities}")
    return modalities


def _split_fractions(cfg) -> tuple[float, float, float]:
    split = list(_get(cfg, "split", None) or [0.8, 0.1, 0.1])
    if len(split) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise ValueError(f"data.split: expected 3 non-negative fractions (train, validation, test) summing to 1, "
                         f"got {split}")
    return float(split[0]), float(split[1]), float(split[2])


def _divide(records: list[dict], fractions: list[float], names: list[str], task: str, seed: int,
            where: str) -> dict[str, list[dict]]:
    """records -> {name: records} with the given fractions (a fixed seed), keeping groups together and
    stratifying single-label classification where sklearn can (every class has >= 2 units on each side)."""
    from sklearn.model_selection import train_test_split

    # units: groups (samples sharing `group` stay together) or single samples
    units: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        units.setdefault(r["group"] if r["group"] is not None else f"\0{i}", []).append(i)
    keys = list(units)
    strata = None
    if task == "classification":
        unit_labels = []
        for k in keys:
            labels = {records[i]["label"] for i in units[k]}
            unit_labels.append(labels.pop() if len(labels) == 1 else None)
        if None not in unit_labels:
            strata = unit_labels
    out: dict[str, list[dict]] = {}
    remaining, remaining_strata = list(range(len(keys))), strata
    total = sum(fractions)
    for n, (name, frac) in enumerate(zip(names, fractions)):
        if n == len(names) - 1:
            taken = remaining
        else:
            share = frac / total
            total -= frac
            if share <= 0 or not remaining:
                taken = []
            elif share >= 1:
                taken, remaining = remaining, []
            else:
                # an integer size: sklearn refuses float sizes that round to an empty side
                n_take = min(len(remaining), int(round(share * len(remaining))))
                strat = None
                if remaining_strata is not None:
                    counts: dict = {}
                    for s_ in remaining_strata:
                        counts[s_] = counts.get(s_, 0) + 1
                    # sklearn needs >= 2 members per class and room for every class on both sides
                    if min(counts.values()) >= 2 and len(counts) <= min(n_take, len(remaining) - n_take):
                        strat = remaining_strata
                if n_take == 0:
                    taken, rest = [], remaining
                elif n_take == len(remaining):
                    taken, rest = remaining, []
                else:
                    taken, rest = train_test_split(remaining, train_size=n_take, random_state=seed, stratify=strat,
                                                   shuffle=True)
                if strata is not None:
                    remaining_strata = [strata[i] for i in rest]
                remaining = rest
        out[name] = [records[i] for k in sorted(taken) for i in units[keys[k]]]
    for name in names:
        if not out[name]:
            raise ValueError(f"data: the {name} split is empty after splitting {len(records)} samples of {where} "
                             f"with data.split (fractions {[round(f, 3) for f in fractions]}); give more samples "
                             "or larger fractions")
    return out


def demo_dir(cache_dir=None) -> Path:
    """Where the demo dataset lives: data.cache_dir, else $MMFAST_CACHE, else ~/.cache/mmfast (+ demo-v<N>)."""
    from .demo import DEMO_VERSION

    root = cache_dir or os.environ.get("MMFAST_CACHE") or os.path.join("~", ".cache", "mmfast")
    return Path(os.path.expanduser(str(root))) / f"demo-v{DEMO_VERSION}"


def load_splits(cfg, task: str, seed: int = 0) -> tuple[dict[str, SampleDataset], LabelSpace]:
    """({"train", "validation", "test"}: SampleDataset, LabelSpace) from cfg (the data section; a TrainConfig is
    accepted too, its data section and seed used). seed: the split seed (a fixed default, so that runs with
    different training seeds see the same split)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(cfg, dict) and hasattr(cfg, "data") and hasattr(cfg, "task"):
        seed = int(getattr(cfg, "seed", seed))
        cfg = cfg.data
    fractions = _split_fractions(cfg)
    path = _get(cfg, "path")
    given = {name: _get(cfg, name) for name in SPLITS}
    if path and any(given.values()):
        raise ValueError("data: give either data.path or data.train/validation/test, not both (data.path="
                         f"{path!r}, " + ", ".join(f"data.{k}={v!r}" for k, v in given.items() if v) + ")")
    if not path and not given["train"] and (given["validation"] or given["test"]):
        raise ValueError("data.train: missing (data.validation / data.test are given without a training split)")
    if not path and not given["train"]:
        from .demo import write_demo

        path = write_demo(demo_dir(_get(cfg, "cache_dir")))
    by_split: dict[str, list[dict]] = {}
    if path:
        source = _read_source(path, task)
        where = str(path)
        if isinstance(source, dict):
            by_split = source
        elif any(r["split"] for r in source):
            missing = next((r for r in source if not r["split"]), None)
            if missing is not None:
                raise ValueError(f"{path}: sample {missing['id']!r}: key 'split' is missing while other samples "
                                 "have one (give every sample a split, or none)")
            for r in source:
                by_split.setdefault(r["split"], []).append(r)
        else:
            by_split = {"train": source}
    else:
        where = str(given["train"])
        for name in SPLITS:
            if given[name]:
                source = _read_source(given[name], task)
                if isinstance(source, dict):
                    if name not in source and len(source) != 1:
                        raise ValueError(f"data.{name}: {given[name]} holds splits {sorted(source)} but no {name!r}")
                    source = source.get(name) or next(iter(source.values()))
                by_split[name] = source
    if "train" not in by_split or not by_split["train"]:
        raise ValueError(f"data: no training samples in {where} (the train split is empty)")
    missing = [n for n in SPLITS if n not in by_split]
    if missing:  # carve the missing splits from train, in the proportions data.split gives them
        names = ["train"] + missing
        fr = [fractions[SPLITS.index(n)] for n in names]
        if any(f <= 0 for f in fr[1:]):
            zero = [n for n, f in zip(names[1:], fr[1:]) if f <= 0]
            raise ValueError(f"data.split: the {zero[0]} split is empty (its fraction is 0 and it is not given)")
        by_split.update(_divide(by_split["train"], fr, names, task, seed, where))
    for name in SPLITS:
        if not by_split[name]:
            raise ValueError(f"data: the {name} split of {where} is empty")
    _check_ids(by_split)
    for name in SPLITS:
        for r in by_split[name]:
            if r["label"] is None:
                raise ValueError(f"{r['origin']} ({name} split): sample {r['id']!r} has no label")
    labels = _label_space(task, [by_split[n] for n in SPLITS], _get(cfg, "labels"))
    for name in SPLITS:  # every label checked now, before any training: errors name the sample and its file
        for r in by_split[name]:
            try:
                labels.encode(r["label"], r["id"])
            except ValueError as e:
                raise ValueError(f"{r['origin']}: {e}") from None
    splits = {name: SampleDataset(by_split[name], cfg, name=name) for name in SPLITS}
    return splits, labels


def _check_ids(by_split):
    seen: dict[str, tuple[str, str]] = {}
    for name, records in by_split.items():
        for r in records:
            if r["id"] in seen:
                first_split, first_origin = seen[r["id"]]
                raise ValueError(f"{r['origin']}: sample id {r['id']!r} appears twice ({first_split} and {name} "
                                 f"splits; first at {first_origin}); ids must be unique")
            seen[r["id"]] = (name, r["origin"])


def load_samples(path_or_records, cfg, task: str | None = None, split: str | None = None) -> list[dict]:
    """Samples (decoded) from a manifest / datasets folder path, or from a list of dicts (media paths relative to
    the working directory) — predict inputs: the label is optional and kept raw when present (normalised for
    `task` when it is given). A datasets folder with splits: `split` (default: test)."""
    cfg = _data_cfg(cfg)
    if isinstance(path_or_records, (str, os.PathLike)):
        source = _read_source(path_or_records, task)
        where = str(path_or_records)
        if isinstance(source, dict):
            want = split or "test"
            if want not in source:
                raise ValueError(f"data: {where} has splits {sorted(source)}; no {want!r} split")
            source = source[want]
        elif split is not None:
            source = [r for r in source if r["split"] in (None, split)]
    else:
        where = "inputs"
        source = []
        for i, row in enumerate(path_or_records):
            if not isinstance(row, dict):
                raise ValueError(f"inputs: sample #{i}: a mapping was expected, got {type(row).__name__}")
            source.append(_record(row, f"#{i}", task, Path.cwd(), where))
    by = {"samples": source}
    _check_ids(by)
    dataset = SampleDataset(source, cfg, name=where, cache=True)
    return [dataset[i] for i in range(len(dataset))]


def load_eval_samples(path, cfg, task: str) -> list[dict]:
    """Labelled samples to re-evaluate a model on: every sample of a manifest or datasets folder; of a folder
    with splits (or a manifest with a split column), its test split. Labels are required."""
    cfg = _data_cfg(cfg)
    source = _read_source(path, task)
    if isinstance(source, dict):
        if "test" not in source:
            raise ValueError(f"data: {path} has splits {sorted(source)}; evaluation reads the 'test' split")
        source = source["test"]
    elif any(r["split"] for r in source):
        source = [r for r in source if r["split"] == "test"]
    if not source:
        raise ValueError(f"data: {path}: no samples to evaluate")
    for r in source:
        if r["label"] is None:
            raise ValueError(f"data: {path}: sample {r['id']!r} has no label (evaluation needs labels)")
    _check_ids({"test": source})
    labels = _get(cfg, "labels")
    if labels is not None and task in ("classification", "multilabel"):
        space = _label_space(task, [], labels)
        for r in source:
            space.encode(r["label"], r["id"])
    dataset = SampleDataset(source, cfg, name=str(path), cache=True)
    return [dataset[i] for i in range(len(dataset))]
