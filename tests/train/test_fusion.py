"""FusionModel: kernels on/off with the same parameters, missing modalities, heads, mixup, save/load, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import ops
from mmfast.train.config import TrainConfig
from mmfast.train.data import LabelSpace
from mmfast.train.fusion import FusionModel, build_fusion_bundle

NAMES = ["cat", "dog", "owl"]
WORDS = ["zero", "one", "two"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a CPU shared with other jobs many times faster (two
    threads spin-wait for each other on every small op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(task="classification", modalities=("text", "image", "audio"), **model):
    cfg = TrainConfig()
    cfg.task = task
    cfg.data.modalities = list(modalities)
    cfg.data.image_size, cfg.data.max_audio_seconds, cfg.data.max_text_length = 16, 0.25, 12
    cfg.model.dim, cfg.model.heads, cfg.model.kv_heads, cfg.model.dropout = 16, 2, 1, 0.0
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def tiny_samples(n=12, seed=0, task="classification", missing=True):
    """The class is in every modality: a bright image column band, a word, a tone frequency. With missing=True
    some samples lack text, image or audio (never all three)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = i % 3
        image = rng.random((16, 16, 3), dtype=np.float32) * 0.2
        image[:, 5 * y:5 * y + 5] += 0.7
        t = np.arange(int(rng.integers(1200, 2001))) / 8000
        audio = (0.5 * np.sin(2 * np.pi * (500 + 700 * y) * t)).astype(np.float32)
        label = {"classification": NAMES[y], "multilabel": NAMES[: y + 1], "regression": float(y) * 2.0}[task]
        sample = {"id": f"s{i}", "text": f"a {WORDS[y]} here", "image": image, "audio": audio, "label": label}
        if missing:
            drop = [None, "text", "image", "audio", ("image", "audio")][i % 5]
            for key in (drop if isinstance(drop, tuple) else (drop,)):
                if key:
                    sample[key] = None
        out.append(sample)
    return out


def tiny_bundle(task="classification", modalities=("text", "image", "audio"), samples=None, mixup=0.0, seed=0,
                **model):
    cfg = tiny_cfg(task, modalities, **model)
    cfg.augment.mixup, cfg.seed = mixup, seed
    samples = samples if samples is not None else tiny_samples(task=task)
    labels = LabelSpace(task=task, names=[] if task == "regression" else list(NAMES))
    return build_fusion_bundle(cfg, labels, samples), samples


def open_gates(model, value=0.7):
    """Fresh gates are zero (blocks = identity); open them so the fusion path matters in comparisons."""
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.cross_attn.gate.fill_(value)
            block.ff_gate.fill_(value)


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}


class Counter:
    def __init__(self, monkeypatch, owner, name):
        self.calls, original = 0, getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def test_kernels_on_off_same_parameters_same_results(monkeypatch):
    bundle, samples = tiny_bundle()
    model = bundle.model.eval()
    open_gates(model)
    batch = bundle.collate(samples[:10])
    assert not batch["image_mask"].all() and (batch["audio_lengths"] == 0).any()
    assert (batch["attention_mask"].sum(1) == 0).any()
    op = Counter(monkeypatch, ops, "cross_modal_attention")
    ce = Counter(monkeypatch, ops, "cross_entropy")
    sdpa = Counter(monkeypatch, F, "scaled_dot_product_attention")

    loss0, logits0, grads0 = run(model, batch)
    assert (op.calls, ce.calls, sdpa.calls) == (0, 0, 4)  # 3 encoders' self-attention + 1 fusion block, on SDPA
    report = mmfast.patch(model)
    assert len(report.attention.swapped) == 4 and not report.attention.left_alone
    assert [name for name, detail in report.attention.swapped.items() if "gate fused into the op" in detail] \
        == ["fusion.blocks.0.cross_attn"], report
    assert list(report.loss.swapped) == [""] and not report.loss.left_alone, report
    assert model.config._attn_implementation == "mmfast"
    loss1, logits1, grads1 = run(model, batch)
    assert (op.calls, ce.calls, sdpa.calls) == (4, 1, 4)  # now the fused op and the fused loss, no SDPA
    assert model.fused_loss is True
    mmfast.unpatch(model)
    assert model.fused_loss is False
    loss2, logits2, grads2 = run(model, batch)
    assert (op.calls, ce.calls, sdpa.calls) == (4, 1, 8)

    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys() and len(grads0) == len(list(model.parameters()))
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(logits2, logits0, rtol=0, atol=0)
    model.set_attn_implementation("eager")  # the other transformers path: plain matmul-softmax attention
    torch.testing.assert_close(model(**batch).logits, logits0, rtol=1e-5, atol=1e-6)
    assert (op.calls, sdpa.calls) == (4, 8)
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("kernels", [False, True])
def test_sample_without_media_gets_exactly_the_residual(kernels):
    bundle, samples = tiny_bundle()
    model = bundle.model.eval()
    open_gates(model)
    if kernels:
        mmfast.patch(model)
    batch = bundle.collate(samples[:5])  # s4 has neither image nor audio
    assert not batch["image_mask"][4] and batch["audio_lengths"][4] == 0 and batch["image_mask"][0]
    seen = {}
    hook = model.fusion.blocks[0].cross_attn.register_forward_hook(
        lambda module, args, kwargs, out: seen.update(x=kwargs["residual"], out=out), with_kwargs=True)
    logits = model(**batch).logits.detach()
    hook.remove()
    assert torch.equal(seen["out"][4], seen["x"][4])  # no key: attention adds exactly nothing
    assert not torch.allclose(seen["out"][0], seen["x"][0])
    # Its (placeholder) media are masked, not zero-filled into the keys: changing them changes nothing ...
    other = dict(batch, pixel_values=batch["pixel_values"].clone(), input_values=batch["input_values"].clone())
    other["pixel_values"][4] += 1.0
    other["input_values"][4] += 0.5
    torch.testing.assert_close(model(**other).logits.detach(), logits, rtol=0, atol=0)
    # ... while a present image does matter.
    other["pixel_values"][0] += 1.0
    changed = model(**other).logits.detach()
    assert not torch.allclose(changed[0], logits[0]) and torch.equal(changed[1:], logits[1:])
    if kernels:
        mmfast.unpatch(model)


