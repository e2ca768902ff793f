"""mmfast.train.generation: LLaVA-style generation fine-tuning: collate masks, loss, generate, metrics, save / load.

Tiny random LLaVA (CLIP vision tower + 2-layer Llama, width 32) built from configs; checkpoints are
save_pretrained into tmp_path and read back through the loader; nothing downloaded. Toy task: a 16 x 16 image
of one dominant colour, optionally with the question "what colour", and the target "it is <colour>".
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmfast  # noqa: E402
from mmfast.train import generation as gen  # noqa: E402
from mmfast.train.bundle import load_bundle  # noqa: E402
from mmfast.train.data import LabelSpace  # noqa: E402

from .conftest import tiny_model_config  # noqa: E402

COLOURS = ["red", "green", "blue"]
IMAGE_TOKENS = (16 // 4) ** 2  # image_size 16, patch 16 // 4 = 4: 16 patches, CLS dropped


def samples(n, seed, prefix="s"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        colour = COLOURS[i % 3]
        image = rng.uniform(0.0, 0.3, (16, 16, 3)).astype(np.float32)
        image[..., i % 3] += 0.6
        out.append({"id": f"{prefix}{i}", "image": image, "text": "what colour" if i % 2 else None, "audio": None,
                    "label": f"it is {colour}"})
    return out


TRAIN = samples(12, 0)
LABELS = LabelSpace(task="generation", names=[])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads stall
    each other at every barrier while other processes run (measured here: 89 s with 2 threads under load,
    13 s with 1, for this file and its sibling together)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle():
    return gen.build_generation_bundle(tiny_model_config("generation"), LABELS, TRAIN)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_collate_masks_exactly_the_prompt_image_and_padding(bundle):
    tokenizer = bundle.processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(gen.IMAGE_TOKEN)
    assert bundle.model.config.image_token_index == image_id
    rows = [TRAIN[0], TRAIN[1], {**TRAIN[2], "image": None, "text": "name a colour please"}]
    batch = bundle.collate(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (2, 3, 16, 16)  # the third sample has no image
    # independently: [bos] [image x 16]? [question words] | [target words] [eos] | [pad ...]
    bos, image, unk = [tokenizer.bos_token_id], [image_id] * IMAGE_TOKENS, tokenizer.unk_token_id
    assert tokenizer.get_vocab().keys() >= {"what", "colour", "it", "is", "red"} and "name" not in tokenizer.get_vocab()
    prompts = [bos + image,
               bos + image + tokenizer.convert_tokens_to_ids(["what", "colour"]),
               bos + [unk, unk, tokenizer.convert_tokens_to_ids("colour"), unk]]  # only "colour" is in the vocab
    targets = [tokenizer.convert_tokens_to_ids(s["label"].split()) + [tokenizer.eos_token_id] for s in rows]
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    assert batch["input_ids"].shape == (3, width)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        n, m = len(prompt), len(target)
        pad = width - n - m
        assert batch["input_ids"][i].tolist() == prompt + target + [tokenizer.pad_token_id] * pad
        assert batch["labels"][i].tolist() == [-100] * n + target + [-100] * pad
        assert batch["attention_mask"][i].tolist() == [1] * (n + m) + [0] * pad
    assert (batch["input_ids"] == image_id).sum() == 2 * IMAGE_TOKENS

    # without labels: the prompts alone, padded on the left; prompt_only recovers exactly that from the above
    unlabeled = bundle.collate([{**s, "label": None} for s in rows])
    assert "labels" not in unlabeled
    for i, prompt in enumerate(prompts):
        pad = unlabeled["input_ids"].shape[1] - len(prompt)
        assert unlabeled["input_ids"][i].tolist() == [tokenizer.pad_token_id] * pad + prompt
        assert unlabeled["attention_mask"][i].tolist() == [0] * pad + [1] * len(prompt)
    stripped = gen.prompt_only(batch, bundle.collate.pad_id)
    assert stripped.keys() == unlabeled.keys()
    for key in unlabeled:
        torch.testing.assert_close(stripped[key], unlabeled[key])


def test_bad_samples_name_the_sample_and_key(bundle):
    with pytest.raises(ValueError, match="'a'.*only audio"):
        bundle.collate([{"id": "a", "image": None, "text": None, "audio": np.zeros(8, np.float32), "label": "x"}])
    with pytest.raises(ValueError, match="'b'.*no image and no text"):
        bundle.collate([{"id": "b", "image": None, "text": "", "audio": None, "label": "x"}])
    with pytest.raises(ValueError, match="s1.*no target"):
        bundle.collate([TRAIN[0], {**TRAIN[1], "label": None}])
    with pytest.raises(ValueError, match="'s0'.*must be text"):
        bundle.collate([{**TRAIN[0], "label": 3.0}])
    cfg = tiny_model_config("generation")
    cfg.data.modalities = ["audio"]
    with pytest.raises(ValueError, match="data.modalities.*audio is ignored"):
        gen.build_generation_bundle(cfg, LABELS, TRAIN)


def test_patched_loss_and_grads_equal_unpatched_and_metrics_are_exact(bundle):
    model = copy.deepcopy(bundle.model)
    reference = copy.deepcopy(bundle.model)
    report = mmfast.patch(model)
    assert "" in report.loss.swapped and len(report.attention.swapped) == 3  # 1 CLIP + 2 Llama layers
    batch = bundle.collate(TRAIN[:5])
    loss, grads = loss_and_grads(model, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 30
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        assert model(**batch).logits is None  # the fused loss builds no logits: metrics must not rely on them
        # one batch holding the whole split: the metrics' loss is the model's own ForCausalLMLoss
        metrics = gen.generation_metrics(bundle, TRAIN[:5], batch_size=5, model=model)
        assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
        # in batches of 2 on the unpatched model: the same token-weighted totals
        split = gen.generation_metrics(bundle, TRAIN[:5], batch_size=2, model=reference)
        assert split == pytest.approx(metrics, rel=1e-5)
        logits = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
        stats = gen.token_statistics(logits, batch["labels"])
        hits = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])[batch["labels"][:, 1:] != -100]
        assert stats["count"] == int((batch["labels"] != -100).sum()) == hits.numel()
        assert metrics["token_accuracy"] == pytest.approx(hits.float().mean().item())


def test_training_lowers_the_loss_and_generate_returns_text(tmp_path):
    cfg = tiny_model_config("generation")
    bundle = gen.build_generation_bundle(cfg, LABELS, TRAIN)
    assert bundle.kind == "vlm" and bundle.head_modules == ["model.multi_modal_projector"]
    settings_tokens = len("it is red".split()) + 1
    assert bundle.predict.max_new_tokens == settings_tokens
    mmfast.patch(bundle.model)
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=3e-3)
    losses = []
    for step in range(16):
        start = (step * 6) % len(TRAIN)
        loss = bundle.model(**bundle.collate(TRAIN[start:start + 6])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    unlabeled = bundle.collate([{**s, "label": None} for s in TRAIN[:6]])
    texts = bundle.predict(bundle.model, unlabeled)
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    assert all(len(t.split()) <= settings_tokens for t in texts)
    assert bundle.predict(bundle.model, bundle.collate(TRAIN[:6])) == texts  # a labelled batch: targets stripped

    # save -> load_bundle -> the same generations and loss
    bundle.save(tmp_path / "model")
    loaded = load_bundle(tmp_path / "model")
    assert loaded.kind == "vlm" and loaded.predict.max_new_tokens == settings_tokens
    loaded_batch = loaded.collate([{**s, "label": None} for s in TRAIN[:6]])
    assert loaded.predict(loaded.model, loaded_batch) == texts
    batch = bundle.collate(TRAIN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).loss, bundle.model(**batch, return_logits=True).loss)


def test_lora_and_prompt_tuning_bundles_round_trip(tmp_path):
    from mmfast.train.methods import apply_method

    for method in ("lora", "prompt_tuning"):
        cfg = tiny_model_config("generation")
        cfg.method.name = method
        bundle = gen.build_generation_bundle(cfg, LABELS, TRAIN)
        apply_method(bundle, cfg.method)
        for p in bundle.model.parameters():  # move the adapters and the head off their initial values
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.2)
        batch = bundle.collate(TRAIN[:4])
        bundle.model.eval()
        with torch.no_grad():
            expected = bundle.model(**batch).loss
        texts = bundle.predict(bundle.model, batch)
        bundle.save(tmp_path / method)
        loaded = load_bundle(tmp_path / method)
        assert type(loaded.model).__name__.startswith("PeftModel"), method
        loaded.model.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(**batch).loss, expected, msg=method)
        assert loaded.predict(loaded.model, batch) == texts, method


def test_checkpoint_loads_through_the_loader(bundle, tmp_path):
    bundle.model.save_pretrained(tmp_path / "llava")
    bundle.processor.save_pretrained(tmp_path / "llava")
    from_dir = gen.build_generation_bundle(tiny_model_config("generation", checkpoint=str(tmp_path / "llava")), LABELS, TRAIN)
    assert type(from_dir.model).__name__ == "LlavaForConditionalGeneration"
    batch = bundle.collate(TRAIN[:4])
    for key, value in from_dir.collate(TRAIN[:4]).items():
        torch.testing.assert_close(value, batch[key])
    with torch.no_grad():
        torch.testing.assert_close(from_dir.model(**batch).loss, bundle.model(**batch).loss)
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model.checkpoint.*'bert'"):
        gen.build_generation_bundle(tiny_model_config("generation", checkpoint=str(tmp_path / "bert")), LABELS, TRAIN)


def test_embeddings_are_the_input_embedding_modules(bundle):
    assert bundle.embeddings["text"] is bundle.model.get_input_embeddings()
    assert isinstance(bundle.embeddings["image"], torch.nn.Conv2d)
    seen = {}

    def record(key):
        def hook(module, args, output):
            seen[key] = output.shape
        return hook

    hooks = [m.register_forward_hook(record(k)) for k, m in bundle.embeddings.items()]
    batch = bundle.collate(TRAIN[:2])
    with torch.no_grad():
        bundle.model(**batch)
    for hook in hooks:
        hook.remove()
    assert seen["text"] == (*batch["input_ids"].shape, 32) and seen["image"] == (2, 32, 4, 4)
