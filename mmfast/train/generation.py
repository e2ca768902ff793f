"""LLaVA-style vision-language generation fine-tuning, generation at predict time, its Bundle.

    bundle = build_generation_bundle(cfg, labels, train_samples)   # cfg.model.checkpoint: a local LLaVA dir or None
    batch = bundle.collate(samples)           # labelled: prompt + target + eos, right-padded, labels -100 off-target
    loss = bundle.model(**batch).loss         # the causal-LM NLL (linear cross-entropy fused by mmfast.patch)
    texts = bundle.predict(bundle.model, batch)          # greedy model.generate on the prompts, decoded
    generation_metrics(bundle, test_samples)  # loss, token_accuracy, perplexity over a whole split, exact
    bundle.save(out_dir); load_generation_bundle(out_dir)

The model: cfg.model.checkpoint, a local LlavaForConditionalGeneration directory with its processor
(AutoProcessor; nothing downloaded); or, when null, a tiny one built from the config: a CLIP vision tower
(cfg.model.layers layers) and a Llama decoder (max(2, cfg.model.layers) layers: copying from the prompt
needs two), width cfg.model.dim, with a word-level tokenizer built from the training texts plus "<image>".

A sample: image (+ optional text, the question) -> target text (its label). The prompt is the processor's
chat template applied to [image, text] when the processor has one (real checkpoints), else "<image> text".
The processor expands each <image> into the number of image tokens the vision tower produces, so the
sequence always matches the model. Audio is not read: a sample with only audio is an error.

Collate, labelled samples (training and evaluation): [prompt ids][target ids][eos][pad...], right padding;
labels = -100 on the prompt (image tokens included) and padding, the target ids and eos supervised.
Collate, samples without labels (predict): the prompt ids only, left padding (generation appends on the
right). predict on a labelled batch strips the targets itself (the prompt is everything before the first
supervised position).

Evaluation is exact with or without mmfast.patch: generation_metrics calls the model WITHOUT labels (a patched
head then runs the model's own forward unchanged and returns the logits; with labels it would return the fused
loss and no logits) and computes the shifted next-token NLL and argmax in float32 from those logits, summed over
every supervised token of the split: loss = total NLL / tokens (the token-weighted mean ForCausalLMLoss
computes), perplexity = exp(loss), token_accuracy = correct / tokens. A Trainer prediction step can get the
same logits from model(**batch, return_logits=True) on a patched model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .dual_encoder import (_find_module, _is_peft, check_fusion_only_options, clip_image_processor,
                           head_module_names, label_text, load_model, model_device, read_bundle_files, sample_id,
                           seeded_build, to_uint8_image, word_level_tokenizer, write_bundle_files)

__all__ = [
    "IGNORE_INDEX", "IMAGE_TOKEN", "build_generation_bundle", "load_generation_bundle", "build_tiny_llava",
    "GenerationCollator", "GenerationPredictor", "prompt_only", "token_statistics", "logits_without_labels",
    "generation_metrics", "generation_embeddings",
]

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


# ------------------------------------------------------------------------------------------------ model


def build_tiny_llava(cfg, texts, vocab_size: int | None = None):
    """(LlavaForConditionalGeneration, LlavaProcessor): a small random LLaVA from cfg.model / cfg.data.

    Vision: CLIP, width cfg.model.dim, cfg.model.heads heads, cfg.model.layers layers, cfg.data.image_size
    square images in (image_size // 4)² patches (the CLS feature dropped: vision_feature_select_strategy
    "default"). Language: Llama, width cfg.model.dim, cfg.model.heads / kv_heads heads, max(2, layers)
    layers, MLP 4 x dim. Vocabulary: the word-level tokenizer of `texts` plus <image>; vocab_size pads the
    embedding and LM head to that many rows (e.g. 32000, Llama's, to time the loss at a real size).
    No attention dropout: mmfast's attention op has none (training calls would fall back to SDPA).
    """
    import transformers

    m, d = cfg.model, cfg.data
    tokenizer = word_level_tokenizer(texts, add_eos=False, extra_special=[IMAGE_TOKEN])
    patch = max(1, d.image_size // 4)
    image_tokens = (d.image_size // patch) ** 2
    vision = transformers.CLIPVisionConfig(hidden_size=m.dim, intermediate_size=4 * m.dim,
                                           num_hidden_layers=m.layers, num_attention_heads=m.heads,
                                           image_size=d.image_size, patch_size=patch, attention_dropout=0.0)
    text = transformers.LlamaConfig(
        vocab_size=max(len(tokenizer), vocab_size or 0), hidden_size=m.dim, intermediate_size=4 * m.dim,
        num_hidden_layers=max(2, m.layers), num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
        max_position_embeddings=image_tokens + 4 * d.max_text_length + 16, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                      image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                                      projector_hidden_act="gelu")
    model = seeded_build(cfg.seed, lambda: transformers.LlavaForConditionalGeneration(config))
    processor = transformers.LlavaProcessor(image_processor=clip_image_processor(d.image_size), tokenizer=tokenizer,
                                            patch_size=patch, vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
    _set_generation_ids(model, tokenizer)
    return model, processor


def _set_generation_ids(model, tokenizer) -> None:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def _load_checkpoint(path: str, key: str = "model.checkpoint"):
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    if not Path(path, "config.json").exists():
        raise FileNotFoundError(f"{key}: {path} has no config.json (expected a local LLaVA model directory)")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != "llava":
        raise ValueError(f"{key}: {path} holds a {model_type!r} model; the generation model takes 'llava' "
                         "(LlavaForConditionalGeneration)")
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def generation_embeddings(model) -> dict[str, torch.nn.Module]:
    """Input-embedding modules for adversarial training: the language model's token embedding (its output at
    <image> positions is replaced by the image features, so perturbing it there does nothing) and the vision
    tower's patch embedding."""
    base = model.get_base_model() if _is_peft(model) else model
    return {"text": base.get_input_embeddings(),
            # transformers 5.x: vision_tower.embeddings.patch_embedding; 4.x: vision_tower.vision_model.embeddings...
            "image": _find_module(base, "embeddings.patch_embedding", "the vision patch embedding")}