def test_collate_masks_and_errors():
    bundle, samples = tiny_bundle()
    batch = bundle.collate(samples[:5])
    assert batch["attention_mask"][1].sum() == 0 and batch["attention_mask"][0].sum() > 0  # s1: no text
    assert batch["image_mask"].tolist() == [True, True, False, True, False]
    assert batch["audio_lengths"][3] == 0 and batch["audio_lengths"][0] == len(samples[0]["audio"])
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 2, 0, 1]
    unlabeled = [dict(s, label=None) for s in samples[:3]]
    assert "labels" not in bundle.collate(unlabeled)
    with pytest.raises(ValueError, match="sample s1: has no label"):
        bundle.collate([samples[0], dict(samples[1], label=None)])
    with pytest.raises(ValueError, match="sample lonely: has none of the model's modalities"):
        bundle.collate([{"id": "lonely", "text": None, "image": None, "audio": None, "label": "cat"}])
    with pytest.raises(ValueError, match="sample s0: label 'zebra'|zebra"):
        bundle.collate([dict(samples[0], label="zebra")])
    with pytest.raises(ValueError, match="sample s0: image must be float"):
        bundle.collate([dict(samples[0], image=np.zeros((16, 16), np.float32))])
    with pytest.raises(ValueError, match="pixel_values: the model was built with the image modality"):
        bundle.model(**{k: v for k, v in batch.items() if k != "pixel_values"})
    # A larger image is resized to the encoder's size.
    big = dict(samples[0], image=np.ones((40, 24, 3), np.float32))
    assert bundle.collate([big])["pixel_values"].shape == (1, 3, 16, 16)


def test_save_load_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from mmfast.train.bundle import load_bundle

    bundle, samples = tiny_bundle()
    model = bundle.model.eval()
    open_gates(model, 0.3)
    batch = bundle.collate(samples[:6])
    logits = model(**batch).logits.detach()
    bundle.save(str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "labels.json").exists()

    alone = FusionModel.from_pretrained(str(tmp_path / "m")).eval()  # the directory alone rebuilds it
    torch.testing.assert_close(alone(**batch).logits, logits, rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert tokenizer("a two here")["input_ids"] == bundle.processor.tokenizer("a two here")["input_ids"]

    loaded = load_bundle(str(tmp_path / "m"))
    assert loaded.kind == "fusion" and loaded.labels.names == NAMES
    loaded.model.eval()
    batch2 = loaded.collate(samples[:6])
    assert batch2.keys() == batch.keys() and all(torch.equal(batch2[k], batch[k]) for k in batch)
    torch.testing.assert_close(loaded.model(**batch2).logits, logits, rtol=0, atol=0)
    assert loaded.predict(loaded.model, batch2) == [NAMES[int(i)] for i in logits.argmax(-1)]
    assert set(loaded.embeddings) == {"text", "image", "audio"}


def test_heads_and_losses():
    bundle, samples = tiny_bundle("multilabel", samples=tiny_samples(task="multilabel"))
    model = bundle.model.eval()
    batch = bundle.collate(samples[:6])
    assert batch["labels"].shape == (6, 3) and batch["labels"][2].tolist() == [1.0, 1.0, 1.0]
    out = model(**batch)
    assert out.logits.shape == (6, 3)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, batch["labels"]))
    predictions = bundle.predict(model, batch)
    assert all(isinstance(p, list) and set(p) <= set(NAMES) for p in predictions)

    bundle, samples = tiny_bundle("regression", samples=tiny_samples(task="regression"))
    model = bundle.model.eval()
    targets = np.array([s["label"] for s in samples])
    assert model.config.target_mean == pytest.approx(targets.mean())
    assert model.config.target_std == pytest.approx(targets.std())
    batch = bundle.collate(samples[:6])
    out = model(**batch)
    assert out.logits.shape == (6,) and batch["labels"].dtype == torch.float32
    std = model.config.target_std
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits / std, batch["labels"] / std))
    assert all(isinstance(p, float) for p in bundle.predict(model, batch))

    bundle, samples = tiny_bundle()
    model = bundle.model.eval()
    batch = bundle.collate(samples[:6])
    logits = model(**batch).logits
    soft = torch.softmax(torch.randn(6, 3), -1)
    loss = model(**dict(batch, labels=soft)).loss
    torch.testing.assert_close(loss, -(soft * logits.log_softmax(-1)).sum(-1).mean())
    torch.testing.assert_close(model(**batch).loss, F.cross_entropy(logits, batch["labels"]))


