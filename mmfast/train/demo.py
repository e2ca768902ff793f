"""The offline demo dataset: scikit-learn's handwritten digits as image + text + audio, a task that needs fusion.

    manifest = write_demo("~/.cache/mmfast/demo-v2")       # PNG + WAV files and manifest.jsonl; idempotent
    rows = demo_rows(seed=0, n=100)                         # the same samples in memory (tests, analyses)

Every sample's label is a digit 0-9 (the real handwritten digit of load_digits, 1797 images, each used twice
with independent corruptions: 3594 samples). Each modality carries partial, corrupted evidence of it, and the
three together mostly determine it:

  image  the 8x8 digit (stored 8x8, upscaled by the loader) seen through a random 6x6 window, the rest of the
         image replaced by noise; in 30% of the samples the whole image is noise (a failed camera).
  audio  0.25 s at 8 kHz of the digit's DTMF tone (telephone keypad: a row and a column frequency) in noise;
         only 30% carry both tones: 35% carry just the row tone ({1,2,3}, {4,5,6}, {7,8,9} or {0}) and 35%
         just the column tone ({1,4,7}, {2,5,8,0} or {3,6,9}).
  text   one hint in varied wording, e.g. "the number is odd": parity, small (< 5) / large, or prime / not prime.

No modality alone gets far, and each one matters in the fusion. Logistic regression on simple features (raw
pixels, |FFT| of the audio, bag of words; test split by source image):
  image 65%, audio 55%, text 20%;  image+text 74%, audio+text 75%, image+audio 80%;  all three 89%.
(tests/train/test_demo.py checks the margin on a subset with a ridge classifier.) Samples sharing a source image
carry the same `group`, so the splitter keeps them in one split: no handwriting seen in training is tested.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["DEMO_VERSION", "SAMPLING_RATE", "DURATION", "REPEATS", "DTMF", "write_demo", "demo_rows",
           "CLASS_NAMES"]

DEMO_VERSION = 2  # bump when the design changes: the cache folder name carries it, so caches regenerate
SAMPLING_RATE = 8000
DURATION = 0.25
REPEATS = 2
CLASS_NAMES = [str(d) for d in range(10)]
# DTMF keypad (Hz): 1 2 3 / 4 5 6 / 7 8 9 / * 0 #  -> (row, column)
_ROWS = (697, 770, 852, 941)
_COLS = (1209, 1336, 1477)
DTMF = {d: (_ROWS[(d - 1) // 3], _COLS[(d - 1) % 3]) for d in range(1, 10)} | {0: (941, 1336)}

P_IMAGE_NOISE = 0.3    # the whole image is noise
WINDOW = 6             # otherwise a WINDOW x WINDOW part of the 8x8 digit is visible
P_AUDIO_BOTH = 0.3     # both tones; the rest split evenly between row-only and column-only
AUDIO_NOISE = 0.15     # Gaussian noise std (full scale 1)
IMAGE_NOISE = 0.1      # pixel noise std on top of everything
_PRIMES = {2, 3, 5, 7}
# one hint a text: with two, audio + text alone would reach ~90% and the image would hardly matter
TEMPLATES = ("{}", "the number is {}", "it is {}", "a digit that is {}", "this one is {}")


def _hint(kind: str, digit: int) -> str:
    if kind == "parity":
        return "even" if digit % 2 == 0 else "odd"
    if kind == "size":
        return "small" if digit < 5 else "large"
    return "prime" if digit in _PRIMES else "not prime"


def demo_rows(seed: int = 0, n: int | None = None) -> list[dict]:
    """The demo's samples in memory: id, digit, image (8x8 uint8), audio (int16, 8 kHz), text, group and the
    corruption drawn (view: window|noise, tones: both|row|column, hint: parity|size|prime). Sample k depends
    only on (seed, k), so a smaller n gives a prefix of the full set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target  # (1797, 8, 8) in 0..16, (1797,)
    total = REPEATS * len(targets)
    n = total if n is None else int(n)
    if not 1 <= n <= total:
        raise ValueError(f"n: expected 1..{total} demo samples, got {n}")
    t = np.arange(int(SAMPLING_RATE * DURATION)) / SAMPLING_RATE
    rows = []
    for k in range(n):
        source = k % len(targets)  # first pass over every image, then the second
        digit = int(targets[source])
        rng = np.random.default_rng([seed, k])
        # image: the digit seen through a WINDOW x WINDOW window, the rest noise; or noise only
        clean = images[source] / 16.0
        image = rng.random((8, 8))
        if rng.random() < P_IMAGE_NOISE:
            view = "noise"
        else:
            view = "window"
            r0, c0 = rng.integers(0, 8 - WINDOW + 1, size=2)
            image[r0:r0 + WINDOW, c0:c0 + WINDOW] = clean[r0:r0 + WINDOW, c0:c0 + WINDOW]
        image = np.clip(image + rng.normal(0.0, IMAGE_NOISE, image.shape), 0.0, 1.0)
        # audio: one or both DTMF tones with random phases, in noise
        u = rng.random()
        tones = "both" if u < P_AUDIO_BOTH else ("row" if u < P_AUDIO_BOTH + (1 - P_AUDIO_BOTH) / 2 else "column")
        row_f, col_f = DTMF[digit]
        phase = rng.random(2) * 2 * np.pi
        if tones == "both":
            wave = 0.35 * np.sin(2 * np.pi * row_f * t + phase[0]) + 0.35 * np.sin(2 * np.pi * col_f * t + phase[1])
        else:
            wave = 0.5 * np.sin(2 * np.pi * (row_f if tones == "row" else col_f) * t + phase[0])
        wave = np.clip(wave + rng.normal(0.0, AUDIO_NOISE, t.shape), -1.0, 1.0)
        # text: one hint, in varied wording
        kind = ("parity", "size", "prime")[int(rng.integers(3))]
        text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(_hint(kind, digit))
        rows.append({
            "id": f"digit-{k:05d}", "digit": digit, "group": f"image-{source}", "text": text,
            "image": np.round(image * 255).astype(np.uint8),
            "audio": np.round(wave * 32767).astype(np.int16),
            "view": view, "tones": tones, "hint": kind,
        })
    return rows


