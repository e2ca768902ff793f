"""mmfast.train.augment: each augmentation does what it says, keeps shape/dtype/range, and is reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmfast.train.augment import (AugmentedDataset, _crop_box, augment_audio, augment_enabled, augment_image,
                                  augment_text, modality_dropout)
from mmfast.train.config import AugmentConfig, DataConfig


def _rng(seed=0):
    return np.random.default_rng(seed)


def _image(h=16, w=16, seed=0):
    return _rng(seed).random((h, w, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ image


def test_image_off_is_identity_and_a_copy():
    image = _image()
    out = augment_image(image, _rng(), crop_scale=1.0, flip=False, noise=0.0)
    assert np.array_equal(out, image) and out is not image


def test_image_crop_keeps_shape_dtype_range_and_zooms_in():
    image = np.zeros((16, 16, 3), np.float32)
    image[:, 8:] = 1.0  # left half black, right half white: a crop moves the edge
    changed = 0
    for seed in range(20):
        out = augment_image(image, _rng(seed), crop_scale=0.3)
        assert out.shape == image.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        changed += not np.allclose(out, image)
    assert changed >= 15


def test_crop_box_area_and_aspect_follow_random_resized_crop():
    rng = _rng(1)
    for h, w in ((32, 32), (20, 40)):
        areas, ratios = [], []
        for _ in range(400):
            top, left, ch, cw = _crop_box(h, w, 0.4, rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
            areas.append(ch * cw / (h * w))
            ratios.append(cw / ch)
        assert min(areas) >= 0.4 - 0.06 and max(areas) <= 1.0  # rounding to whole pixels
        assert min(ratios) >= 3 / 4 - 0.08 and max(ratios) <= 4 / 3 + 0.08
        assert np.mean(areas) < 0.85  # crops really are smaller than the image on average


def test_flip_is_a_mirror_half_of_the_time_and_only_when_enabled():
    image = _image()
    flips = sum(np.array_equal(augment_image(image, _rng(s), flip=True), image[:, ::-1]) for s in range(200))
    assert 70 <= flips <= 130
    assert all(np.array_equal(augment_image(image, _rng(s), flip=False), image) for s in range(20))


def test_image_noise_statistics():
    image = np.full((64, 64, 3), 0.5, np.float32)  # mid-gray: clipping does not bias the std
    out = augment_image(image, _rng(), noise=0.05)
    assert out.dtype == np.float32 and abs(float((out - image).std()) - 0.05) < 0.003
    assert abs(float((out - image).mean())) < 0.003
    clipped = augment_image(np.ones((8, 8, 3), np.float32), _rng(), noise=0.5)
    assert clipped.max() <= 1.0 and clipped.min() >= 0.0


# ------------------------------------------------------------------------------------------------ text


def test_text_off_is_identity():
    assert augment_text("  keep   this spacing ", _rng()) == "  keep   this spacing "


def test_token_dropout_and_mask_statistics():
    words = [f"w{i}" for i in range(1000)]
    out = augment_text(" ".join(words), _rng(), token_dropout=0.3).split()
    assert 0.25 < 1 - len(out) / 1000 < 0.35
    assert out == [w for w in words if w in set(out)]  # the kept words, in order
    out = augment_text(" ".join(words), _rng(), mask=0.2, mask_token="<m>").split()
    assert len(out) == 1000 and 0.16 < out.count("<m>") / 1000 < 0.24
    assert all(o == w or o == "<m>" for o, w in zip(out, words))


def test_text_is_never_emptied():
    for seed in range(50):
        assert augment_text("one", _rng(seed), token_dropout=0.99) == "one"
        out = augment_text("a b c", _rng(seed), token_dropout=0.99, mask=0.5)
        assert len(out.split()) >= 1 and out.split()[0] in ("a", "b", "c")  # the kept word is never masked


# ------------------------------------------------------------------------------------------------ audio


def _sine(n=8000, amp=0.25):
    return (amp * np.sin(2 * np.pi * 440 * np.arange(n) / 8000)).astype(np.float32)


def test_audio_off_is_identity():
    wave = _sine()
    out = augment_audio(wave, _rng(), 8000)
    assert np.array_equal(out, wave) and out is not wave


def test_audio_gain_stays_within_the_db_range():
    wave = _sine()
    gains = []
    for s in range(100):
        out = augment_audio(wave, _rng(s), 8000, gain_db=6.0)
        ratio = float(np.abs(out).max() / np.abs(wave).max())
        gains.append(20 * math.log10(ratio))
        assert np.allclose(out, wave * ratio, atol=1e-6)  # a gain, nothing else
    assert -6.01 <= min(gains) < -4 and 4 < max(gains) <= 6.01


def test_audio_noise_statistics_and_range():
    wave = np.zeros(20000, np.float32)
    out = augment_audio(wave, _rng(), 8000, noise=0.02)
    assert out.dtype == np.float32 and out.shape == wave.shape and abs(float(out.std()) - 0.02) < 0.001
    loud = augment_audio(np.full(100, 0.99, np.float32), _rng(), 8000, noise=0.5, gain_db=12)
    assert loud.max() <= 1.0 and loud.min() >= -1.0


def test_audio_shift_circular_and_zero():
    wave = np.arange(1, 801, dtype=np.float32) / 1000
    shifts = set()
    for s in range(40):
        out = augment_audio(wave, _rng(s), 8000, shift_seconds=0.01, shift_mode="circular")  # up to 80 samples
        k = int(np.argmax(out == wave[0]))
        k = k if k <= 400 else k - 800
        assert np.array_equal(out, np.roll(wave, k)) and abs(k) <= 80
        shifts.add(k)
        z = augment_audio(wave, _rng(s), 8000, shift_seconds=0.01, shift_mode="zero")
        if k > 0:
            assert np.all(z[:k] == 0) and np.array_equal(z[k:], wave[:-k])
        elif k < 0:
            assert np.all(z[k:] == 0) and np.array_equal(z[:k], wave[-k:])
    assert len(shifts) > 20 and min(shifts) < 0 < max(shifts)


# ------------------------------------------------------------------------------------------------ modality dropout


def _sample(**kw):
    base = {"id": "s", "text": "hello there", "image": _image(8, 8), "audio": _sine(400), "label": "cat"}
    base.update(kw)
    return base


def test_modality_dropout_never_empties_a_sample_and_masks_with_none():
    for s in range(200):
        sample = _sample()
        out = modality_dropout(sample, _rng(s), 0.95)
        kept = [m for m in ("text", "image", "audio") if out[m] is not None]
        assert len(kept) >= 1
        assert all(out[m] is None for m in ("text", "image", "audio") if m not in kept)  # None, not zeros
        assert sample["text"] is not None and sample["image"] is not None  # the input is untouched
        only = modality_dropout(_sample(image=None, audio=None), _rng(s), 0.95)
        assert only["text"] == "hello there"


def test_modality_dropout_rate_and_fairness():
    counts = {"text": 0, "image": 0, "audio": 0}
    n = 3000
    for s in range(n):
        out = modality_dropout(_sample(), _rng(s), 0.3)
        for m in counts:
            counts[m] += out[m] is None
    # each modality is dropped close to p (a bit less: the last one left is kept), and none is favoured
    rates = [c / n for c in counts.values()]
    assert all(0.22 < r < 0.31 for r in rates), counts
    assert max(rates) - min(rates) < 0.04, counts
    out = modality_dropout(_sample(), _rng(), 0.0)
    assert all(out[m] is not None for m in counts)


# ------------------------------------------------------------------------------------------------ the dataset


class _Samples(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.items = [_sample(id=f"s{i}", image=_image(8, 8, seed=i)) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


def _cfg(**kw):
    cfg = AugmentConfig()
    cfg.image.crop_scale, cfg.image.noise = 0.5, 0.05
    cfg.text.token_dropout, cfg.text.mask = 0.3, 0.2
    cfg.audio.noise, cfg.audio.gain_db, cfg.audio.shift_seconds = 0.01, 3.0, 0.005
    cfg.modality_dropout = 0.3
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def _same(a, b):
    def eq(x, y):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            return isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and np.array_equal(x, y)
        return x == y

    return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)


def test_dataset_is_deterministic_per_seed_epoch_index():
    base = _Samples()
    one = AugmentedDataset(base, _cfg(), DataConfig(), seed=7)
    two = AugmentedDataset(base, _cfg(), DataConfig(), seed=7)
    forward = [one[i] for i in range(16)]
    backward = [two[i] for i in reversed(range(16))][::-1]  # order does not matter
    assert all(_same(a, b) for a, b in zip(forward, backward))
    one.set_epoch(1)
    assert one.epoch == 1 and sum(_same(a, one[i]) for i, a in enumerate(forward)) <= 1
    other = AugmentedDataset(base, _cfg(), DataConfig(), seed=8)
    assert sum(_same(a, other[i]) for i, a in enumerate(forward)) <= 1
    images = [s["image"] for s in forward if s["image"] is not None]
    assert 6 <= len(images) < 16  # modality dropout at 0.3 removed some
    assert all(i.shape == (8, 8, 3) and i.dtype == np.float32 and 0 <= i.min() and i.max() <= 1 for i in images)
    assert all(any(s[m] is not None for m in ("text", "image", "audio")) for s in forward)
    assert len(one) == 16 and one.items is base.items  # the wrapped split's attributes stay reachable


def _keep(sample):
    return sample


def test_dataset_workers_see_the_epoch_and_match_the_main_process():
    base = _Samples(8)
    data = AugmentedDataset(base, _cfg(), DataConfig(), seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2, persistent_workers=True,
                                         collate_fn=_keep)  # the default would turn arrays into tensors
    for epoch in (0, 2):
        data.set_epoch(epoch)  # after the persistent workers exist: they read the shared epoch
        from_workers = list(loader)
        expected = [data[i] for i in range(8)]
        assert all(_same(a, b) for a, b in zip(from_workers, expected)), epoch


def test_disabled_augmentation_returns_samples_unchanged_and_config_errors():
    base = _Samples(4)
    data = AugmentedDataset(base, AugmentConfig(), DataConfig(), seed=0)
    assert not augment_enabled(AugmentConfig()) and all(_same(data[i], base[i]) for i in range(4))
    assert augment_enabled({"modality_dropout": 0.1}) and augment_enabled({"image": {"flip": True}})
    assert not augment_enabled({"mixup": 0.4})  # batch-level, not this module's
    for cfg, key in (({"image": {"crop_scale": 0.0}}, "augment.image.crop_scale"),
                     ({"text": {"token_dropout": 1.0}}, "augment.text.token_dropout"),
                     ({"audio": {"gain_db": -1}}, "augment.audio.gain_db"),
                     ({"modality_dropout": 1.0}, "augment.modality_dropout"),
                     ({"audio": {"shift_mode": "reflect"}}, "augment.audio.shift_mode"),
                     ({"image": {"blur": 1}}, "augment.image.blur"),
                     ({"cutmix": 1}, "augment.cutmix")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            AugmentedDataset(base, cfg, DataConfig())