# ------------------------------------------------------------------------------------------------ collate


class GenerationCollator:
    """list[Sample] -> model inputs (see the module doc). A class so DataLoader workers can pickle it."""

    def __init__(self, processor, *, max_target_length: int = 32, use_text: bool = True, use_image: bool = True):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_target_length = max_target_length
        self.use_text = use_text
        self.use_image = use_image
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("processor.tokenizer: has no eos_token; the target's end cannot be supervised")
        self.eos_id = eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos

    # ---- prompts

    def prompt(self, sample, index: int = 0) -> tuple[str, Any]:
        """(prompt text with one image token per image, the uint8 image or None)."""
        sid = sample_id(sample, index)
        image = sample.get("image") if self.use_image else None
        text = sample.get("text") if self.use_text else None
        if image is None and not text:
            if sample.get("audio") is not None:
                raise ValueError(f"sample {sid!r}: has only audio; the generation model reads images and text "
                                 "(audio is ignored)")
            raise ValueError(f"sample {sid!r}: has no image and no text to prompt the generation model with")
        template = getattr(self.processor, "chat_template", None)
        if template:
            content = [{"type": "image"}] if image is not None else []
            content += [{"type": "text", "text": text}] if text else []
            prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                        add_generation_prompt=True, tokenize=False)
        else:
            prompt = " ".join(([self.image_token] if image is not None else []) + ([text] if text else []))
        return prompt, (to_uint8_image(image, sid) if image is not None else None)

    def prompt_ids(self, samples) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Per-sample prompt ids (image tokens expanded by the processor, no padding) and the image inputs."""
        prompts, images = zip(*(self.prompt(s, i) for i, s in enumerate(samples)))
        images = [image for image in images if image is not None]
        bos = self.tokenizer.bos_token
        # a chat template that writes the bos itself must not get a second one from the tokenizer
        add_special = not (bos and all(p.startswith(bos) for p in prompts))
        out = self.processor(text=list(prompts), images=images or None, padding=True, return_tensors="pt",
                             add_special_tokens=add_special)
        ids = [row[mask.bool()] for row, mask in zip(out["input_ids"], out["attention_mask"])]
        extra = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        return ids, extra

    def target_ids(self, sample, index: int) -> list[int]:
        target = label_text(sample.get("label"))
        if not isinstance(target, str):
            raise ValueError(f"sample {sample_id(sample, index)!r}: a generation target must be text, got "
                             f"{type(target).__name__} {target!r}")
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"][: self.max_target_length]
        return [*ids, self.eos_id]

    # ---- batches

    def __call__(self, samples) -> dict[str, Any]:
        samples = list(samples)
        if not samples:
            raise ValueError("collate: empty batch")
        labelled = [s.get("label") is not None for s in samples]
        if any(labelled) and not all(labelled):
            missing = [sample_id(s, i) for i, (s, has) in enumerate(zip(samples, labelled)) if not has]
            raise ValueError(f"samples {missing}: no target text (label) while the rest of the batch has one")
        prompts, extra = self.prompt_ids(samples)
        if not all(labelled):
            return {**left_pad(prompts, self.pad_id), **extra}
        rows, label_rows = [], []
        for i, (sample, prompt) in enumerate(zip(samples, prompts)):
            target = torch.tensor(self.target_ids(sample, i), dtype=prompt.dtype)
            rows.append(torch.cat([prompt, target]))
            label_rows.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), target]))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=rows[0].dtype)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=rows[0].dtype)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label_row) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(row)] = row
            labels[i, : len(row)] = label_row
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra}


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=rows[0].dtype)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            input_ids[i, width - len(row):] = row
            attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompt_only(batch: dict, pad_id: int) -> dict:
    """A labelled (training-format) batch as a left-padded prompt-only batch for generation: row i's prompt is
    its ids before the first supervised position (the collator supervises at least the eos)."""
    labels, input_ids = batch["labels"], batch["input_ids"]
    supervised = labels != IGNORE_INDEX
    if not bool(supervised.any(-1).all()):
        raise ValueError("labels: a row has no supervised position, so its prompt's end is unknown")
    starts = supervised.int().argmax(-1).tolist()
    rows = [input_ids[i, :start] for i, start in enumerate(starts)]
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    return {**left_pad(rows, pad_id), **rest}


class GenerationPredictor:
    """Bundle.predict: batch -> generated texts (greedy, at most max_new_tokens, stopped at eos)."""

    def __init__(self, collator: GenerationCollator, max_new_tokens: int):
        self.collator = collator
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, model, batch) -> list[str]:
        if "labels" in batch:
            batch = prompt_only(batch, self.collator.pad_id)
        device = model_device(model)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        was_training = model.training
        model.eval()
        try:
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=self.collator.pad_id, eos_token_id=self.collator.eos_id)
        finally:
            model.train(was_training)
        new = out[:, inputs["input_ids"].shape[1]:]  # generate returns the prompt followed by the new tokens
        return [text.strip() for text in self.collator.tokenizer.batch_decode(new, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------ metrics


def token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums over the supervised positions of a batch, as the causal-LM loss aligns them (logits at t predict
    labels at t + 1; labels -100 skipped): {"nll": summed NLL (float32 log-softmax), "correct": argmax hits,
    "count": tokens}."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits: expected (batch, length) {tuple(labels.shape)} to match labels, got "
                         f"{tuple(logits.shape[:2])}")
    shifted = logits[:, :-1].float()
    target = labels[:, 1:].to(shifted.device)
    mask = target != IGNORE_INDEX
    nll = F.cross_entropy(shifted.transpose(1, 2), target.clamp_min(0), reduction="none")
    return {"nll": float(nll[mask].sum()), "correct": int((shifted.argmax(-1) == target)[mask].sum()),
            "count": int(mask.sum())}


def logits_without_labels(model, batch: dict) -> torch.Tensor:
    """The model's logits for a labelled batch, called without labels: on a model patched by mmfast.patch the
    forward is then the model's own (no fused loss, logits returned), so these are exactly the unpatched logits."""
    device = model_device(model)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


