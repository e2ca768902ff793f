"""Encoders: the built-in tokenizer and encoders, and local Hugging Face checkpoints as fusion encoders."""

from __future__ import annotations

import types

import pytest
import torch

import mmfast
from mmfast.train.encoders import AudioEncoder, build_tokenizer, builtin_spec
from mmfast.train.fusion import FusionConfig, FusionModel

from .test_fusion import one_thread  # noqa: F401 (an autouse fixture)
from .test_fusion import NAMES, open_gates, tiny_bundle, tiny_cfg, tiny_samples


def test_builtin_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(["The cat sat.", "a dog, a cat"], max_length=6)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[MASK]", "[CLS]")] == [0, 1, 2, 3]
    ids = tokenizer("the CAT [MASK] zebra")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "the", "cat", "[MASK]", "[UNK]"]
    batch = tokenizer(["cat", "a dog a cat sat the end"], padding="longest", truncation=True, max_length=6,
                      return_tensors="pt")
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"][0].tolist() == [1, 1, 0, 0, 0, 0]
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded("the CAT [MASK] zebra")["input_ids"] == ids and loaded.pad_token_id == 0


def test_builtin_audio_frames_and_gain():
    data = types.SimpleNamespace(sampling_rate=8000, max_audio_seconds=0.25, image_size=16, max_text_length=8)
    spec = builtin_spec("audio", data)
    assert (spec["frame_length"], spec["hop_length"], spec["max_frames"]) == (256, 256, 7)
    config = types.SimpleNamespace(dim=16, heads=2, kv_heads=1, ff_mult=2, dropout=0.0,
                                   _attn_implementation="sdpa")
    torch.manual_seed(0)
    encoder = AudioEncoder(config, spec).eval()
    lengths = torch.tensor([2000, 300, 100, 0])
    assert encoder.frames(lengths).tolist() == [7, 1, 1, 0]
    t = torch.arange(2000) / 8000
    tone = 0.3 * torch.sin(2 * torch.pi * 941 * t)
    values = torch.stack([tone, tone * 2.0, tone, tone])
    tokens, mask = encoder(values, torch.tensor([2000, 2000, 300, 0]))
    assert mask.sum(1).tolist() == [7, 7, 1, 0] and torch.isfinite(tokens).all()
    # each frame's spectrum is taken relative to its peak: a louder copy of a clip encodes the same
    torch.testing.assert_close(tokens[1], tokens[0], atol=1e-5, rtol=1e-5)


def test_builtin_encoder_shape_errors():
    bundle, samples = tiny_bundle()
    batch = bundle.collate(samples[:2])
    with pytest.raises(ValueError, match="pixel_values: expected images of 16x16"):
        bundle.model(**dict(batch, pixel_values=torch.zeros(2, 3, 20, 20)))
    with pytest.raises(ValueError, match="input_ids: 20 tokens, more than the text encoder's max_length 12"):
        bundle.model(**dict(batch, input_ids=torch.zeros(2, 20, dtype=torch.long),
                            attention_mask=torch.ones(2, 20, dtype=torch.long)))
    with pytest.raises(ValueError, match="task: the fusion model does"):
        FusionConfig(task="generation", encoders={})


def _checkpoints(root):
    """Tiny ViT, BERT and Wav2Vec2 checkpoints with their processors, and a tiny CLIP, saved under root."""
    import transformers as T

    paths = {m: str(root / m) for m in ("vit", "bert", "w2v", "clip")}
    vit = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
               patch_size=4)
    T.ViTModel(T.ViTConfig(**vit)).save_pretrained(paths["vit"])
    processor_cls = getattr(T, "ViTImageProcessorPil", None) or T.ViTImageProcessor  # PIL backend, no torchvision
    processor_cls(size={"height": 16, "width": 16}).save_pretrained(paths["vit"])

    tokenizer = build_tokenizer([s["text"] for s in tiny_samples() if s["text"]], max_length=16)
    T.BertModel(T.BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32)).save_pretrained(paths["bert"])
    tokenizer.save_pretrained(paths["bert"])

    T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 4),
                                     conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                                     num_conv_pos_embedding_groups=2)).save_pretrained(paths["w2v"])
    T.Wav2Vec2FeatureExtractor(sampling_rate=8000, return_attention_mask=True).save_pretrained(paths["w2v"])

    clip = T.CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32),
                        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, image_size=16, patch_size=8), projection_dim=8)
    T.CLIPModel(clip).save_pretrained(paths["clip"])
    processor_cls(size={"height": 16, "width": 16}).save_pretrained(paths["clip"])
    return paths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _checkpoints(tmp_path_factory.mktemp("ckpt"))


