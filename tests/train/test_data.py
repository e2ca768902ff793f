"""mmfast.train.data: manifests, datasets folders, splits, LabelSpace, media decoding and the errors."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.io import wavfile

from mmfast.cli import _INPUT_ERRORS
from mmfast.train.config import ConfigError, DataConfig, load_config
from mmfast.train.data import LabelSpace, load_audio, load_eval_samples, load_image, load_samples, load_splits

NAMES = ["cat", "dog", "owl"]


def _cfg(path=None, **kw):
    kw.setdefault("image_size", 16)
    kw.setdefault("split", [0.6, 0.2, 0.2])
    return DataConfig(path=None if path is None else str(path), **kw)


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def _wav(path, rate, data):
    wavfile.write(path, rate, data)
    return path


def _tone(freq, rate, seconds=0.25, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def _dataset(folder: Path, n=30, name="data.jsonl", extra_rows=(), **row_changes):
    """A JSONL manifest with real PNG/WAV files; the label (NAMES[i % 3]) is readable in every modality."""
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        y = i % 3
        image = np.zeros((12, 12, 3), np.uint8)
        image[:, 4 * y:4 * y + 4] = 255
        _png(media / f"{name}-{i}.png", image)
        _wav(media / f"{name}-{i}.wav", 8000, (_tone(500 + 500 * y, 8000) * 32767).astype(np.int16))
        rows.append({"id": f"{name}-{i}", "text": f"word{y} here", "image": f"media/{name}-{i}.png",
                     "audio": f"media/{name}-{i}.wav", "label": NAMES[y], **row_changes})
    rows += list(extra_rows)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ manifests


def test_jsonl_manifest_splits_samples_and_labels(tmp_path):
    path = _dataset(tmp_path, n=30)
    splits, labels = load_splits(_cfg(path), "classification")
    assert labels == LabelSpace("classification", NAMES)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [18, 6, 6]
    ids = [i for s in splits.values() for i in s.ids]
    assert sorted(ids) == sorted(f"data.jsonl-{i}" for i in range(30))  # a partition: nothing lost or repeated
    for name in ("train", "validation", "test"):  # stratified: every class on every side (2 per class at least)
        assert set(Counter(splits[name].labels).values()) == {len(splits[name]) // 3}
    sample = splits["train"][0]
    assert set(sample) == {"id", "text", "image", "audio", "label"}
    assert sample["image"].shape == (16, 16, 3) and sample["image"].dtype == np.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0 and sample["image"].max() > 0.9
    assert sample["audio"].shape == (2000,) and sample["audio"].dtype == np.float32
    assert abs(float(np.abs(sample["audio"]).max()) - 0.5) < 0.01
    y = NAMES.index(sample["label"])
    assert sample["text"] == f"word{y} here"
    # the bright band of the image is the class's columns (12 -> 16 pixels: columns scale by 4/3)
    band = sample["image"][:, :, 0].mean(0)
    assert band[int((4 * y + 2) * 16 / 12)] > 0.9
    # a fresh copy each access: changing it does not change the dataset
    sample["image"][:] = 0
    assert splits["train"][0]["image"].max() > 0.9


def test_split_is_deterministic_and_follows_the_seed(tmp_path):
    path = _dataset(tmp_path, n=30)
    first = load_splits(_cfg(path), "classification")[0]["test"].ids
    again = load_splits(_cfg(path), "classification")[0]["test"].ids
    other = load_splits(_cfg(path), "classification", seed=1)[0]["test"].ids
    assert first == again and first != other


def test_unstratified_when_a_class_has_one_sample(tmp_path):
    path = _dataset(tmp_path, n=12, extra_rows=[{"id": "lone", "text": "x", "label": "emu"}])
    splits, labels = load_splits(_cfg(path), "classification")
    assert "emu" in labels.names and sum(len(s) for s in splits.values()) == 13


def test_csv_manifest_empty_cells_and_multilabel(tmp_path):
    media = tmp_path / "m"
    media.mkdir()
    _png(media / "a.png", np.full((4, 4), 128, np.uint8))
    rows = [{"id": f"r{i}", "text": "" if i == 0 else f"t {i}", "image": "m/a.png" if i % 2 == 0 else "",
             "label": "cat|dog" if i % 2 else "owl"} for i in range(10)]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    splits, labels = load_splits(_cfg(path, split=[0.6, 0.2, 0.2]), "multilabel")
    assert labels.names == NAMES
    samples = {s["id"]: s for d in splits.values() for s in (d[i] for i in range(len(d)))}
    assert samples["r0"]["text"] is None and samples["r0"]["image"] is not None  # empty cell -> missing
    assert samples["r1"]["image"] is None and samples["r1"]["label"] == ["cat", "dog"]
    assert labels.encode(samples["r1"]["label"], "r1") == [1.0, 1.0, 0.0]
    assert samples["r0"]["image"].shape == (16, 16, 3)
    assert np.allclose(samples["r0"]["image"], 128 / 255)


def test_separate_split_manifests_and_carving(tmp_path):
    train = _dataset(tmp_path, n=20, name="train.jsonl")
    test = _dataset(tmp_path, n=6, name="test.jsonl")
    val = _dataset(tmp_path, n=6, name="val.jsonl")
    splits, _ = load_splits(DataConfig(train=str(train), validation=str(val), test=str(test)), "classification")
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [20, 6, 6]
    assert all(i.startswith("test.jsonl") for i in splits["test"].ids)
    # validation not given: carved from train in data.split's proportions (0.8 : 0.1 -> 1/9 of train)
    splits, _ = load_splits(DataConfig(train=str(train), test=str(test)), "classification")
    assert len(splits["validation"]) == 2 and len(splits["train"]) == 18 and len(splits["test"]) == 6
    with pytest.raises(ValueError, match="data.path or data.train"):
        load_splits(DataConfig(path=str(train), test=str(test)), "classification")


def test_split_and_group_columns(tmp_path):
    rows = [{"id": f"s{i}", "text": f"t{i}", "label": NAMES[i % 3], "split": ["train", "val", "test"][i % 3]}
            for i in range(9)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, _ = load_splits(_cfg(path), "classification")
    assert splits["validation"].ids == ["s1", "s4", "s7"]  # "val" is an alias of validation
    # groups: samples sharing a group never straddle two splits
    rows = [{"id": f"g{i}", "text": "t", "label": NAMES[(i // 4) % 3], "group": f"grp{i // 4}"} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, _ = load_splits(_cfg(path), "classification")
    where = {}
    for name, d in splits.items():
        for i in d.ids:
            where.setdefault(f"grp{int(i[1:]) // 4}", set()).add(name)
    assert all(len(v) == 1 for v in where.values()) and len(where) == 15
    assert {len(d) for d in splits.values()} <= {12, 36}  # whole groups of 4 moved


# ------------------------------------------------------------------------------------------------ media


def test_image_modes_become_rgb_float(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    cases = {
        "L": Image.fromarray(gray),
        "RGBA": Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 7)])),
        "P": Image.fromarray(gray).convert("P"),
        "I;16": Image.fromarray((gray.astype(np.uint16) * 257)),
    }
    for mode, image in cases.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        image.save(path)
        out = load_image(str(path), None, "s")
        assert out.shape == (8, 8, 3) and out.dtype == np.float32, mode
        assert np.allclose(out[..., 0], gray / 255, atol=1.5 / 255), mode  # 16-bit scaled by 65535, not clipped
        assert np.array_equal(out[..., 0], out[..., 2]), mode
    resized = load_image(str(tmp_path / "L.png"), 32, "s")
    assert resized.shape == (32, 32, 3) and 0 <= resized.min() and resized.max() <= 1
    # arrays (datasets columns): HW uint8, CHW float, and clipping
    assert np.allclose(load_image(gray, None, "s")[..., 1], gray / 255)
    chw = np.stack([gray / 255.0] * 3).astype(np.float32) * 2
    assert load_image(chw, 4, "s").shape == (4, 4, 3) and load_image(chw, None, "s").max() == 1.0


def test_audio_formats_channels_and_resampling(tmp_path):
    tone = _tone(1000, 16000, seconds=0.5)
    stereo = np.stack([tone, tone * 0.5], axis=1)
    files = {
        "int16": (stereo * 32767).astype(np.int16),
        "int32": (stereo * 2**31 * 0.999).astype(np.int32),
        "float32": stereo.astype(np.float32),
        "uint8": np.round(stereo * 127 + 128).astype(np.uint8),
    }
    for kind, data in files.items():
        path = _wav(tmp_path / f"{kind}.wav", 16000, data)
        out = load_audio(str(path), 8000, 0.25, "s")
        assert out.dtype == np.float32 and out.shape == (2000,), kind  # resampled to 8 kHz, cut to 0.25 s
        spectrum = np.abs(np.fft.rfft(out))
        assert abs(np.argmax(spectrum) * 8000 / len(out) - 1000) <= 4, kind  # still a 1 kHz tone
        assert abs(np.abs(out[200:-200]).max() - 0.375) < 0.02, kind  # mono = mean of 0.5 and 0.25
    # no resampling, no cut: exact
    path = _wav(tmp_path / "plain.wav", 8000, (tone[:3000] * 32767).astype(np.int16))
    assert np.array_equal(load_audio(str(path), 8000, None, "s"), (tone[:3000] * 32767).astype(np.int16) / 32768)
    arr = load_audio({"array": tone, "sampling_rate": 16000}, 8000, None, "s")
    assert arr.shape == (len(tone) // 2,)


# ------------------------------------------------------------------------------------------------ modalities


def test_modalities_not_selected_are_none_and_not_read(tmp_path):
    path = _dataset(tmp_path, n=12)
    (tmp_path / "media" / "data.jsonl-3.wav").unlink()  # a missing audio file does not matter for image-only
    splits, _ = load_splits(_cfg(path, modalities=["image"]), "classification")
    for d in splits.values():
        for i in range(len(d)):
            s = d[i]
            assert s["image"] is not None and s["text"] is None and s["audio"] is None
    with pytest.raises(FileNotFoundError, match=r"data.jsonl-3.*data.jsonl-3.wav"):
        load_splits(_cfg(path), "classification")


def test_missing_modalities_per_sample_are_none(tmp_path):
    path = _dataset(tmp_path, n=9, extra_rows=[{"id": "textonly", "text": "hello", "label": "cat"},
                                               {"id": "imageonly", "image": "media/data.jsonl-0.png", "label": "dog"}])
    samples = {s["id"]: s for s in load_samples(str(path), _cfg())}
    assert samples["textonly"]["image"] is None and samples["textonly"]["audio"] is None
    assert samples["imageonly"]["text"] is None and samples["imageonly"]["image"].shape == (16, 16, 3)
    with pytest.raises(ValueError, match=r"'imageonly' has none of the modalities text, audio"):
        load_splits(_cfg(path, modalities=["text", "audio"]), "classification")


# ------------------------------------------------------------------------------------------------ errors


def _one_row(tmp_path, row, n=9):
    return _dataset(tmp_path, n=n, extra_rows=[row])


@pytest.mark.parametrize("row,error,words", [
    ({"id": "bad", "image": "media/nope.png", "label": "cat"}, FileNotFoundError, ["'bad'", "nope.png"]),
    ({"id": "bad", "audio": "media/nope.wav", "label": "cat"}, FileNotFoundError, ["'bad'", "nope.wav"]),
    ({"id": "bad", "image": "media/junk.png", "label": "cat"}, ValueError, ["'bad'", "unreadable image", "junk.png"]),
    ({"id": "bad", "audio": "media/junk.wav", "label": "cat"}, ValueError, ["'bad'", "unreadable audio", "junk.wav"]),
    ({"id": "bad", "audio": "media/a.mp3", "label": "cat"}, ValueError, ["'bad'", "only .wav"]),
    ({"id": "bad", "text": "x", "label": "emu"}, ValueError, ["'bad'", "'emu'", "not in the label set"]),
    ({"id": "bad", "label": "cat"}, ValueError, ["'bad'", "none of the modalities"]),
    ({"id": "bad", "text": "x"}, ValueError, ["'bad'", "no label"]),
    ({"id": "bad", "text": "x", "label": "cat", "imgae": "a.png"}, ValueError, ["'bad'", "'imgae'", "columns are"]),
    ({"id": "bad", "text": 3, "label": "cat"}, ValueError, ["'bad'", "'text'", "string"]),
    ({"id": "data.jsonl-0", "text": "x", "label": "cat"}, ValueError, ["'data.jsonl-0'", "twice"]),
    ({"id": "bad", "text": "x", "label": "cat", "split": "holdout"}, ValueError, ["'bad'", "'split'"]),
])
def test_errors_name_the_sample_and_file(tmp_path, row, error, words):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "junk.png").write_bytes(b"this is not a png")
    (tmp_path / "media" / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    (tmp_path / "media" / "a.mp3").write_bytes(b"ID3")
    path = _one_row(tmp_path, row)
    with pytest.raises(error) as info:
        load_splits(_cfg(path, labels=NAMES if row.get("label") == "emu" else None), "classification")
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_config_errors(tmp_path):
    path = _dataset(tmp_path, n=6)
    with pytest.raises(ValueError, match=r"validation split is empty"):
        load_splits(_cfg(path, split=[0.9, 0.0, 0.1]), "classification")
    with pytest.raises(ValueError, match=r"test split is empty after splitting 6 samples"):
        load_splits(_cfg(path, split=[0.9, 0.09, 0.01]), "classification")
    with pytest.raises(ValueError, match=r"data.split"):
        load_splits(_cfg(path, split=[0.5, 0.5, 0.5]), "classification")
    with pytest.raises(ValueError, match=r"data.modalities"):
        load_splits(_cfg(path, modalities=["video"]), "classification")
    with pytest.raises(ValueError, match=r"task"):
        load_splits(_cfg(path), "ranking")
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl"):
        load_splits(_cfg(tmp_path / "missing.jsonl"), "classification")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "x", "label": "cat"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_splits(_cfg(tmp_path / "bad.jsonl"), "classification")


# ------------------------------------------------------------------------------------------------ bad data files
# Every one is a single line naming the sample (or the manifest line) and the file, and of a type the CLI reports
# as an input error (one line, exit code 2).


def _input_error(info, *words):
    message = str(info.value)
    assert isinstance(info.value, _INPUT_ERRORS), type(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


def _text_manifest(folder: Path, bad_row: dict, n=9) -> Path:
    """n text-only rows, then bad_row on line n + 1 (media paths relative to the folder)."""
    rows = [{"id": f"ok{i}", "text": f"word{i % 3}", "label": NAMES[i % 3]} for i in range(n)] + [bad_row]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wav_bytes(data=None, rate=8000) -> bytes:
    out = io.BytesIO()
    wavfile.write(out, rate, (_tone(440, rate, 0.05) * 32767).astype(np.int16) if data is None else data)
    return out.getvalue()


def _with_format_tag(wav: bytes, tag: int) -> bytes:  # the fmt chunk's encoding field (bytes 20-21)
    return wav[:20] + struct.pack("<H", tag) + wav[22:]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few dozen bytes: what a decompression bomb looks like
    before it is decoded."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _png_bytes(fmt="PNG", side=24) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)).save(out, fmt)
    return out.getvalue()


_WAV = _wav_bytes()
_BAD_AUDIO = {  # file name: (bytes, words the message must hold besides the sample and the file)
    "cut_header.wav": (_WAV[:30], ["unreadable audio", "struct.error"]),
    "cut_data.wav": (_WAV[:300], ["cut short", "expected"]),
    "empty.wav": (b"", ["empty (0 bytes)"]),
    "no_channels.wav": (_WAV[:22] + struct.pack("<H", 0) + _WAV[24:], ["unreadable audio"]),
    "alaw.wav": (_with_format_tag(_WAV, 6), ["ALAW"]),
    "mp3_in_wav.wav": (_with_format_tag(_WAV, 0x55), ["MPEGLAYER3"]),
    "int64.wav": (_wav_bytes(np.zeros(100, np.int64)), ["unsupported sample format int64"]),
    "nan.wav": (_wav_bytes(np.full(100, np.nan, np.float32)), ["NaN"]),
    "not_riff.wav": (b"ID3\x04" + bytes(100), ["not understood"]),
}


@pytest.mark.parametrize("name", sorted(_BAD_AUDIO))
def test_broken_wav_files_name_the_sample_and_file(tmp_path, name):
    data, words = _BAD_AUDIO[name]
    (tmp_path / name).write_bytes(data)
    path = _text_manifest(tmp_path, {"id": "bad", "audio": name, "label": "cat"})
    with pytest.raises(_INPUT_ERRORS) as info:
        load_splits(_cfg(path), "classification")
    _input_error(info, "'bad'", str(tmp_path / name), f"{path}:10", *words)


def test_audio_paths_that_are_not_files(tmp_path):
    (tmp_path / "folder.wav").mkdir()
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    for name, words in (("folder.wav", ["is a folder"]), ("dangling.wav", ["broken symbolic link", "gone.wav"]),
                        ("nowhere.wav", ["not found"])):
        path = _text_manifest(tmp_path, {"id": "bad", "audio": name, "label": "cat"})
        with pytest.raises(_INPUT_ERRORS) as info:
            load_splits(_cfg(path), "classification")
        _input_error(info, "'bad'", name, f"{path}:10", *words)
    os.mkfifo(tmp_path / "pipe.wav")  # reading it would block forever
    with pytest.raises(ValueError, match=r"'s'.*pipe.wav is not a regular file"):
        load_audio(str(tmp_path / "pipe.wav"), 8000, None, "s")


def test_audio_arrays_and_mappings_that_are_not_audio():
    cases = [
        ([[0.1, 0.2], [0.3]], "not an array of samples"),
        (np.zeros((100, 0), np.float32), "no channels"),
        (np.zeros((2, 3, 4), np.float32), "shape (2, 3, 4)"),
        (np.array(["a", "b"]), "numeric array"),
        (np.zeros(0, np.float32), "no samples"),
        ({"array": np.zeros(10, np.float32), "sampling_rate": -8000}, "sampling rate"),
        ({"array": np.zeros(10, np.float32), "sampling_rate": "fast"}, "sampling rate"),
        ({"bytes": _WAV[:30], "path": "clip.wav"}, "clip.wav"),
        ({"path": None}, "a mapping without"),
    ]
    for source, words in cases:
        with pytest.raises(ValueError) as info:
            load_audio(source, 8000, None, "s9")
        _input_error(info, "'s9'", words)


def test_datasets_audio_feature_with_damaged_bytes_names_the_folder(tmp_path):
    import datasets

    good = {"bytes": _WAV, "path": "clip.wav"}
    ds = datasets.Dataset.from_dict({"audio": [good] * 8 + [{"bytes": _WAV[:300], "path": "cut.wav"}],
                                     "label": [NAMES[i % 3] for i in range(9)]})
    # cast, not built with the feature: encoding Audio features needs torchcodec, decoding them here does not
    ds.cast_column("audio", datasets.Audio(decode=False)).save_to_disk(tmp_path / "hf")
    with pytest.raises(ValueError) as info:
        load_splits(_cfg(tmp_path / "hf"), "classification")
    _input_error(info, str(tmp_path / "hf"), "'row:8'", "cut.wav", "cut short")


_PNG = _png_bytes()
_JPEG = _png_bytes("JPEG")
_BAD_IMAGES = {
    "cut.png": (_PNG[: len(_PNG) // 2], ["unreadable image", "truncated"]),
    "cut.jpg": (_JPEG[: len(_JPEG) // 2], ["unreadable image"]),
    "junk.png": (b"not an image at all", ["not an image format"]),
    "empty.png": (b"", ["empty (0 bytes)"]),
    "bomb.png": (_png_header_only(30_000, 30_000), ["30000x30000 = 900000000 pixels", "data.max_image_pixels"]),
}


@pytest.mark.parametrize("name", sorted(_BAD_IMAGES))
def test_broken_and_huge_images_name_the_sample_and_file(tmp_path, name):
    data, words = _BAD_IMAGES[name]
    (tmp_path / name).write_bytes(data)
    path = _text_manifest(tmp_path, {"id": "bad", "image": name, "label": "cat"})
    with pytest.raises(_INPUT_ERRORS) as info:
        load_splits(_cfg(path), "classification")
    _input_error(info, "'bad'", str(tmp_path / name), f"{path}:10", *words)


def test_image_pixel_limit_is_configurable_and_leaves_pil_alone(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(_PNG)  # 24 x 24
    (tmp_path / "dir.png").mkdir()
    path = _text_manifest(tmp_path, {"id": "big", "image": "a.png", "label": "cat"})
    with pytest.raises(ValueError) as info:
        load_splits(_cfg(path, max_image_pixels=24 * 24 - 1), "classification")
    _input_error(info, "'big'", "a.png", "24x24 = 576 pixels", "data.max_image_pixels = 575")
    splits, _ = load_splits(_cfg(path, max_image_pixels=24 * 24), "classification")
    assert any(d[i]["image"] is not None for d in splits.values() for i in range(len(d)))
    assert DataConfig().max_image_pixels == Image.MAX_IMAGE_PIXELS  # PIL's own default
    # PIL's module-wide limit neither stands in for the caller's limit nor is changed by a load
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(str(tmp_path / "a.png"), None, "s", max_pixels=None).shape == (24, 24, 3)
    assert load_image(str(tmp_path / "a.png"), None, "s", max_pixels=1000).shape == (24, 24, 3)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ValueError, match=r"'s'.*dir.png is a folder, not a file"):
        load_image(str(tmp_path / "dir.png"), 8, "s")
    with pytest.raises(ValueError, match=r"'s'.*800x600 = 480000 pixels"):
        load_image(Image.new("RGB", (800, 600)), 8, "s", max_pixels=1000)
    with pytest.raises(ValueError, match=r"'s'.*not an array of pixels"):
        load_image([[0, 1], [2]], 8, "s")
    with pytest.raises(ConfigError, match=r"data.max_image_pixels"):
        load_config(None, ["--data.max_image_pixels", "0"])
    assert load_config(None, ["--data.max_image_pixels", "null"]).data.max_image_pixels is None


# tiny files: the headers, where parsers trip, are most of the bytes
_TINY_MEDIA = {"wav": _wav_bytes(np.arange(8, dtype=np.int16).reshape(4, 2)), "png": _png_bytes("PNG", 4),
               "jpeg": _png_bytes("JPEG", 4)}


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["wav", "png", "jpeg"]), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=4))
def test_damaged_media_bytes_give_a_value_error_or_a_valid_sample(kind, cut, flips):
    data = bytearray(_TINY_MEDIA[kind])
    for where, value in flips:
        data[int(where * len(data))] = value
    data = bytes(data[: max(1, int(cut * len(data)))])
    try:
        out = load_audio(data, 8000, None, "s") if kind == "wav" else load_image(data, 8, "s")
    except ValueError as e:
        assert "'s'" in str(e) and "\n" not in str(e)
    else:
        assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("name,data,words", [
    ("data.jsonl", b'{"id": "a", "text": "x", "label": "cat"}\n{"id": "b", "text": "caf\xe9", "label": "cat"}\n',
     [":2: not UTF-8", "0xe9", "byte offset 65"]),
    ("data.csv", b"id,text,label\na,x,cat\nb,caf\xe9,cat\n", [":3: not UTF-8", "0xe9", "byte offset 27"]),
    ("data.json", b'[{"id": "a", "text": "x", "label": "cat"},\n {"id": "b", "text": "\xff"}]',
     [":2: not UTF-8", "0xff"]),
    ("data.csv", "id,text,label\na,x,cat\n".encode("utf-16"), [":1: not UTF-8", "byte offset 0"]),
    ("data.csv", b"id,text,label\na,x\0y,cat\n", [":2: holds NUL bytes"]),
    ("data.jsonl", b'{"id": "a", "text": "x", "label": "cat"}\n{"id": "b", "text": "\\ud800", "label": "cat"}\n',
     [":2: sample 'b'", "lone surrogate"]),
    ("data.csv", b"id,text,label\na,x,cat\nb,\"y,cat\nc,z,dog\n", [":3: not valid CSV"]),  # a quote left open
    ("data.csv", b"id,text,label\na,\"x\"y,cat\n", [":2: not valid CSV"]),
    ("data.jsonl", b"", ["is empty (0 bytes)"]),
    ("data.csv", b"", ["is empty (0 bytes)"]),
    ("data.json", b"", ["is empty (0 bytes)"]),
    ("data.jsonl", b"\n  \n", ["is empty (no samples)"]),
    ("data.csv", b"id,text,label\n", ["a header line but no samples"]),
    ("data.csv", b"id,text,label\n\n\n", ["a header line but no samples"]),
    ("data.json", b"[]", ["an empty list (no samples)"]),
])
def test_manifest_text_errors_name_the_file_and_line(tmp_path, name, data, words):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(_INPUT_ERRORS) as info:
        load_splits(_cfg(path), "classification")
    _input_error(info, str(path), *words)


def test_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "excel.csv"
    rows = "".join(f"r{i},word{i % 3},{NAMES[i % 3]}\n" for i in range(9))
    path.write_bytes(b"\xef\xbb\xbf" + f"id,text,label\n{rows}".encode())
    splits, labels = load_splits(_cfg(path), "classification")
    assert labels.names == NAMES and sum(len(d) for d in splits.values()) == 9


def test_sources_that_are_not_readable_manifests(tmp_path):
    good = _text_manifest(tmp_path, {"id": "last", "text": "x", "label": "cat"})
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError) as info:  # an empty split file
        load_splits(DataConfig(train=str(good), test=str(tmp_path / "empty.jsonl")), "classification")
    _input_error(info, "empty.jsonl", "empty")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "dangling.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        load_splits(_cfg(tmp_path / "dangling.jsonl"), "classification")
    _input_error(info, "dangling.jsonl", "broken symbolic link", "gone.jsonl")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "manifest.jsonl").mkdir()  # a folder where the folder's manifest belongs
    with pytest.raises(ValueError) as info:
        load_splits(_cfg(tmp_path / "folder"), "classification")
    _input_error(info, str(tmp_path / "folder" / "manifest.jsonl"), "is a folder, not a file")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text("{not json")
    with pytest.raises(ValueError) as info:
        load_splits(_cfg(tmp_path / "hf"), "classification")
    _input_error(info, str(tmp_path / "hf"), "not a readable datasets folder")


def test_row_errors_name_the_manifest_line(tmp_path):
    path = _text_manifest(tmp_path, {"id": "bad", "text": "x", "label": "emu"})
    with pytest.raises(ValueError) as info:
        load_splits(_cfg(path, labels=NAMES), "classification")
    _input_error(info, f"{path}:10: sample 'bad'", "'emu'")
    path = _text_manifest(tmp_path, {"id": "ok2", "text": "x", "label": "cat"})
    with pytest.raises(ValueError) as info:
        load_splits(_cfg(path), "classification")
    _input_error(info, "'ok2' appears twice", f"{path}:10", f"{path}:3")


# ------------------------------------------------------------------------------------------------ datasets folders


def test_datasets_folder_dict_with_image_features_and_class_labels(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)) for _ in range(12)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "audio": datasets.List(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(names=NAMES)})
    def part(idx):
        return datasets.Dataset.from_dict({"image": [images[i] for i in idx], "text": [f"t{i}" for i in idx],
                                           "audio": [_tone(700, 8000, 0.1).astype(np.float32) for _ in idx],
                                           "label": [i % 3 for i in idx]}, features=features)
    datasets.DatasetDict({"train": part(range(6)), "validation": part(range(6, 9)),
                          "test": part(range(9, 12))}).save_to_disk(tmp_path / "hf")
    splits, labels = load_splits(_cfg(tmp_path / "hf"), "classification")
    assert labels.names == NAMES and [len(splits[s]) for s in ("train", "validation", "test")] == [6, 3, 3]
    s = splits["test"][1]
    assert s["id"] == "test:1" and s["label"] == NAMES[10 % 3] and s["text"] == "t10"
    expected = np.asarray(images[10].resize((16, 16), Image.BILINEAR), np.float32) / 255
    assert np.allclose(s["image"], expected, atol=1e-6)
    assert s["audio"].shape == (800,) and np.allclose(s["audio"], _tone(700, 8000, 0.1), atol=1e-6)
    # evaluation reads the test split
    assert [x["id"] for x in load_eval_samples(str(tmp_path / "hf"), _cfg(), "classification")] == \
        ["test:0", "test:1", "test:2"]


def test_datasets_folder_single_dataset_with_paths(tmp_path):
    import datasets

    _dataset(tmp_path, n=1)
    datasets.Dataset.from_dict({"image": ["media/data.jsonl-0.png"] * 10, "label": [NAMES[i % 2] for i in range(10)],
                                "extra": list(range(10))}).save_to_disk(tmp_path / "one")
    with pytest.raises(ValueError, match=r"unknown column\(s\) 'extra'"):
        load_splits(_cfg(tmp_path / "one"), "classification")
    import shutil

    shutil.rmtree(tmp_path / "one")
    datasets.Dataset.from_dict({"image": ["../media/data.jsonl-0.png"] * 10,
                                "label": [NAMES[i % 2] for i in range(10)]}).save_to_disk(tmp_path / "one")
    splits, _ = load_splits(_cfg(tmp_path / "one"), "classification")
    assert sum(len(d) for d in splits.values()) == 10 and splits["train"][0]["image"].shape == (16, 16, 3)


# ------------------------------------------------------------------------------------------------ predict inputs


def test_load_samples_records_and_manifests(tmp_path, monkeypatch):
    _dataset(tmp_path, n=3)
    monkeypatch.chdir(tmp_path)  # inline records: paths relative to the working directory
    out = load_samples([{"id": "a", "text": "seven"}, {"image": "media/data.jsonl-1.png"}], _cfg())
    assert out[0] == {"id": "a", "text": "seven", "image": None, "audio": None, "label": None}
    assert out[1]["id"] == "#1" and out[1]["image"].shape == (16, 16, 3)
    with pytest.raises(FileNotFoundError, match=r"'#0'.*gone.png"):
        load_samples([{"image": "gone.png"}], _cfg())
    with pytest.raises(ValueError, match=r"'#0' has none of the modalities"):
        load_samples([{"label": "cat"}], _cfg())


# ------------------------------------------------------------------------------------------------ LabelSpace


def test_label_space_tasks_and_round_trip():
    cls = LabelSpace("classification", ["b", "a"])
    assert cls.names == ["b", "a"] and cls.encode("a", "s") == 1 and cls.decode(1) == "a" and cls.num_labels == 2
    with pytest.raises(ValueError, match=r"sample 's7': label 'z' is not in the label set"):
        cls.encode("z", "s7")
    multi = LabelSpace("multilabel", ["a", "b", "c"])
    assert multi.encode(["c", "a"], "s") == [1.0, 0.0, 1.0] and multi.encode([], "s") == [0.0, 0.0, 0.0]
    assert multi.decode([0.9, 0.2, 0.5]) == ["a", "c"]
    reg = LabelSpace("regression")
    assert reg.encode("2.5", "s") == 2.5 and reg.num_labels == 1
    with pytest.raises(ValueError, match=r"'s3'.*number"):
        reg.encode("high", "s3")
    gen = LabelSpace("generation")
    assert gen.encode("a cat", "s") == "a cat"
    with pytest.raises(ValueError, match=r"'s4'.*non-empty text"):
        gen.encode("  ", "s4")
    closed = LabelSpace("contrastive", ["cat", "dog"], closed=True)
    with pytest.raises(ValueError, match=r"'s5'.*'emu'"):
        closed.encode("emu", "s5")
    assert LabelSpace("contrastive", ["cat"]).encode("a free caption", "s") == "a free caption"
    for space in (cls, multi, reg, gen, closed):
        assert LabelSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space


def test_label_sets_by_task(tmp_path):
    rows = [{"id": f"c{i}", "text": "x", "label": f"caption number {i}"} for i in range(10)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_splits(_cfg(path), "contrastive")[1].names == []  # distinct captions are not classes
    assert load_splits(_cfg(path), "generation")[1] == LabelSpace("generation", [])
    rows = [{"id": f"r{i}", "text": "x", "label": i * 0.5} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, labels = load_splits(_cfg(path), "regression")
    assert labels.names == [] and sorted(x for d in splits.values() for x in d.labels) == [i * 0.5 for i in range(10)]
    with pytest.raises(ValueError, match=r"data.labels"):
        load_splits(_cfg(path, labels=["a"]), "regression")
    # explicit label set: sorted, and classes absent from the data stay in it
    rows = [{"id": f"k{i}", "text": "x", "label": i % 2} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_splits(_cfg(path, labels=["2", "1", "0"]), "classification")[1].names == ["0", "1", "2"]
