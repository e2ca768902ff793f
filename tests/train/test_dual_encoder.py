"""mmfast.train.dual_encoder: CLIP / SigLIP contrastive fine-tuning, zero-shot, linear probe, save / load.

Everything is tiny and random (built from configs; checkpoints are save_pretrained into tmp_path and read back
through the loaders; nothing downloaded). The toy task: 16 x 16 images of one dominant colour (red, green or
blue) with noise, labelled by the colour: trivially separable, so a few training steps must beat chance.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmfast  # noqa: E402
from mmfast.train import dual_encoder as de  # noqa: E402
from mmfast.train.bundle import load_bundle  # noqa: E402
from mmfast.train.data import LabelSpace  # noqa: E402

from .conftest import tiny_model_config  # noqa: E402

NAMES = ["blue", "green", "red"]
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def colour_samples(n, seed, prefix="s"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name = NAMES[i % 3]
        image = rng.uniform(0.0, 0.3, (16, 16, 3)).astype(np.float32)
        image[..., CHANNEL[name]] += 0.6
        out.append({"id": f"{prefix}{i}", "text": None, "image": image, "audio": None, "label": name})
    return out


TRAIN = colour_samples(18, 0)
TEST = colour_samples(9, 1, "t")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads stall
    each other at every barrier while other processes run (measured here: 89 s with 2 threads under load,
    13 s with 1, for this file and its sibling together)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def labels():
    return LabelSpace(task="contrastive", names=list(NAMES))


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def trained():
    """(bundle, losses): the tiny CLIP after 24 AdamW steps on TRAIN, batches of 6 (two per class)."""
    bundle = de.build_dual_encoder_bundle(tiny_model_config("contrastive"), labels(), TRAIN)
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=3e-3)
    losses = []
    bundle.model.train()
    for step in range(24):
        start = (step * 6) % len(TRAIN)
        loss = bundle.model(**bundle.collate(TRAIN[start:start + 6])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    bundle.model.eval()
    return bundle, losses


def test_collate_pairs_images_with_class_prompts_and_names_bad_samples():
    bundle = de.build_dual_encoder_bundle(tiny_model_config("contrastive"), labels(), TRAIN)
    assert bundle.kind == "dual_encoder"
    assert set(bundle.head_modules) == {"visual_projection", "text_projection", "logit_scale"}
    batch = bundle.collate(TRAIN[:3])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "return_loss"}  # CLIP takes no labels
    assert batch["return_loss"] is True and batch["pixel_values"].shape == (3, 3, 16, 16)
    texts = bundle.processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert [t.replace(" .", ".") for t in texts] == [f"a photo of a {s['label']}." for s in TRAIN[:3]]
    # CLIP pools the text at its first eos: every row has exactly one
    assert ((batch["input_ids"] == bundle.processor.tokenizer.eos_token_id).sum(-1) == 1).all()

    unlabeled = [{**s, "label": None} for s in TRAIN[:2]]
    assert set(bundle.collate(unlabeled)) == {"pixel_values"}  # predict inputs: images only
    with pytest.raises(ValueError, match="s1"):
        bundle.collate([TRAIN[0], {**TRAIN[1], "label": None}])
    with pytest.raises(ValueError, match="'s2'.*needs an image"):
        bundle.collate([TRAIN[0], {**TRAIN[2], "image": None}])
    with pytest.raises(ValueError, match="'s0'.*list"):
        bundle.collate([{**TRAIN[0], "label": ["red", "blue"]}])
    cfg = tiny_model_config("contrastive")
    cfg.data.modalities = ["text"]
    with pytest.raises(ValueError, match="data.modalities"):
        de.build_dual_encoder_bundle(cfg, labels(), TRAIN)
    with pytest.raises(ValueError, match="model.image_encoder"):
        de.build_dual_encoder_bundle(tiny_model_config("contrastive", image_encoder="/some/vit"), labels(), TRAIN)
    cfg = tiny_model_config("contrastive")
    cfg.augment.mixup = 0.2
    with pytest.raises(ValueError, match="augment.mixup"):
        de.build_dual_encoder_bundle(cfg, labels(), TRAIN)


def test_unknown_words_and_captions():
    bundle = de.build_dual_encoder_bundle(tiny_model_config("contrastive"), labels(), TRAIN + [{**TRAIN[0], "id": "c", "label": "crimson"}])
    tokenizer = bundle.processor.tokenizer
    ids = bundle.collate([{**TRAIN[0], "label": "crimson square"}])["input_ids"][0].tolist()
    # "crimson" was a training caption: in the vocabulary; "square" was not: <unk>
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "crimson", "<unk>", "</s>"]


def test_contrastive_loss_decreases_zero_shot_and_linear_probe_beat_chance(trained):
    bundle, losses = trained
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    predictions = de.zero_shot_predict(bundle, TEST)
    assert len(predictions) == len(TEST) and set(predictions) <= set(NAMES)
    accuracy = np.mean([p == s["label"] for p, s in zip(predictions, TEST)])
    assert accuracy >= 0.75, (accuracy, predictions)  # chance is 1/3
    batch = bundle.collate(TEST)
    assert bundle.predict(bundle.model, batch) == predictions
    inputs = bundle.predict.class_inputs
    logits = de.zero_shot_logits(bundle.model, batch["pixel_values"], inputs)
    assert logits.shape == (len(TEST), len(NAMES))

    probe = de.linear_probe(bundle, TRAIN, TEST)
    assert len(probe["predictions"]) == len(TEST) and set(probe["predictions"]) <= set(NAMES)
    assert probe["classifier"].coef_.shape[0] == len(NAMES)
    assert probe["accuracy"] >= 0.75

    metrics = de.contrastive_metrics(bundle, TEST, batch_size=6)
    assert set(metrics) == {"retrieval_accuracy", "zero_shot_accuracy", "loss"}
    assert metrics["zero_shot_accuracy"] == pytest.approx(accuracy)
    assert metrics["retrieval_accuracy"] >= 0.75 and np.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="'t0'.*purple"):
        de.linear_probe(bundle, TRAIN, [{**TEST[0], "label": "purple"}])


def test_patched_loss_and_grads_equal_unpatched():
    bundle = de.build_dual_encoder_bundle(tiny_model_config("contrastive"), labels(), TRAIN)
    reference = copy.deepcopy(bundle.model)
    report = mmfast.patch(bundle.model)
    assert "" in report.loss.swapped and len(report.attention.swapped) == 2
    batch = bundle.collate(TRAIN[:5])
    loss, grads = loss_and_grads(bundle.model, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert bundle.predict(bundle.model, batch) == bundle.predict(reference, batch)


def test_save_load_bundle_round_trip(trained, tmp_path):
    bundle, _ = trained
    bundle.save(tmp_path / "model")
    settings = json.loads((tmp_path / "model" / de.BUNDLE_FILE).read_text())
    assert settings["kind"] == "dual_encoder"
    loaded = load_bundle(tmp_path / "model")
    assert loaded.kind == "dual_encoder" and loaded.labels.names == NAMES
    batch, loaded_batch = bundle.collate(TEST), loaded.collate(TEST)
    torch.testing.assert_close(loaded_batch["input_ids"], batch["input_ids"])
    assert loaded.predict(loaded.model, loaded_batch) == bundle.predict(bundle.model, batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**loaded_batch).loss, bundle.model(**batch).loss)
    with pytest.raises(FileNotFoundError, match="mmfast_bundle.json"):
        de.load_dual_encoder_bundle(tmp_path)


def test_lora_bundle_saves_adapters_and_reloads(tmp_path):
    from mmfast.train.methods import apply_method

    cfg = tiny_model_config("contrastive")
    bundle = de.build_dual_encoder_bundle(cfg, labels(), TRAIN)
    apply_method(bundle, cfg.method)  # cfg.method.name defaults to lora
    for p in bundle.model.parameters():  # move the adapters and the head off their initial values
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    bundle.save(tmp_path)
    loaded = load_bundle(tmp_path)
    assert type(loaded.model).__name__ == "PeftModel"
    batch = bundle.collate(TEST)
    bundle.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits_per_image, bundle.model(**batch).logits_per_image)
    assert loaded.predict(loaded.model, batch) == bundle.predict(bundle.model, batch)


def test_checkpoints_load_through_the_loader(trained, tmp_path):
    bundle, _ = trained
    clip_dir = tmp_path / "clip"
    bundle.model.save_pretrained(clip_dir)
    bundle.processor.save_pretrained(clip_dir)
    from_dir = de.build_dual_encoder_bundle(tiny_model_config("contrastive", checkpoint=str(clip_dir)), labels(), TRAIN)
    assert type(from_dir.model).__name__ == "CLIPModel"
    expected = bundle.predict(bundle.model, bundle.collate(TEST))
    assert from_dir.predict(from_dir.model, from_dir.collate(TEST)) == expected

    # SigLIP: sigmoid loss, max_length padding without an attention mask
    tokenizer = de.word_level_tokenizer(de.class_prompts(NAMES), add_eos=True, model_max_length=12)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=12, **small),
        vision_config=dict(image_size=16, patch_size=4, **small))
    siglip_dir = tmp_path / "siglip"
    transformers.SiglipModel(config).save_pretrained(siglip_dir)
    image_processor = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)
    transformers.SiglipProcessor(image_processor=image_processor(size={"height": 16, "width": 16}),
                                 tokenizer=tokenizer).save_pretrained(siglip_dir)
    cfg = tiny_model_config("contrastive", checkpoint=str(siglip_dir))
    cfg.data.max_text_length = 12
    siglip = de.build_dual_encoder_bundle(cfg, labels(), TRAIN)
    assert type(siglip.model).__name__ == "SiglipModel" and set(siglip.head_modules) == {"logit_scale", "logit_bias"}
    batch = siglip.collate(TRAIN[:4])
    assert batch["input_ids"].shape == (4, 12) and "attention_mask" not in batch
    assert torch.isfinite(siglip.model(**batch).loss)
    assert set(siglip.predict(siglip.model, batch)) <= set(NAMES)

    (tmp_path / "bert").mkdir()
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model.checkpoint.*'bert'"):
        de.build_dual_encoder_bundle(tiny_model_config("contrastive", checkpoint=str(tmp_path / "bert")), labels(), TRAIN)
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        de.build_dual_encoder_bundle(tiny_model_config("contrastive", checkpoint=str(tmp_path / "missing")), labels(), TRAIN)


def test_embeddings_are_the_input_embedding_modules():
    bundle = de.build_dual_encoder_bundle(tiny_model_config("contrastive"), labels(), TRAIN)
    seen = {}

    def record(key):
        def hook(module, args, output):
            seen[key] = output.shape  # returns None: the output is left as it is
        return hook

    hooks = [module.register_forward_hook(record(key)) for key, module in bundle.embeddings.items()]
    bundle.model(**bundle.collate(TRAIN[:2]))
    for hook in hooks:
        hook.remove()
    assert isinstance(bundle.embeddings["image"], torch.nn.Conv2d)
    assert seen["image"] == (2, 32, 4, 4)  # (batch, width, 16 / 4, 16 / 4) patch embeddings
    assert seen["text"][:1] == (2,) and seen["text"][-1] == 32