@torch.no_grad()
def generation_metrics(bundle, samples, batch_size: int = 16, model=None) -> dict[str, float]:
    """{"loss", "token_accuracy", "perplexity"} of a labelled split, exact (see the module doc)."""
    import math

    model = bundle.model if model is None else model
    totals = {"nll": 0.0, "correct": 0, "count": 0}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
            batch = bundle.collate(chunk)
            if "labels" not in batch:
                raise ValueError("generation metrics: the samples have no target text (label)")
            stats = token_statistics(logits_without_labels(model, batch), batch["labels"])
            for key in totals:
                totals[key] += stats[key]
    finally:
        model.train(was_training)
    if totals["count"] == 0:
        raise ValueError("generation metrics: no supervised token in the samples")
    loss = totals["nll"] / totals["count"]
    return {"loss": loss, "token_accuracy": totals["correct"] / totals["count"],
            "perplexity": math.exp(min(loss, 700.0))}  # capped: a diverged run still reports a number


# ------------------------------------------------------------------------------------------------ bundle


def _texts(train_samples) -> list[str]:
    texts = []
    for sample in train_samples:
        for value in (sample.get("text"), sample.get("label")):
            if isinstance(value, str):
                texts.append(value)
    return texts


def build_generation_bundle(cfg, labels, train_samples):
    """The Bundle of a LLaVA-style generation model (see the module doc). train_samples: the training split
    (its texts make the tiny model's vocabulary; its longest target sets predict's max_new_tokens)."""
    from .bundle import Bundle

    modalities = list(cfg.data.modalities)
    if "image" not in modalities and "text" not in modalities:
        raise ValueError(f"data.modalities: the generation model reads image and/or text (audio is ignored), "
                         f"got {modalities}")
    check_fusion_only_options(cfg, "generation")
    if cfg.model.checkpoint:
        model, processor = _load_checkpoint(cfg.model.checkpoint)  # predict passes pad / eos ids to generate
    else:
        model, processor = build_tiny_llava(cfg, _texts(train_samples), vocab_size=cfg.model.vocab_size)
    settings = {"kind": "generation", "max_target_length": cfg.data.max_text_length,
                "use_text": "text" in modalities, "use_image": "image" in modalities}
    collator = _collator(processor, settings)
    targets = [collator.target_ids(s, i) for i, s in enumerate(train_samples) if s.get("label") is not None]
    settings["max_new_tokens"] = max((len(t) for t in targets), default=settings["max_target_length"] + 1)
    return _bundle(Bundle, model, processor, labels, settings)


def _collator(processor, settings) -> GenerationCollator:
    return GenerationCollator(processor, max_target_length=settings["max_target_length"],
                              use_text=settings["use_text"], use_image=settings["use_image"])


def _bundle(Bundle, model, processor, labels, settings):
    collator = _collator(processor, settings)
    # the head: the projector from the vision tower into the language model (what LLaVA's stage 1 trains)
    bundle = Bundle(model=model, collate=collator, processor=processor, labels=labels,
                    predict=GenerationPredictor(collator, settings["max_new_tokens"]),
                    embeddings=generation_embeddings(model), save=None,
                    head_modules=head_module_names(model, ("multi_modal_projector",)), kind="vlm")
    # save reads bundle.model when called: after methods.apply_method the Bundle holds the PEFT-wrapped model
    bundle.save = lambda directory: write_bundle_files(bundle, directory, settings)
    return bundle


def load_generation_bundle(model_dir: str | Path):
    """The Bundle a generation Bundle.save wrote (base model + PEFT adapters when there are any)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from .bundle import Bundle

    settings, labels = read_bundle_files(model_dir, "generation")
    model = load_model(LlavaForConditionalGeneration, model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    return _bundle(Bundle, model, processor, labels, settings)
