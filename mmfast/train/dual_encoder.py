"""Dual-encoder (CLIP / SigLIP) contrastive fine-tuning, zero-shot and linear-probe classification, its Bundle.

    bundle = build_dual_encoder_bundle(cfg, labels, train_samples)   # cfg.model.checkpoint: a local dir or None
    batch = bundle.collate(samples)              # input_ids, attention_mask, pixel_values, return_loss=True
    loss = bundle.model(**batch).loss            # CLIP's symmetric InfoNCE (fused by mmfast.patch) / SigLIP's sigmoid
    names = bundle.predict(bundle.model, batch)  # zero-shot: the class whose prompt is most similar to the image
    contrastive_metrics(bundle, test_samples)    # retrieval_accuracy, zero_shot_accuracy, loss over a whole split
    linear_probe(bundle, train_samples, test_samples)   # LogisticRegression on frozen image embeddings
    bundle.save(out_dir); load_dual_encoder_bundle(out_dir)

The model: cfg.model.checkpoint, a local directory holding a CLIPModel or SiglipModel and its processor
(AutoModel + AutoProcessor, nothing downloaded); or, when it is null, a tiny CLIP built from the config
(cfg.model.dim / heads / layers, cfg.data.image_size) with a word-level tokenizer built from the training texts.

Each image is paired with one text: a sample whose label is a class name gets the prompt
PROMPT_TEMPLATE.format(name) ("a photo of a 3."), any other string label is the caption itself, and a sample
without a label uses its own text (a caption for retrieval at predict time). Classes sharing a batch are each
other's negatives, as in CLIP fine-tuning on classification data (FLYP).

The collated batch has no "labels" key: CLIPModel / SiglipModel.forward take none. return_loss=True makes
the model compute its contrastive loss; mmfast.patch fuses CLIP's (two cross-entropies through
mmfast.ops.cross_entropy) and leaves SigLIP's sigmoid loss to the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PROMPT_TEMPLATE", "BUNDLE_FILE", "build_dual_encoder_bundle", "load_dual_encoder_bundle", "build_tiny_clip",
    "word_level_tokenizer", "ContrastiveCollator", "ZeroShotPredictor", "class_prompts", "image_embeddings",
    "text_embeddings", "zero_shot_logits", "zero_shot_predict", "linear_probe", "contrastive_metrics",
    "load_model", "head_module_names", "check_fusion_only_options", "write_bundle_files", "read_bundle_files",
]

PROMPT_TEMPLATE = "a photo of a {}."
BUNDLE_FILE = "mmfast_bundle.json"  # {"kind": "dual_encoder" | "generation", ...builder settings}; load_bundle reads it
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3; CLIP's text pooling reads eos_token_id = 3
_DUAL_TYPES = ("clip", "siglip")


# ------------------------------------------------------------------------------------------------ shared helpers


def word_level_tokenizer(texts: Iterable[str], *, add_eos: bool, extra_special: Sequence[str] = (),
                         model_max_length: int | None = None):
    """A PreTrainedTokenizerFast over a lowercased, whitespace/punctuation-split WordLevel vocabulary.

    Vocabulary: SPECIAL_TOKENS (ids 0-3), then extra_special (e.g. "<image>", matched whole before splitting),
    then every word of `texts`. Encoding prepends <s>, and appends </s> when add_eos (CLIP pools the text at its
    first </s>; a causal LM gets its </s> from the collator, after the target only).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [*SPECIAL_TOKENS, *extra_special]
    tok.train_from_iterator((t for t in texts if t), trainers.WordLevelTrainer(special_tokens=specials,
                                                                                show_progress=False))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    single = "<s> $A </s>" if add_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", bos), ("</s>", eos)])
    extra = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", **extra)


def clip_image_processor(image_size: int):
    """CLIP's image processor at image_size x image_size (the PIL backend when torchvision is missing and this
    transformers has a separate CLIPImageProcessorPil; otherwise CLIPImageProcessor, which picks its own)."""
    import transformers
    from transformers.utils import is_torchvision_available

    cls = transformers.CLIPImageProcessor
    if not is_torchvision_available() and hasattr(transformers, "CLIPImageProcessorPil"):
        cls = transformers.CLIPImageProcessorPil
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def to_uint8_image(image, sample_id) -> np.ndarray:
    """A Sample's float (H, W, 3) image in [0, 1] as uint8: every image processor (PIL or torchvision backend,
    any transformers version) takes uint8 and rescales it itself."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"sample {sample_id!r}: image must be (height, width, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def label_text(label):
    """An integer label (class 3) as its name "3", as data.LabelSpace spells it; anything else unchanged."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return str(label)
    return label