@pytest.mark.parametrize("kernels", [False, True])
def test_mixup_mixes_pooled_features_and_labels(monkeypatch, kernels):
    bundle, samples = tiny_bundle(mixup=0.4)
    model = bundle.model
    open_gates(model)
    if kernels:
        mmfast.patch(model)
    batch = bundle.collate(samples[:6])
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    monkeypatch.setattr(np.random, "beta", lambda a, b: 0.3 if (a, b) == (0.4, 0.4) else None)
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: perm)
    heads = []
    hook = model.head.register_forward_pre_hook(lambda module, args: heads.append(args[0].detach()))

    model.eval()  # no mixup outside training
    plain = model(**batch)
    torch.testing.assert_close(plain.loss, F.cross_entropy(plain.logits, batch["labels"]))
    model.train()  # dropout is 0, so training differs from eval only by mixup
    mixed = model(**batch)
    hook.remove()
    pooled = heads[0]
    torch.testing.assert_close(heads[1], 0.3 * pooled + 0.7 * pooled[perm])
    y = batch["labels"]
    expected = 0.3 * F.cross_entropy(mixed.logits, y) + 0.7 * F.cross_entropy(mixed.logits, y[perm])
    torch.testing.assert_close(mixed.loss, expected)
    # the same as cross-entropy against the mixed soft labels
    soft = 0.3 * F.one_hot(y, 3).float() + 0.7 * F.one_hot(y[perm], 3).float()
    torch.testing.assert_close(mixed.loss, -(soft * mixed.logits.log_softmax(-1)).sum(-1).mean())
    mixed.loss.backward()
    assert model.fusion.queries.weight.grad is not None
    if kernels:
        mmfast.unpatch(model)


def test_single_modality_and_ungated_models():
    bundle, samples = tiny_bundle(modalities=("text",))
    assert len(bundle.model.fusion.blocks) == 0 and set(bundle.model.encoders) == {"text"}
    with pytest.raises(ValueError, match="sample s1: has none of the model's modalities text"):
        bundle.collate(samples[:2])
    texts = [s for s in samples if s["text"] is not None][:4]
    out = bundle.model(**bundle.collate(texts))
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)

    bundle, samples = tiny_bundle(modalities=("image",), gated=False, layers=2)
    model = bundle.model.eval()
    assert len(model.fusion.blocks) == 2 and model.fusion.blocks[0].ff_gate is None
    with_image = [s for s in samples if s["image"] is not None][:4]
    batch = bundle.collate(with_image)
    logits = model(**batch).logits.detach()
    mmfast.patch(model)
    torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-5, atol=1e-6)
    mmfast.unpatch(model)


def test_learns_a_multimodal_task_fast():
    """The same small model as the demo default (scaled down) fits a 3-class task in a few dozen steps (kernels
    off: their equality with the kernels on is tested above, and this stays fast on a busy CPU)."""
    samples = tiny_samples(48, seed=1)
    bundle, _ = tiny_bundle(samples=samples)
    model = bundle.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = np.random.default_rng(0)
    for _ in range(60):
        batch = bundle.collate([samples[i] for i in generator.choice(len(samples), 16, replace=False)])
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    test = tiny_samples(30, seed=2)
    predictions = bundle.predict(model, bundle.collate(test))
    accuracy = np.mean([p == s["label"] for p, s in zip(predictions, test)])
    assert accuracy >= 0.9, accuracy


def test_image_only_model_learns_where_things_are():
    """The class is only WHERE a bright patch-sized square is: every image holds the same patch contents (one
    square, the rest dark noise), so only the patch positions tell the classes apart, and they must matter from
    the start (a small position init left the demo's image-only model at chance)."""
    rng = np.random.default_rng(3)

    def sample(i):
        y = i % 3
        image = rng.random((16, 16, 3), dtype=np.float32) * 0.1
        image[4:8, 4 * y:4 * y + 4] = 0.9  # the 4x4 patch (1, y) of the 16x16 image's 4x4 grid
        return {"id": f"p{i}", "text": None, "image": image, "audio": None, "label": NAMES[y]}

    samples, test = [sample(i) for i in range(48)], [sample(i) for i in range(30)]
    bundle, _ = tiny_bundle(modalities=("image",), samples=samples)
    assert bundle.model.config.encoders["image"]["patch_size"] == 4
    model = bundle.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        batch = bundle.collate([samples[i] for i in rng.choice(len(samples), 16, replace=False)])
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    predictions = bundle.predict(model, bundle.collate(test))
    assert np.mean([p == s["label"] for p, s in zip(predictions, test)]) >= 0.9
