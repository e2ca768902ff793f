"""The fusion model: one encoder per modality, fused by gated cross-attention, with a task head.

    tokens_m = project_m(encoder_m(batch)) + modality_embedding_m          per modality, masked per sample
    x        = [learned queries ; text tokens]                             (B, Q + L, dim), query mask
    x        = FusionBlock(x, [image tokens ; audio tokens], key mask)     `layers` times (Flamingo blocks)
    pooled   = norm(masked mean of x)  -> mixup (training) -> head -> logits

FusionBlock is mmfast.nn.GatedCrossAttentionBlock with its attention a MultimodalAttention (see encoders.py):
the transformers attention pattern, so mmfast.patch(model) runs it on mmfast.ops.cross_modal_attention (gate
fused) and mmfast.unpatch(model) on torch SDPA, with the same parameters. A missing modality contributes no
keys (masked, not zero-filled); a sample with no media key gets exactly the residual. The learned queries make
sure a sample without text still has query rows; with no media modality at all (a text-only model) there is
nothing to cross-attend and the model has no fusion block.

Heads and losses by config.task: classification (cross-entropy; soft labels (B, C) accepted), multilabel
(binary cross-entropy with logits), regression (MSE on targets standardised with the training mean/std;
logits are in the target's own scale, shape (B,)). Mixup (config.mixup = alpha > 0, training with labels):
the pooled features of the batch are mixed with a permutation of themselves, lam ~ Beta(alpha, alpha), and
the loss is lam * loss(y) + (1 - lam) * loss(y[perm]) (for cross-entropy and BCE that is the soft-label
loss of the mixed labels; regression mixes the targets).

Fused loss: the classification loss runs mmfast.ops.cross_entropy when `model.fused_loss` is True or a backend
name, F.cross_entropy when it is False (the default). mmfast.patch(model, loss=True) sets it (to its backend=
when given) and mmfast.unpatch clears it, as it switches the attention between "mmfast" and SDPA.

Saved with save_pretrained (config.json with the encoder configs embedded + model.safetensors) and reloadable
with FusionModel.from_pretrained(dir) alone; the processors (tokenizer, image processor, feature extractor)
are saved beside it by FusionProcessor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .. import ops
from ..nn import GatedCrossAttentionBlock
from .encoders import (MODALITIES, HFEncoder, LearnedOffsets, MultimodalAttention, build_encoder,
                       build_tokenizer, builtin_spec, load_hf_encoder, load_processor)

__all__ = ["FusionConfig", "FusionModel", "FusionBlock", "FusionProcessor", "FusionCollator", "build_fusion_bundle",
           "load_fusion_bundle", "unwrap"]

TASKS = ("classification", "multilabel", "regression")
BUNDLE_FILE = "mmfast_bundle.json"  # {"kind": "fusion", ...}: how bundle.load_bundle tells the kinds apart
MEDIA = ("image", "audio")


class FusionConfig(PretrainedConfig):
    """Configuration of FusionModel.

    task: classification | multilabel | regression; id2label: class names (classification, multilabel).
    modalities: the inputs the model takes, a subset of (text, image, audio), in that order.
    encoders: {modality: spec}; spec {"type": "builtin", ...sizes} or {"type": "hf", "config": the checkpoint's
    config dict, "source": its path} (see encoders.builtin_spec / load_hf_encoder).
    dim, heads, kv_heads (grouped-query), ff_mult, dropout: shared by the built-in encoders and the fusion blocks;
    layers: fusion blocks; gated: Flamingo tanh gates, gate_init their initial value (0: the blocks start as the
    identity, as Flamingo's; they still open from there: measured on the demo);
    num_queries: learned query tokens; prompt_tokens: learned prompt tokens (prompt tuning; 0 = none);
    mixup: alpha (0 = off); target_mean / target_std: regression target standardisation.
    """

    model_type = "mmfast_fusion"

    def __init__(self, task: str = "classification", modalities=("text", "image", "audio"),
                 encoders: dict | None = None, dim: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 1,
                 ff_mult: int = 2, gated: bool = True, gate_init: float = 0.0, dropout: float = 0.1,
                 num_queries: int = 4, prompt_tokens: int = 0, mixup: float = 0.0, target_mean: float = 0.0,
                 target_std: float = 1.0, initializer_range: float = 0.02, **kwargs) -> None:
        self.task = task
        self.modalities = [m for m in MODALITIES if m in list(modalities)]
        self.encoders = dict(encoders or {})
        self.dim, self.heads, self.kv_heads, self.layers, self.ff_mult = dim, heads, kv_heads, layers, ff_mult
        self.gated, self.gate_init, self.dropout = gated, float(gate_init), dropout
        self.num_queries, self.prompt_tokens = num_queries, prompt_tokens
        self.mixup, self.target_mean, self.target_std = float(mixup), float(target_mean), float(target_std)
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: the fusion model does {', '.join(TASKS)}, got {self.task!r}")
        if not self.modalities or len(self.modalities) != len(set(self.modalities)):
            raise ValueError(f"modalities: expected distinct entries of {', '.join(MODALITIES)}, got {self.modalities}")
        missing = [m for m in self.modalities if m not in self.encoders]
        if missing:
            raise ValueError(f"encoders: no encoder spec for modalities {missing}")
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads / kv_heads: dim {self.dim} must be a multiple of heads {self.heads}, and heads "
                             f"a multiple of kv_heads {self.kv_heads}")
        if self.num_queries < 1:
            raise ValueError(f"num_queries: expected >= 1 (a sample without text needs query rows), got "
                             f"{self.num_queries}")
        if self.task != "regression" and self.num_labels < (1 if self.task == "multilabel" else 2):
            raise ValueError(f"id2label: task {self.task} needs class names, got {self.id2label}")

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "regression" else self.num_labels

    @property
    def media(self) -> list[str]:
        return [m for m in self.modalities if m in MEDIA]


class FusionBlock(GatedCrossAttentionBlock):
    """GatedCrossAttentionBlock whose cross-attention is a MultimodalAttention (switchable by mmfast.patch).

    gated=False: the same block without gates (x + attn, then x + ff), as a plain transformer cross-attention layer.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config.dim, config.heads, config.kv_heads, ff_mult=config.ff_mult, dropout=config.dropout)
        self.gated = bool(config.gated)
        self.cross_attn = MultimodalAttention(config, config.dim, config.heads, config.kv_heads, gated=self.gated,
                                              dropout=config.dropout)
        if not self.gated:
            self.register_parameter("ff_gate", None)

    def reset_parameters(self) -> None:
        if self.ff_gate is not None:
            super().reset_parameters()
            return
        self.cross_attn.reset_parameters()
        for module in (self.attn_norm, self.ff_norm, self.ff[0], self.ff[2]):
            module.reset_parameters()

    def forward(self, x: Tensor, media: Tensor, *, key_padding_mask: Tensor | None = None, **_) -> Tensor:
        if self.gated:
            return super().forward(x, media, key_padding_mask=key_padding_mask)
        x = self.cross_attn(self.attn_norm(x), media, key_padding_mask=key_padding_mask, residual=x)
        return x + F.dropout(self.ff(self.ff_norm(x)), self.dropout, self.training)