def _complete(folder: Path, meta: dict) -> bool:
    try:
        return json.loads((folder / "demo.json").read_text())["key"] == meta["key"] and \
            (folder / "manifest.jsonl").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_demo(folder, seed: int = 0, n: int | None = None) -> Path:
    """Write the demo (images/*.png, audio/*.wav, manifest.jsonl, conditions.jsonl, demo.json) into folder and
    return the manifest's path. Idempotent: a complete demo of the same version/seed/n is left as it is.
    Safe with several processes at once (a file lock; files are written in a temporary folder moved in place
    at the end), and a folder holding anything else is never overwritten."""
    from PIL import Image
    from scipy.io import wavfile

    folder = Path(os.path.expanduser(str(folder)))
    meta = {"version": DEMO_VERSION, "seed": int(seed), "n": n}
    meta["key"] = f"v{DEMO_VERSION}-seed{int(seed)}-n{n}"
    if _complete(folder, meta):
        return folder / "manifest.jsonl"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent / f".{folder.name}.lock"):
        if _complete(folder, meta):  # another process wrote it while we waited
            return folder / "manifest.jsonl"
        if folder.exists():
            if not (folder / "demo.json").is_file() and any(folder.iterdir()):
                raise ValueError(f"demo: {folder} exists and is not a demo folder (no demo.json); refusing to "
                                 "overwrite it (choose another data.cache_dir)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            (tmp / "images").mkdir()
            (tmp / "audio").mkdir()
            manifest, conditions = [], []
            for row in demo_rows(seed, n):
                image, audio = f"images/{row['id']}.png", f"audio/{row['id']}.wav"
                Image.fromarray(row["image"]).save(tmp / image)
                wavfile.write(tmp / audio, SAMPLING_RATE, row["audio"])
                manifest.append({"id": row["id"], "text": row["text"], "image": image, "audio": audio,
                                 "label": str(row["digit"]), "group": row["group"]})
                conditions.append({"id": row["id"], "view": row["view"], "tones": row["tones"],
                                   "hint": row["hint"]})
            (tmp / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
            (tmp / "conditions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conditions))
            (tmp / "demo.json").write_text(json.dumps({**meta, "samples": len(manifest),
                                                       "design": __doc__.split("\n\n")[1]}, indent=2))
            if folder.exists():  # an older or different demo (it has demo.json): replaced
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder / "manifest.jsonl"


class _lock:
    """An exclusive advisory file lock (fcntl; where it does not exist, no lock: one process at a time then)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