def sample_id(sample, index: int) -> str:
    return str(sample.get("id", f"#{index}"))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def seeded_build(seed: int, build):
    """build() under torch.manual_seed(seed), without moving the caller's global RNG (the tiny models' random
    weights then depend on cfg.seed only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def load_model(model_cls, directory: str | Path):
    """model_cls.from_pretrained(directory) completed by methods.restore (bottleneck adapters, PEFT adapters)."""
    from .methods import restore

    return restore(model_cls.from_pretrained(str(directory)), directory)


def write_bundle_files(bundle, directory: str | Path, settings: dict) -> None:
    """Model (+ adapters: methods.save_model), processor, labels.json and BUNDLE_FILE (the builder settings load
    needs)."""
    from .methods import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(bundle.model, directory)
    bundle.processor.save_pretrained(directory)
    (directory / "labels.json").write_text(json.dumps(bundle.labels.to_dict(), indent=2))
    (directory / BUNDLE_FILE).write_text(json.dumps(settings, indent=2))


def read_bundle_files(directory: str | Path, kind: str) -> tuple[dict, Any]:
    """(settings, LabelSpace) of a model directory written by write_bundle_files; errors name the file."""
    from .data import LabelSpace

    directory = Path(directory)
    for name in (BUNDLE_FILE, "labels.json", "config.json"):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name}: missing; {directory} is not a saved mmfast {kind} model")
    settings = json.loads((directory / BUNDLE_FILE).read_text())
    if settings.get("kind") != kind:
        raise ValueError(f"{directory / BUNDLE_FILE}: kind is {settings.get('kind')!r}, expected {kind!r}")
    labels = LabelSpace.from_dict(json.loads((directory / "labels.json").read_text()))
    return settings, labels


def check_fusion_only_options(cfg, kind: str) -> None:
    """Options this model would silently ignore are errors naming the key: per-modality encoders and mixup
    belong to the fusion classifier."""
    for modality in ("image", "text", "audio"):
        value = getattr(cfg.model, f"{modality}_encoder", "builtin")
        if value != "builtin":
            raise ValueError(f"model.{modality}_encoder: the {kind} model is one pretrained model "
                             f"(model.checkpoint); per-modality encoders are for the fusion model, got {value!r}")
    mixup = getattr(getattr(cfg, "augment", None), "mixup", 0.0)
    if mixup:
        raise ValueError(f"augment.mixup: mixup mixes the fusion classifier's features and labels; the {kind} "
                         f"model has none (set 0), got {mixup}")


def _check_modalities(cfg, needed: str, kind: str) -> None:
    modalities = list(getattr(cfg.data, "modalities", ["image", "text"]))
    if needed not in modalities:
        raise ValueError(f"data.modalities: the {kind} model needs {needed!r}, got {modalities}")


# ------------------------------------------------------------------------------------------------ model


def class_prompts(names: Sequence[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    return [template.format(name) for name in names]


def build_tiny_clip(cfg, texts: Iterable[str]):
    """(CLIPModel, CLIPProcessor): a small random CLIP from cfg.model / cfg.data, its tokenizer built from texts.

    Sizes: width cfg.model.dim, cfg.model.heads heads, cfg.model.layers layers per tower, MLP 4 x dim;
    images cfg.data.image_size square in (image_size // 4)² patches; texts up to cfg.data.max_text_length
    tokens. No attention dropout: mmfast's attention op has none (a dropout > 0 would send every training
    call back to SDPA), and CLIP has no other dropout site.
    """
    import transformers

    m, d = cfg.model, cfg.data
    tokenizer = word_level_tokenizer(texts, add_eos=True, model_max_length=d.max_text_length)
    patch = max(1, d.image_size // 4)
    common = dict(hidden_size=m.dim, intermediate_size=4 * m.dim, num_hidden_layers=m.layers,
                  num_attention_heads=m.heads, attention_dropout=0.0)
    text = transformers.CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=d.max_text_length,
                                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, **common)
    vision = transformers.CLIPVisionConfig(image_size=d.image_size, patch_size=patch, **common)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=m.dim)
    model = seeded_build(cfg.seed, lambda: transformers.CLIPModel(config))
    processor = transformers.CLIPProcessor(image_processor=clip_image_processor(d.image_size), tokenizer=tokenizer)
    return model, processor


def _load_checkpoint(path: str, key: str = "model.checkpoint"):
    from transformers import AutoConfig, AutoModel, AutoProcessor

    if not Path(path, "config.json").exists():
        raise FileNotFoundError(f"{key}: {path} has no config.json (expected a local CLIP or SigLIP model directory)")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in _DUAL_TYPES:
        raise ValueError(f"{key}: {path} holds a {model_type!r} model; the dual encoder takes "
                         f"{' or '.join(_DUAL_TYPES)}")
    return AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _model_type(model) -> str:
    base = model.get_base_model() if _is_peft(model) else model
    return base.config.model_type


def _find_module(model: nn.Module, suffix: str, what: str) -> nn.Module:
    for name, module in model.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return module
    raise ValueError(f"{type(model).__name__}: no module named *{suffix} ({what})")


def head_module_names(model, names: Sequence[str]) -> list[str]:
    """Bundle.head_modules: the modules (and parameters held by the model itself) named `names`, as
    model.named_parameters() prefixes; the fine-tuning methods always train them."""
    base = model.get_base_model() if _is_peft(model) else model
    found = [n for n, _ in base.named_modules() if n and n.rpartition(".")[2] in names]
    return found + [n for n, _ in base.named_parameters(recurse=False) if n in names]


def dual_encoder_embeddings(model) -> dict[str, nn.Module]:
    """Modules whose outputs are the input embeddings (adversarial training perturbs them): the vision patch
    embedding (a Conv2d over pixels: its output is the patch-embedding map) and the text token embedding."""
    return {"image": _find_module(model, "vision_model.embeddings.patch_embedding", "the vision patch embedding"),
            "text": _find_module(model, "text_model.embeddings.token_embedding", "the text token embedding")}


# ------------------------------------------------------------------------------------------------ collate


class ContrastiveCollator:
    """list[Sample] -> {pixel_values, input_ids, attention_mask, return_loss=True} (see the module doc).

    Samples without any paired text (predict inputs with no label and no text) collate to pixel_values only;
    a batch mixing the two is an error naming the samples without text. A class (not a closure) so that
    DataLoader worker processes can pickle it.
    """

    def __init__(self, processor, names: Sequence[str], *, template: str = PROMPT_TEMPLATE, max_length: int = 32,
                 model_type: str = "clip", use_text: bool = True):
        self.processor = processor
        self.names = list(names)
        self._name_set = set(self.names)
        self.template = template
        self.max_length = max_length
        self.model_type = model_type
        self.use_text = use_text  # data.modalities without "text": a sample's own text is not a caption

    def paired_text(self, sample, index: int = 0) -> str | None:
        label = label_text(sample.get("label"))
        if label is not None:
            if isinstance(label, str) and label in self._name_set:
                return self.template.format(label)
            if isinstance(label, str):
                return label
            raise ValueError(f"sample {sample_id(sample, index)!r}: the dual encoder pairs each image with one text; "
                             f"label {label!r} is a {type(label).__name__}, not a class name or caption")
        text = sample.get("text") if self.use_text else None
        return text if text else None

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        if self.model_type == "siglip":
            # SigLIP was trained on max_length-padded text without an attention mask (it pools the last token)
            out = tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                            return_tensors="pt")
            return {"input_ids": out["input_ids"]}
        out = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def pixel_values(self, samples) -> torch.Tensor:
        images = []
        for i, sample in enumerate(samples):
            if sample.get("image") is None:
                raise ValueError(f"sample {sample_id(sample, i)!r}: the dual encoder needs an image, the sample "
                                 "has none")
            images.append(to_uint8_image(sample["image"], sample_id(sample, i)))
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def __call__(self, samples) -> dict[str, Any]:
        samples = list(samples)
        if not samples:
            raise ValueError("collate: empty batch")
        batch: dict[str, Any] = {"pixel_values": self.pixel_values(samples)}
        texts = [self.paired_text(s, i) for i, s in enumerate(samples)]
        missing = [sample_id(s, i) for i, (s, t) in enumerate(zip(samples, texts)) if t is None]
        if len(missing) == len(samples):
            return batch
        if missing:
            raise ValueError(f"samples {missing}: no label or caption text to pair with the image, while the rest "
                             "of the batch has one (contrastive training needs a text per image)")
        batch.update(self.tokenize(texts))
        batch["return_loss"] = True
        return batch


# ------------------------------------------------------------------------------------------------ embeddings


def _pooled(output) -> torch.Tensor:
    # transformers < 5 returns the projected features as a tensor, 5.x a BaseModelOutputWithPooling
    return output if torch.is_tensor(output) else output.pooler_output


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings (float32), (N, D)."""
    pixel_values = pixel_values.to(model_device(model))
    return F.normalize(_pooled(model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised text embeddings (float32), (N, D)."""
    device = model_device(model)
    kwargs = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    return F.normalize(_pooled(model.get_text_features(**kwargs)).float(), dim=-1)


def zero_shot_logits(model, pixel_values: torch.Tensor, class_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N images, C classes) scores as the model scales them (CLIP: exp(logit_scale) x cosine; SigLIP adds its
    bias); the argmax over classes is the zero-shot prediction."""
    image = image_embeddings(model, pixel_values)
    text = text_embeddings(model, class_inputs["input_ids"], class_inputs.get("attention_mask"))
    logits = image @ text.t() * model.logit_scale.exp().float()
    bias = getattr(model, "logit_bias", None)
    return logits + bias.float() if bias is not None else logits


class ZeroShotPredictor:
    """Bundle.predict for the dual encoder: batch -> class names (zero-shot over the class prompts); without
    class names, the caption (among the batch's own captions) that best matches each image."""

    def __init__(self, collator: ContrastiveCollator):
        self.collator = collator
        self.names = collator.names
        self.class_inputs = collator.tokenize(class_prompts(self.names, collator.template)) if self.names else None

    @torch.no_grad()
    def __call__(self, model, batch) -> list:
        if self.names:
            logits = zero_shot_logits(model, batch["pixel_values"], self.class_inputs)
            return [self.names[i] for i in logits.argmax(-1).tolist()]
        if "input_ids" not in batch:
            raise ValueError("predict: this dual encoder has no class names (it was trained on captions), so it "
                             "can only rank captions: give every sample a caption (label or text)")
        image = image_embeddings(model, batch["pixel_values"])
        text = text_embeddings(model, batch["input_ids"], batch.get("attention_mask"))
        best = (image @ text.t()).argmax(-1).tolist()
        captions = self.collator.processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        return [captions[i].strip() for i in best]


# ------------------------------------------------------------------------------------------------ bundle


def _all_texts(train_samples, names, template) -> list[str]:
    texts = class_prompts(names, template)
    for sample in train_samples:
        for value in (sample.get("label"), sample.get("text")):
            if isinstance(value, str):
                texts.append(value)
    return texts


def build_dual_encoder_bundle(cfg, labels, train_samples):
    """The Bundle of a CLIP / SigLIP dual encoder (see the module doc). train_samples: the training split (its
    texts make the tiny model's vocabulary; unused with a checkpoint)."""
    from .bundle import Bundle

    _check_modalities(cfg, "image", "dual_encoder")
    check_fusion_only_options(cfg, "dual_encoder")
    template = PROMPT_TEMPLATE
    if cfg.model.checkpoint:
        model, processor = _load_checkpoint(cfg.model.checkpoint)
    else:
        model, processor = build_tiny_clip(cfg, _all_texts(train_samples, labels.names, template))
    # a checkpoint's text positions bound the length (SigLIP: 64; CLIP: 77)
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    max_length = min(cfg.data.max_text_length, positions) if positions else cfg.data.max_text_length
    settings = {"kind": "dual_encoder", "template": template, "max_text_length": max_length,
                "use_text": "text" in cfg.data.modalities}
    return _bundle(Bundle, model, processor, labels, settings)


def _bundle(Bundle, model, processor, labels, settings):
    collator = ContrastiveCollator(processor, labels.names, template=settings["template"],
                                   max_length=settings["max_text_length"], model_type=_model_type(model),
                                   use_text=settings["use_text"])
    # the head: the projections into the joint space and the similarity's scale / bias (CLIP; SigLIP has the latter)
    head = head_module_names(model, ("visual_projection", "text_projection", "logit_scale", "logit_bias"))
    bundle = Bundle(model=model, collate=collator, processor=processor, labels=labels,
                    predict=ZeroShotPredictor(collator), embeddings=dual_encoder_embeddings(model), save=None,
                    head_modules=head, kind="dual_encoder")
    # save reads bundle.model when called: after methods.apply_method the Bundle holds the PEFT-wrapped model
    bundle.save = lambda directory: write_bundle_files(bundle, directory, settings)
    return bundle


def load_dual_encoder_bundle(model_dir: str | Path):
    """The Bundle a dual-encoder Bundle.save wrote (base model + PEFT adapters when there are any)."""
    from transformers import AutoModel, AutoProcessor

    from .bundle import Bundle

    settings, labels = read_bundle_files(model_dir, "dual_encoder")
    model = load_model(AutoModel, model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    return _bundle(Bundle, model, processor, labels, settings)


# ------------------------------------------------------------------------------------------------ evaluation


def _batches(samples, batch_size: int):
    for start in range(0, len(samples), batch_size):
        yield [samples[i] for i in range(start, min(start + batch_size, len(samples)))]


class _eval_mode:
    """model.eval() for the block, then the mode it had (these helpers run mid-training)."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _label_index(bundle, sample, index: int) -> int:
    label = label_text(sample.get("label"))
    names = bundle.labels.names
    if label not in names:
        raise ValueError(f"sample {sample_id(sample, index)!r}: label {label!r} is not one of the class names {names}")
    return names.index(label)


@torch.no_grad()
def zero_shot_predict(bundle, samples, batch_size: int = 64, model=None) -> list[str]:
    """Class names predicted zero-shot for `samples` (only their images are read)."""
    model = bundle.model if model is None else model
    if not bundle.labels.names:
        raise ValueError("zero-shot: the label space has no class names")
    predictor = bundle.predict if isinstance(bundle.predict, ZeroShotPredictor) else ZeroShotPredictor(bundle.collate)
    out = []
    with _eval_mode(model):
        for chunk in _batches(samples, batch_size):
            out += predictor(model, {"pixel_values": bundle.collate.pixel_values(chunk)})
    return out


@torch.no_grad()
def _image_features(bundle, model, samples, batch_size) -> np.ndarray:
    feats = []
    with _eval_mode(model):
        for chunk in _batches(samples, batch_size):
            feats.append(image_embeddings(model, bundle.collate.pixel_values(chunk)).cpu().numpy())
    return np.concatenate(feats)


def linear_probe(bundle, train_samples, test_samples, batch_size: int = 64, model=None, C: float = 1.0,
                 seed: int = 0) -> dict:
    """Logistic regression on the frozen (L2-normalised) image embeddings of train_samples, scored on
    test_samples: {"accuracy", "predictions" (class names), "classifier" (the fitted sklearn model)}."""
    from sklearn.linear_model import LogisticRegression

    model = bundle.model if model is None else model
    if not bundle.labels.names:
        raise ValueError("linear probe: the label space has no class names")
    y_train = np.array([_label_index(bundle, s, i) for i, s in enumerate(train_samples)])
    y_test = np.array([_label_index(bundle, s, i) for i, s in enumerate(test_samples)])
    if len(set(y_train.tolist())) < 2:
        raise ValueError(f"linear probe: the training samples hold {len(set(y_train.tolist()))} class; need 2 or more")
    classifier = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    classifier.fit(_image_features(bundle, model, train_samples, batch_size), y_train)
    predicted = classifier.predict(_image_features(bundle, model, test_samples, batch_size))
    return {"accuracy": float((predicted == y_test).mean()),
            "predictions": [bundle.labels.names[i] for i in predicted], "classifier": classifier}


@torch.no_grad()
def contrastive_metrics(bundle, samples, batch_size: int = 64, model=None) -> dict:
    """Metrics of a split: retrieval_accuracy (image -> text top-1 over every text of the split; a text equal to
    the image's own counts as right, so class prompts shared by several images do), zero_shot_accuracy (when
    the label space has class names and every sample's label is one), and loss (mean in-batch contrastive
    loss over batches of batch_size, as training computes it)."""
    model = bundle.model if model is None else model
    collator = bundle.collate
    texts = [collator.paired_text(s, i) for i, s in enumerate(samples)]
    missing = [sample_id(s, i) for i, (s, t) in enumerate(zip(samples, texts)) if t is None]
    if missing:
        raise ValueError(f"contrastive metrics: samples {missing[:5]} have no label or caption")
    images, text_feats, losses, sizes = [], [], [], []
    with _eval_mode(model):
        for chunk in _batches(samples, batch_size):
            batch = collator(chunk)
            device = model_device(model)
            out = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            losses.append(float(out.loss))
            sizes.append(len(chunk))
            images.append(F.normalize(out.image_embeds.float(), dim=-1))
            text_feats.append(F.normalize(out.text_embeds.float(), dim=-1))
    image, text = torch.cat(images), torch.cat(text_feats)
    best = (image @ text.t()).argmax(-1).tolist()
    metrics = {"retrieval_accuracy": float(np.mean([texts[b] == texts[i] for i, b in enumerate(best)])),
               "loss": float(np.average(losses, weights=sizes))}
    names = bundle.labels.names
    truth = [label_text(s.get("label")) for s in samples]
    if names and all(t in names for t in truth):
        class_inputs = collator.tokenize(class_prompts(names, collator.template))
        class_text = text_embeddings(model, class_inputs["input_ids"], class_inputs.get("attention_mask"))
        predicted = (image @ class_text.t()).argmax(-1).tolist()
        metrics["zero_shot_accuracy"] = float(np.mean([names[p] == t for p, t in zip(predicted, truth)]))
    return metrics