class FusionCore(nn.Module):
    """The new fusion part: learned queries, one embedding per modality (added to its tokens), blocks, final norm."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.queries = LearnedOffsets(config.num_queries, config.dim)
        self.modality_embed = LearnedOffsets(len(MODALITIES), config.dim)
        # No media modality (text only): nothing to cross-attend, so no blocks.
        self.blocks = nn.ModuleList(FusionBlock(config) for _ in range(config.layers if config.media else 0))
        self.norm = nn.LayerNorm(config.dim)


class FusionPreTrainedModel(PreTrainedModel):
    config_class = FusionConfig
    base_model_prefix = "fusion"
    main_input_name = "input_ids"
    # Attention goes through ALL_ATTENTION_FUNCTIONS (MultimodalAttention), so transformers' set_attn_implementation
    # may switch it ("sdpa" default, "eager", "mmfast" registered by mmfast.integrations.transformers).
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _no_split_modules = ["FusionBlock", "EncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init is looked up at call time: transformers guards it so loaded weights are not re-initialised.
        # PyTorch's default initialisation for the layers (not BERT's N(0, 0.02)): this model trains from scratch and
        # is shallow, and with 0.02 every linear layer shrinks its input ~6x, so the attention starts uniform and
        # the image path never got going on the demo.
        if isinstance(module, MultimodalAttention) and module.gate is not None:
            nn.init.constant_(module.gate, self.config.gate_init)
        elif isinstance(module, FusionBlock) and module.ff_gate is not None:
            nn.init.constant_(module.ff_gate, self.config.gate_init)
        elif isinstance(module, LearnedOffsets):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding)):
            module.reset_parameters()


class FusionModel(FusionPreTrainedModel):
    """See the module docstring. forward(**collated batch) -> SequenceClassifierOutput(loss when labels, logits)."""

    fused_loss: bool | str = False  # True or a backend name: mmfast.ops.cross_entropy (set by mmfast.patch)
    # Bottleneck adapters (methods.py) live in the checkpoint but are inserted by methods.restore, after loading.
    _keys_to_ignore_on_load_unexpected = [r"mmfast_adapter\."]

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        self.main_input_name = {"text": "input_ids", "image": "pixel_values",
                                "audio": "input_values"}[config.modalities[0]]
        self.encoders = nn.ModuleDict({m: build_encoder(m, config.encoders[m], config) for m in config.modalities})
        self.projections = nn.ModuleDict()
        for m, encoder in self.encoders.items():
            # Built-in encoders already work at `dim`; a checkpoint's width is projected and normalised.
            self.projections[m] = (nn.Sequential(nn.Linear(encoder.width, config.dim), nn.LayerNorm(config.dim))
                                   if isinstance(encoder, HFEncoder) else nn.Identity())
        self.fusion = FusionCore(config)
        self.prompt_embeddings = None
        if config.prompt_tokens:
            self.prompt_embeddings = LearnedOffsets(config.prompt_tokens, self._prompt_width())
        self.head = nn.Sequential(nn.Linear(config.dim, config.dim), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(config.dim, config.num_outputs))
        self.post_init()

    # ------------------------------------------------------------------ prompt tuning

    def _prompt_width(self) -> int:
        return self.encoders["text"].width if "text" in self.encoders else self.config.dim

    def enable_prompts(self, count: int) -> nn.Embedding:
        """Add `count` learned prompt tokens (prompt tuning): prepended to the text encoder's input embeddings, or
        to the fusion queries for a model without text. Initialised from random vocabulary embeddings (Lester et
        al.) when there is text. Recorded in config.prompt_tokens, so save/from_pretrained keep them."""
        if count < 1:
            raise ValueError(f"method.prompt_tokens: expected >= 1, got {count}")
        if self.prompt_embeddings is not None:
            raise ValueError(f"method.prompt_tokens: the model already has {self.config.prompt_tokens} prompt tokens")
        ref = next(self.parameters())
        prompts = LearnedOffsets(count, self._prompt_width(), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if "text" in self.encoders:
                vocab = self.encoders["text"].input_embeddings().weight
                prompts.weight.copy_(vocab[torch.randint(0, vocab.shape[0], (count,))])
            else:
                prompts.weight.normal_(std=self.config.initializer_range)
        self.prompt_embeddings = prompts
        self.config.prompt_tokens = count
        return prompts

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, image_mask: Tensor | None = None,
                input_values: Tensor | None = None, audio_lengths: Tensor | None = None,
                labels: Tensor | None = None, return_dict: bool | None = None) -> SequenceClassifierOutput | tuple:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "image_mask": image_mask, "input_values": input_values, "audio_lengths": audio_lengths}
        batch = self._batch_size(inputs)
        cfg = self.config
        ref = self.fusion.queries.weight
        prompts = None if self.prompt_embeddings is None else self.prompt_embeddings.weight[None]
        queries = [self.fusion.queries.weight[None].expand(batch, -1, -1)]
        query_masks = [torch.ones(batch, cfg.num_queries, dtype=torch.bool, device=ref.device)]
        if prompts is not None and "text" not in self.encoders:
            queries.append(prompts.expand(batch, -1, -1))
            query_masks.append(torch.ones(batch, prompts.shape[1], dtype=torch.bool, device=ref.device))
        media, media_masks = [], []
        for index, modality in enumerate(MODALITIES):
            if modality not in self.encoders:
                continue
            tokens, mask = self._encode(modality, inputs, prompts)
            tokens = self.projections[modality](tokens) + self.fusion.modality_embed.weight[index]
            (queries if modality == "text" else media).append(tokens)
            (query_masks if modality == "text" else media_masks).append(mask)
        x, query_mask = torch.cat(queries, 1), torch.cat(query_masks, 1)
        if self.fusion.blocks:
            context, key_mask = torch.cat(media, 1), torch.cat(media_masks, 1)
            for block in self.fusion.blocks:
                x = block(x, context, key_padding_mask=key_mask)
        weights = query_mask.to(x.dtype)[..., None]
        pooled = self.fusion.norm((x * weights).sum(1) / weights.sum(1))

        mix = None
        if self.training and labels is not None and cfg.mixup > 0:
            lam = float(np.random.beta(cfg.mixup, cfg.mixup))
            perm = torch.randperm(batch, device=pooled.device)
            pooled = lam * pooled + (1.0 - lam) * pooled[perm]
            mix = (lam, perm)
        logits = self.head(pooled)
        if cfg.task == "regression":
            logits = logits.squeeze(-1) * cfg.target_std + cfg.target_mean
        loss = None if labels is None else self._loss(logits, labels, mix)
        if return_dict is False or (return_dict is None and not cfg.return_dict):
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _batch_size(self, inputs: dict) -> int:
        needed = {"text": ("input_ids", "attention_mask"), "image": ("pixel_values",),
                  "audio": ("input_values", "audio_lengths")}
        sizes = set()
        for modality in self.encoders:
            for key in needed[modality]:
                if inputs[key] is None:
                    raise ValueError(f"{key}: the model was built with the {modality} modality; the batch must carry "
                                     f"{' and '.join(needed[modality])} (missing samples are masked there)")
                sizes.add(inputs[key].shape[0])
        if len(sizes) != 1:
            raise ValueError(f"batch: inputs disagree on the batch size ({sorted(sizes)})")
        return sizes.pop()

    def _encode(self, modality: str, inputs: dict, prompts: Tensor | None) -> tuple[Tensor, Tensor]:
        encoder = self.encoders[modality]
        if modality == "text":
            real = inputs["attention_mask"].bool()
            present = real.any(1)
            # A row without text keeps one placeholder token for the encoder (no softmax over nothing); it is
            # masked out of the fusion below.
            encoder_mask = real.clone()
            encoder_mask[:, 0] |= ~present
            tokens, _ = encoder(input_ids=inputs["input_ids"], attention_mask=encoder_mask, prompts=prompts)
            mask = real if prompts is None else torch.cat([real.new_ones(real.shape[0], prompts.shape[1]), real], 1)
            return tokens, mask
        if modality == "image":
            tokens, mask = encoder(pixel_values=inputs["pixel_values"])
            present = inputs["image_mask"]
            return tokens, mask if present is None else mask & present.bool()[:, None]
        return encoder(input_values=inputs["input_values"], audio_lengths=inputs["audio_lengths"])

    def _loss(self, logits: Tensor, labels: Tensor, mix) -> Tensor:
        if mix is None:
            return self._task_loss(logits, labels)
        lam, perm = mix
        if self.config.task == "regression":  # MSE is not linear in the target: mix the targets
            return self._task_loss(logits, lam * labels + (1.0 - lam) * labels[perm])
        return lam * self._task_loss(logits, labels) + (1.0 - lam) * self._task_loss(logits, labels[perm])

    def _task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        task = self.config.task
        labels = labels.to(logits.device)
        if task == "classification":
            if labels.is_floating_point():  # soft labels (B, C)
                if labels.shape != logits.shape:
                    raise ValueError(f"labels: soft labels must have the logits' shape {tuple(logits.shape)}, "
                                     f"got {tuple(labels.shape)}")
                return -(labels * F.log_softmax(logits.float(), -1)).sum(-1).mean()
            if self.fused_loss:
                backend = self.fused_loss if isinstance(self.fused_loss, str) else None
                return ops.cross_entropy(logits, labels.long(), backend=backend)
            return F.cross_entropy(logits.float(), labels.long())
        if task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.dtype).float())
        std, mean = self.config.target_std, self.config.target_mean
        return F.mse_loss((logits.float() - mean) / std, (labels.float() - mean) / std)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and not isinstance(model, PreTrainedModel) else model


# ------------------------------------------------------------------------------------------------ processing


class FusionProcessor:
    """The fusion model's input processors: tokenizer (text), image processor and feature extractor (only for
    checkpoint encoders; built-in image/audio encoders need none). save_pretrained writes the tokenizer at the
    model directory's root (AutoTokenizer.from_pretrained(dir) loads it) and the others in image_processor/ and
    audio_processor/ (both would write preprocessor_config.json)."""

    SUBDIRS = {"image": "image_processor", "audio": "audio_processor"}

    def __init__(self, tokenizer=None, image_processor=None, feature_extractor=None) -> None:
        self.tokenizer, self.image_processor, self.feature_extractor = tokenizer, image_processor, feature_extractor

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        for modality, processor in (("image", self.image_processor), ("audio", self.feature_extractor)):
            if processor is not None:
                processor.save_pretrained(str(directory / self.SUBDIRS[modality]))

    @classmethod
    def from_pretrained(cls, directory, config: FusionConfig) -> "FusionProcessor":
        directory = Path(directory)
        found = {}
        for modality in config.modalities:
            spec = config.encoders[modality]
            if modality == "text":
                found["text"] = load_processor(directory, "text", f"{directory} tokenizer")
            elif spec.get("type") == "hf":
                found[modality] = load_processor(directory / cls.SUBDIRS[modality], modality,
                                                 f"{directory / cls.SUBDIRS[modality]}")
        return cls(found.get("text"), found.get("image"), found.get("audio"))


def _sample_id(sample: dict, index: int) -> str:
    return str(sample.get("id", f"#{index}"))


class FusionCollator:
    """list[Sample] -> the FusionModel's batch (see the contract in the module docstring of bundle.py).

    text: tokenised (truncated to the text length the model was built for), padded; a sample without text gets
    an all-zero attention_mask row. image: (B, 3, H, W) float, resized to the built-in encoder's size (or run
    through the checkpoint's image processor), image_mask (B,) = presence (missing images are zeros, masked).
    audio: (B, S) waveforms truncated to the encoder's max length and zero-padded (or the feature extractor's
    input_values), audio_lengths (B,) = real samples (0 = missing). labels via the LabelSpace when samples carry
    them (all or none).
    """

    def __init__(self, config: FusionConfig, processor: FusionProcessor, labels, sampling_rate: int | None = None,
                 max_text_length: int | None = None) -> None:
        self.config, self.processor, self.labels = config, processor, labels
        self.sampling_rate = sampling_rate
        text = config.encoders.get("text", {})
        self.max_text_length = text.get("max_length") if text.get("type") == "builtin" else max_text_length

    def __call__(self, samples: list[dict]) -> dict[str, Tensor]:
        if not samples:
            raise ValueError("collate: empty batch")
        modalities = self.config.modalities
        for i, sample in enumerate(samples):
            if all(sample.get(m) is None for m in modalities):
                raise ValueError(f"sample {_sample_id(sample, i)}: has none of the model's modalities "
                                 f"{', '.join(modalities)}")
        batch: dict[str, Tensor] = {}
        if "text" in modalities:
            batch.update(self._text(samples))
        if "image" in modalities:
            batch.update(self._image(samples))
        if "audio" in modalities:
            batch.update(self._audio(samples))
        labeled = [s.get("label") is not None for s in samples]
        if any(labeled):
            if not all(labeled):
                i = labeled.index(False)
                raise ValueError(f"sample {_sample_id(samples[i], i)}: has no label while others in its batch do")
            batch["labels"] = self._labels(samples)
        return batch

    def _text(self, samples):
        tokenizer = self.processor.tokenizer
        texts = [s.get("text") for s in samples]
        for i, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise ValueError(f"sample {_sample_id(samples[i], i)}: text must be a string or None, got "
                                 f"{type(text).__name__}")
        max_length = self.max_text_length or tokenizer.model_max_length
        encoded = tokenizer([t if t is not None else "" for t in texts], padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"].clone()
        absent = torch.tensor([t is None for t in texts])
        mask[absent] = 0
        ids = ids.masked_fill(absent[:, None], tokenizer.pad_token_id or 0)
        return {"input_ids": ids, "attention_mask": mask}

    def _image(self, samples):
        spec = self.config.encoders["image"]
        images, present = [], []
        for i, sample in enumerate(samples):
            image = sample.get("image")
            if image is not None:
                image = np.asarray(image, dtype=np.float32)
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise ValueError(f"sample {_sample_id(sample, i)}: image must be float (H, W, 3), got shape "
                                     f"{image.shape}")
            images.append(image)
            present.append(image is not None)
        shape = next((im.shape for im in images if im is not None), None)
        if spec["type"] == "builtin":
            size = spec["image_size"]
            tensors = []
            for image in images:
                if image is None:
                    tensors.append(torch.zeros(3, size, size))
                    continue
                t = torch.from_numpy(image).permute(2, 0, 1)
                if tuple(t.shape[1:]) != (size, size):
                    t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                                      antialias=True)[0]
                tensors.append(t)
            pixels = torch.stack(tensors)
        else:
            placeholder = np.zeros(shape or (32, 32, 3), dtype=np.float32)
            pixels = self.processor.image_processor(
                images=[im if im is not None else placeholder for im in images], return_tensors="pt",
                do_rescale=False)["pixel_values"]
        return {"pixel_values": pixels.float(), "image_mask": torch.tensor(present)}

    def _audio(self, samples):
        spec = self.config.encoders["audio"]
        limit = spec["max_samples"]
        clips = []
        for i, sample in enumerate(samples):
            audio = sample.get("audio")
            if audio is not None:
                audio = np.asarray(audio, dtype=np.float32)
                if audio.ndim != 1:
                    raise ValueError(f"sample {_sample_id(sample, i)}: audio must be mono float (S,), got shape "
                                     f"{audio.shape}")
                audio = audio[:limit]
            clips.append(audio)
        lengths = torch.tensor([0 if c is None else len(c) for c in clips])
        if spec["type"] == "builtin":
            width = max(int(lengths.max()), spec["frame_length"])
            values = torch.zeros(len(clips), width)
            for row, clip in enumerate(clips):
                if clip is not None and len(clip):
                    values[row, : len(clip)] = torch.from_numpy(clip)
        else:
            fill = max(int(lengths.max()), min(limit, 16000))
            placeholder = np.zeros(fill if int(lengths.max()) == 0 else 1, dtype=np.float32)
            extractor = self.processor.feature_extractor
            values = extractor([c if c is not None and len(c) else placeholder for c in clips],
                               sampling_rate=extractor.sampling_rate, padding=True,
                               return_tensors="pt")["input_values"]
        return {"input_values": values.float(), "audio_lengths": lengths}

    def _labels(self, samples):
        task = self.config.task
        values = [self.labels.encode(s["label"], _sample_id(s, i)) for i, s in enumerate(samples)]
        if task == "classification":
            return torch.tensor(values, dtype=torch.long)
        return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ bundle


def _predict(task: str, labels):
    def predict(model: nn.Module, batch: dict) -> list:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(**inputs).logits.float()
        finally:
            model.train(was_training)
        if task == "classification":
            return [labels.decode(int(i)) for i in logits.argmax(-1)]
        if task == "multilabel":
            return [labels.decode([float(v) for v in row]) for row in (logits.sigmoid() > 0.5).float()]
        return [labels.decode(float(v)) for v in logits]
    return predict


def _embeddings(model: nn.Module) -> dict[str, nn.Module]:
    base = unwrap(model)
    return {m: base.encoders[m].input_embeddings() for m in base.config.modalities}


def _make_bundle(model: FusionModel, processor: FusionProcessor, labels, sampling_rate, max_text_length):
    from . import methods
    from .bundle import Bundle

    collate = FusionCollator(model.config, processor, labels, sampling_rate, max_text_length)
    bundle = Bundle(model=model, collate=collate, processor=processor, labels=labels,
                    predict=_predict(model.config.task, labels), embeddings=_embeddings(model), save=None,
                    head_modules=list(HEAD_MODULES), kind="fusion")

    def save(directory: str) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        methods.save_model(bundle.model, directory)  # bundle.model: the PEFT-wrapped one after apply_method
        processor.save_pretrained(directory)
        (directory / "labels.json").write_text(json.dumps(labels.to_dict(), indent=1))
        (directory / BUNDLE_FILE).write_text(json.dumps({"kind": "fusion", "sampling_rate": sampling_rate,
                                                         "max_text_length": max_text_length}, indent=1))

    bundle.save = save
    return bundle


# The new modules on top of the encoders (randomly initialised when the bundle is built): the "head" that the
# methods train fully (head, lora, adapters, prompt_tuning, bitfit, top_k).
HEAD_MODULES = ("projections", "fusion", "head")


def build_fusion_bundle(cfg, labels, train_samples):
    """A fresh fusion Bundle from a TrainConfig (task, data, model, augment.mixup, seed) and the LabelSpace.

    Built-in text encoder: its tokenizer is trained on the training texts. Checkpoint encoders: weights loaded
    from their directories. Regression: targets standardised with the training mean/std.
    """
    if cfg.task not in TASKS:
        raise ValueError(f"task: the fusion model does {', '.join(TASKS)}, got {cfg.task!r}")
    data, mcfg = cfg.data, cfg.model
    modalities = [m for m in MODALITIES if m in list(data.modalities)]
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    specs, pretrained, processors = {}, {}, {}
    for modality in modalities:
        source = getattr(mcfg, f"{modality}_encoder")
        if source == "builtin":
            continue
        model, processor, spec = load_hf_encoder(source, modality)
        if modality == "audio":  # clips are cut to data.max_audio_seconds, as for the built-in encoder
            spec["max_samples"] = max(1, int(round(data.max_audio_seconds * data.sampling_rate)))
        specs[modality], pretrained[modality], processors[modality] = spec, model, processor
        if modality == "audio" and getattr(processor, "sampling_rate", None) not in (None, data.sampling_rate):
            raise ValueError(f"data.sampling_rate: {data.sampling_rate} differs from the audio encoder's "
                             f"{processor.sampling_rate} ({source}); set --data.sampling_rate "
                             f"{processor.sampling_rate}")
    if "text" in modalities and "text" not in processors:
        texts = [s.get("text") for s in train_samples if s.get("text")]
        processors["text"] = build_tokenizer(texts, data.max_text_length)
        specs["text"] = builtin_spec("text", data, vocab_size=len(processors["text"]),
                                     pad_token_id=processors["text"].pad_token_id)
    for modality in modalities:
        if modality not in specs:
            specs[modality] = builtin_spec(modality, data)
    extra = {}
    if cfg.task == "regression":
        targets = np.array([float(s["label"]) for s in train_samples if s.get("label") is not None])
        if len(targets):
            extra = {"target_mean": float(targets.mean()), "target_std": float(targets.std()) or 1.0}
    else:
        extra = {"id2label": dict(enumerate(labels.names))}
    config = FusionConfig(task=cfg.task, modalities=modalities, encoders=specs, dim=mcfg.dim, heads=mcfg.heads,
                          kv_heads=mcfg.kv_heads, layers=mcfg.layers, gated=mcfg.gated, dropout=mcfg.dropout,
                          mixup=cfg.augment.mixup, **extra)
    model = FusionModel(config)
    for modality, encoder in pretrained.items():
        model.encoders[modality].load_pretrained(encoder)
    processor = FusionProcessor(processors.get("text"), processors.get("image"), processors.get("audio"))
    return _make_bundle(model, processor, labels, data.sampling_rate, data.max_text_length)


def load_fusion_bundle(model_dir: str):
    """The Bundle saved by Bundle.save: model (+ its method's adapters), processors, labels."""
    from . import methods
    from .data import LabelSpace

    directory = Path(model_dir)
    model = FusionModel.from_pretrained(str(directory))
    model = methods.restore(model, directory)
    processor = FusionProcessor.from_pretrained(directory, unwrap(model).config)
    labels = LabelSpace.from_dict(json.loads((directory / "labels.json").read_text()))
    marker = directory / BUNDLE_FILE
    extra = json.loads(marker.read_text()) if marker.exists() else {}
    return _make_bundle(model, processor, labels, extra.get("sampling_rate"), extra.get("max_text_length"))


def _register() -> None:
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(FusionConfig.model_type, FusionConfig, exist_ok=True)
    AutoModel.register(FusionConfig, FusionModel, exist_ok=True)


_register()