def test_hf_checkpoint_encoders(checkpoints, tmp_path):
    from transformers import BertModel, ViTModel, Wav2Vec2Model

    from mmfast.train.bundle import load_bundle

    samples = tiny_samples()
    bundle, _ = tiny_bundle(samples=samples, image_encoder=checkpoints["vit"], text_encoder=checkpoints["bert"],
                            audio_encoder=checkpoints["w2v"])
    model = bundle.model.eval()
    assert isinstance(model.encoders["image"].model, ViTModel)
    assert isinstance(model.encoders["text"].model, BertModel)
    assert isinstance(model.encoders["audio"].model, Wav2Vec2Model)
    # the pretrained weights, not a fresh initialisation
    pretrained = ViTModel.from_pretrained(checkpoints["vit"]).state_dict()
    own = model.encoders["image"].model.state_dict()
    assert set(pretrained) - set(own) == {"pooler.dense.weight", "pooler.dense.bias"}  # dropped: unused
    for key, value in own.items():
        assert torch.equal(value, pretrained[key]), key
    assert bundle.embeddings["audio"] is model.encoders["audio"].model.feature_projection
    assert bundle.embeddings["text"] is model.encoders["text"].model.get_input_embeddings()

    open_gates(model)
    batch = bundle.collate(samples[:6])
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["audio_lengths"][3] == 0
    seen = {}
    hook = model.fusion.blocks[0].cross_attn.register_forward_hook(
        lambda module, args, kwargs, out: seen.update(mask=kwargs["key_padding_mask"]), with_kwargs=True)
    out = model(**batch)
    hook.remove()
    frames = model.encoders["audio"].model._get_feat_extract_output_lengths(batch["audio_lengths"].clamp(min=1))
    image_tokens = 17  # 16 patches + [CLS]
    audio_mask = seen["mask"][:, image_tokens:]
    assert audio_mask.sum(1).tolist() == [0 if n == 0 else int(f) for n, f in zip(batch["audio_lengths"], frames)]
    assert not seen["mask"][2, :image_tokens].any() and seen["mask"][0, :image_tokens].all()  # s2: no image

    logits = out.logits.detach()
    report = mmfast.patch(model)
    swapped = " ".join(report.attention.swapped)
    assert "encoders.image.model" in swapped and "encoders.text.model" in swapped and "fusion.blocks.0" in swapped
    torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-4, atol=1e-5)
    mmfast.unpatch(model)

    bundle.save(str(tmp_path / "m"))
    assert (tmp_path / "m" / "image_processor" / "preprocessor_config.json").exists()
    assert (tmp_path / "m" / "audio_processor" / "preprocessor_config.json").exists()
    alone = FusionModel.from_pretrained(str(tmp_path / "m")).eval()  # encoder configs are embedded
    torch.testing.assert_close(alone(**batch).logits, logits, rtol=0, atol=0)
    loaded = load_bundle(str(tmp_path / "m"))
    batch2 = loaded.collate(samples[:6])
    assert all(torch.equal(batch2[k], batch[k]) for k in batch)
    torch.testing.assert_close(loaded.model.eval()(**batch2).logits, logits, rtol=0, atol=0)

    # prompt tuning with a checkpoint text encoder: prompts go in as inputs_embeds before the word embeddings
    from mmfast.train import methods

    model, _ = methods.apply_method(loaded, types.SimpleNamespace(name="prompt_tuning", prompt_tokens=2))
    seen = {}
    hook = model.encoders["text"].model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    out = model(**batch2)
    hook.remove()
    assert seen.get("input_ids") is None  # the text went in as embeddings
    assert seen["inputs_embeds"].shape[1] == batch2["input_ids"].shape[1] + 2
    out.loss.backward()
    assert model.prompt_embeddings.weight.grad.abs().sum() > 0


def test_composite_checkpoint_gives_its_tower(checkpoints):
    from transformers import CLIPVisionModel

    bundle, samples = tiny_bundle(modalities=("image",), image_encoder=checkpoints["clip"])
    assert isinstance(bundle.model.encoders["image"].model, CLIPVisionModel)
    with_image = [s for s in samples if s["image"] is not None][:3]
    assert bundle.model(**bundle.collate(with_image)).logits.shape == (3, len(NAMES))


def test_checkpoint_errors(checkpoints, tmp_path):
    from mmfast.train.data import LabelSpace
    from mmfast.train.fusion import build_fusion_bundle

    labels = LabelSpace(task="classification", names=list(NAMES))
    cfg = tiny_cfg(image_encoder=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model.image_encoder: .*nowhere is not a directory"):
        build_fusion_bundle(cfg, labels, tiny_samples())
    cfg = tiny_cfg(audio_encoder=checkpoints["w2v"])
    cfg.data.sampling_rate = 16000
    with pytest.raises(ValueError, match="data.sampling_rate: 16000 differs from the audio encoder's 8000"):
        build_fusion_bundle(cfg, labels, tiny_samples())
    cfg = tiny_cfg(text_encoder=str(tmp_path))
    with pytest.raises(ValueError, match="model.text_encoder: cannot load"):
        build_fusion_bundle(cfg, labels, tiny_samples())
