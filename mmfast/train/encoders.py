"""One encoder per modality for the fusion model: built-in small encoders or local Hugging Face checkpoints.

Every encoder maps its part of a collated batch to a token sequence (B, N, width) and a bool mask (B, N),
True = a real token. A missing modality is not the encoder's business: the fusion model masks the tokens of
samples that lack it (their rows are still encoded, from placeholders, so every parameter is used in every
step, as DDP needs).

    image   pixel_values (B, 3, H, W) in [0, 1]           builtin: patches -> conv embedding + positions + layers
    text    input_ids, attention_mask (B, L)              builtin: word-level tokens -> embedding + positions + layers
    audio   input_values (B, S), audio_lengths (B,)       builtin: frames -> log-magnitude spectrum -> linear
                                                          + positions + layers

Built-in encoders are small pre-norm transformers whose attention is `MultimodalAttention`: the transformers
attention-layer pattern (forward reads `config._attn_implementation`), so mmfast.patch switches it to mmfast's
fused op and mmfast.unpatch back to torch SDPA, with the same parameters.

A local checkpoint directory (`model.image_encoder: path/to/vit`) loads with AutoModel plus its processor
(AutoImageProcessor / AutoTokenizer / AutoFeatureExtractor); its `last_hidden_state` is the token sequence.
Composite checkpoints (CLIP, SigLIP) give their vision or text tower. The encoder's config is embedded in the
fusion config (`spec["config"]`), so a saved fusion model rebuilds it from its own directory.

The built-in tokenizer is a real transformers tokenizer (PreTrainedTokenizerFast over a `tokenizers`
WordLevel model built from the training texts, specials [PAD] [UNK] [MASK] [CLS]), saved with save_pretrained.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import ops
from ..nn import CrossModalAttention

__all__ = [
    "MODALITIES", "SPECIAL_TOKENS", "AudioEncoder", "EncoderLayer", "HFEncoder", "ImageEncoder", "LearnedOffsets",
    "MultimodalAttention",
    "TextEncoder", "build_encoder", "build_tokenizer", "builtin_spec", "eager_attention_forward", "load_hf_encoder",
    "load_processor",
]

MODALITIES = ("text", "image", "audio")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]", "[CLS]")
MMFAST = "mmfast"  # mmfast.integrations.transformers.NAME, without importing it (it registers nothing by import)


# ------------------------------------------------------------------------------------------------ attention


def eager_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, Tensor]:
    """attn_implementation="eager": q (B, Hq, Nq, D), k/v (B, Hk, Nk, D), bool mask (B, 1, 1|Nq, Nk) True = attend."""
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` heads
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(-1), dropout, module.training)
    return torch.matmul(probs, value).transpose(1, 2), probs


class MultimodalAttention(CrossModalAttention):
    """CrossModalAttention (same parameters: q_proj, k_proj, v_proj, o_proj, gate) that follows the transformers
    attention-layer pattern, so that mmfast.patch / unpatch switch it per model instance:

      config._attn_implementation == "mmfast": mmfast.ops.cross_modal_attention on the padded form with the
          key padding mask, the tanh gate fused in the op (as CrossModalAttention does);
      anything else ("sdpa", "eager", another registered name): ALL_ATTENTION_FUNCTIONS' function (torch SDPA
          for "sdpa") on the padded form with a (B, 1, 1, Nk) bool mask, then o_proj, then the gate.

    Rows of a sample with no key (no media) get zero attention on both paths (the op defines them so; SDPA's
    softmax over nothing is NaN, so those rows attend to every key there and are zeroed after: their
    gradients are zero), hence exactly the residual when gated. `config` is any transformers config (the
    fusion model's): read at every call, so set_attn_implementation on the model takes effect at once.
    """

    is_causal = False

    def __init__(self, config, dim: int, num_heads: int, num_kv_heads: int | None = None, kv_dim: int | None = None,
                 gated: bool = False, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(dim, num_heads, num_kv_heads, kv_dim, gated=gated, dropout=dropout, bias=bias)
        self.config = config
        # transformers' sdpa_attention_forward repeats k/v heads by this (grouped-query attention).
        self.num_key_value_groups = self.num_heads // self.num_kv_heads

    def forward(self, x: Tensor, context: Tensor, *, key_padding_mask: Tensor | None = None,
                residual: Tensor | None = None, **layout) -> Tensor:
        if any(value not in (None, False) for value in layout.values()):
            raise ValueError(f"{type(self).__name__}: only the padded, non-causal layout is used by the fusion model; "
                             f"got {sorted(k for k, v in layout.items() if v not in (None, False))}")
        self._check_inputs(x, context, residual, False)
        batch, len_q, len_k = x.shape[0], x.shape[1], context.shape[1]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(batch, len_q, heads, head_dim).transpose(1, 2)
        k = self.k_proj(context).view(batch, len_k, kv_heads, head_dim).transpose(1, 2)
        v = self.v_proj(context).view(batch, len_k, kv_heads, head_dim).transpose(1, 2)
        implementation = self.config._attn_implementation
        if implementation == MMFAST:
            _count_op_call(key_padding_mask)
            attn = ops.cross_modal_attention(q, k, v, key_padding_mask=key_padding_mask, scale=self.scaling,
                                             gate=self.gate)
            out = self.o_proj(attn.transpose(1, 2).reshape(batch, len_q, heads * head_dim))
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
            mask, empty = None, None
            if key_padding_mask is not None:
                empty = ~key_padding_mask.any(1)
                mask = (key_padding_mask | empty[:, None])[:, None, None, :]
            attn, _ = interface(self, q, k, v, mask, dropout=0.0, scaling=self.scaling, is_causal=False)
            if empty is not None:
                attn = attn.masked_fill(empty[:, None, None, None], 0.0)
            out = self.o_proj(attn.reshape(batch, len_q, heads * head_dim))
            if self.gated:
                out = torch.tanh(self.gate) * out
        out = F.dropout(out, self.dropout, self.training)
        if self.gated and residual is None:
            residual = x
        return out if residual is None else residual + out


def _count_op_call(key_padding_mask) -> None:
    """Count the op call in mmfast.integrations.transformers.report(), beside the model attention it runs."""
    from ..integrations.transformers import report
    report().calls["key_padding" if key_padding_mask is not None else "plain"] += 1


class LearnedOffsets(nn.Embedding):
    """Learned vectors placed beside or added to tokens (fusion queries, modality embeddings, prompts): an
    nn.Embedding that FusionModel initialises small (std config.initializer_range), so that at the start the
    tokens' content, not these offsets, dominates."""


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)) over the unmasked tokens, then x + mlp(norm(x))."""

    def __init__(self, config, dim: int, heads: int, kv_heads: int, ff_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.self_attn = MultimodalAttention(config, dim, heads, kv_heads, dropout=dropout, bias=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.dropout = dropout

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.attn_norm(x)
        x = self.self_attn(h, h, key_padding_mask=mask, residual=x)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


class _Builtin(nn.Module):
    """Shared tail of the built-in encoders: positions, layers, final norm."""

    def __init__(self, config, spec: dict, positions: int) -> None:
        super().__init__()
        dim = config.dim
        self.width = dim
        # N(0, 1) like the token content, not ViT's small init: with 0.02 the patches are indistinguishable at the
        # start, attention pooling averages them, and the image-only demo model stayed at chance.
        self.positions = nn.Embedding(positions, dim)
        self.layers = nn.ModuleList(
            EncoderLayer(config, dim, config.heads, config.kv_heads, config.ff_mult, config.dropout)
            for _ in range(spec.get("layers", 1)))
        self.norm = nn.LayerNorm(dim)

    def _encode(self, x: Tensor, mask: Tensor | None, prompts: Tensor | None = None) -> Tensor:
        x = x + self.positions.weight[: x.shape[1]]
        if prompts is not None:  # prompt tuning: learned tokens before the sequence, always attended
            x = torch.cat([prompts.expand(x.shape[0], -1, -1), x], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(x.shape[0], prompts.shape[-2]), mask], 1)
        # With nothing to mask, mask=None lets the attention skip the mask (the op's plain form, SDPA's no-mask path).
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class ImageEncoder(_Builtin):
    """Non-overlapping patches -> Conv2d embedding (+ positions) -> transformer layers. All tokens real."""

    def __init__(self, config, spec: dict) -> None:
        size, patch = spec["image_size"], spec["patch_size"]
        if size % patch:
            raise ValueError(f"image encoder: image_size {size} is not a multiple of patch_size {patch}")
        super().__init__(config, spec, (size // patch) ** 2)
        self.image_size, self.patch_size = size, patch
        self.patch_embed = nn.Conv2d(3, config.dim, patch, stride=patch)

    def input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward(self, pixel_values: Tensor, **_) -> tuple[Tensor, Tensor]:
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values: expected images of {self.image_size}x{self.image_size} (the image "
                             f"encoder's image_size), got {tuple(pixel_values.shape)}")
        # [0, 1] -> [-1, 1] (as ViT / CLIP processors normalise): zero-mean inputs train much faster from scratch
        x = self.patch_embed(pixel_values * 2.0 - 1.0).flatten(2).transpose(1, 2)
        x = self._encode(x, None)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


class TextEncoder(_Builtin):
    """Word-level token ids -> embedding (+ positions) -> transformer layers; mask = attention_mask."""

    def __init__(self, config, spec: dict) -> None:
        super().__init__(config, spec, spec["max_length"])
        self.max_length = spec["max_length"]
        self.embed_tokens = nn.Embedding(spec["vocab_size"], config.dim, padding_idx=spec.get("pad_token_id", 0))

    def input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompts: Tensor | None = None,
                **_) -> tuple[Tensor, Tensor]:
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"input_ids: {input_ids.shape[1]} tokens, more than the text encoder's max_length "
                             f"{self.max_length} (data.max_text_length when the model was built)")
        mask = attention_mask.bool()
        return self._encode(self.embed_tokens(input_ids), mask, prompts), _with_prompts(mask, prompts)


class AudioEncoder(_Builtin):
    """Waveform frames (frame_length samples, every hop_length) -> log-magnitude spectrum (rfft of the Hann-windowed
    frame, relative to its peak: the gain of a clip does not matter) -> LayerNorm over frequency -> linear ->
    positions -> layers.

    A frame is real when it lies inside the clip (audio_lengths); a clip shorter than one frame still has one
    (zero-padded) frame.
    """

    def __init__(self, config, spec: dict) -> None:
        super().__init__(config, spec, spec["max_frames"])
        self.frame_length, self.hop_length = spec["frame_length"], spec["hop_length"]
        self.max_frames = spec["max_frames"]
        bins = self.frame_length // 2 + 1
        self.spectrum_norm = nn.LayerNorm(bins)
        self.frame_proj = nn.Linear(bins, config.dim)

    def input_embeddings(self) -> nn.Module:
        return self.frame_proj

    def frames(self, lengths: Tensor) -> Tensor:
        """Real frames per clip: those inside the clip, at least one for a non-empty clip."""
        n = torch.div(lengths - self.frame_length, self.hop_length, rounding_mode="floor") + 1
        return torch.where(lengths > 0, n.clamp(min=1), torch.zeros_like(n))

    def forward(self, input_values: Tensor, audio_lengths: Tensor, **_) -> tuple[Tensor, Tensor]:
        if input_values.shape[1] < self.frame_length:
            input_values = F.pad(input_values, (0, self.frame_length - input_values.shape[1]))
        frames = input_values.unfold(1, self.frame_length, self.hop_length)[:, : self.max_frames]
        # The window is made per call, not kept as a buffer: transformers builds models on the meta device in
        # from_pretrained, where a non-persistent buffer would be left uninitialised.
        window = torch.hann_window(self.frame_length, device=frames.device, dtype=frames.dtype)
        spectrum = torch.fft.rfft(frames * window, dim=-1).abs()
        # Relative to the frame's peak (80 dB of range below it): the clip's gain drops out exactly.
        spectrum = spectrum / spectrum.amax(-1, keepdim=True).clamp_min(1e-6)
        x = self.frame_proj(self.spectrum_norm(torch.log(spectrum + 1e-4)))
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < self.frames(audio_lengths)[:, None]
        return self._encode(x, mask), mask


def _with_prompts(mask: Tensor, prompts: Tensor | None) -> Tensor:
    if prompts is None:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], prompts.shape[-2]), mask], 1)


# ------------------------------------------------------------------------------------------------ HF checkpoints


_TOWER = {"image": "vision_model", "text": "text_model", "audio": "audio_model"}


class HFEncoder(nn.Module):
    """A transformers model as a modality encoder: last_hidden_state is the token sequence.

    image: model(pixel_values=...), all tokens real. text: model(input_ids, attention_mask) (inputs_embeds with
    prompts prepended under prompt tuning), mask = attention_mask. audio: model(input_values, attention_mask when
    the feature extractor makes one), real frames from the model's _get_feat_extract_output_lengths when it has it.
    """

    def __init__(self, modality: str, spec: dict) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = dict(spec["config"])
        model_type = config.pop("model_type", None)
        if not model_type:
            raise ValueError(f"{modality} encoder: the embedded config has no model_type (spec from "
                             f"{spec.get('source')})")
        self.modality = modality
        self.model = AutoModel.from_config(AutoConfig.for_model(model_type, **config))
        if isinstance(getattr(self.model, "pooler", None), nn.Module):
            # BERT / ViT poolers: unused here (the fusion takes every token), and weights that get no gradient
            self.model.pooler = None
        self.width = _hidden_size(self.model.config, modality)
        self.audio_attention_mask = bool(spec.get("attention_mask", False))

    def load_pretrained(self, pretrained: nn.Module) -> None:
        """Copy the weights of the checkpoint's model (all but those of the dropped pooler)."""
        result = self.model.load_state_dict(pretrained.state_dict(), strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.startswith("pooler.")]
        if result.missing_keys or unexpected:
            raise ValueError(f"{self.modality} encoder: the checkpoint's weights do not fit the model built from its "
                             f"config (missing {result.missing_keys[:4]}, unexpected {unexpected[:4]})")

    def input_embeddings(self) -> nn.Module:
        try:
            module = self.model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            return module
        for name in ("feature_projection", "embeddings"):  # Wav2Vec2-like audio, other vision models
            if isinstance(getattr(self.model, name, None), nn.Module):
                return getattr(self.model, name)
        raise ValueError(f"{self.modality} encoder {type(self.model).__name__}: no input embedding module found "
                         "(get_input_embeddings, feature_projection, embeddings)")

    def forward(self, prompts: Tensor | None = None, **batch) -> tuple[Tensor, Tensor]:
        if self.modality == "image":
            x = self.model(pixel_values=batch["pixel_values"]).last_hidden_state
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if self.modality == "text":
            mask = batch["attention_mask"].bool()
            if prompts is None:
                x = self.model(input_ids=batch["input_ids"], attention_mask=mask.long()).last_hidden_state
            else:
                embeds = self.model.get_input_embeddings()(batch["input_ids"])
                embeds = torch.cat([prompts.expand(embeds.shape[0], -1, -1).to(embeds.dtype), embeds], 1)
                mask = _with_prompts(mask, prompts)
                x = self.model(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
            return x, mask
        values, lengths = batch["input_values"], batch["audio_lengths"]
        kwargs = {}
        if self.audio_attention_mask:
            kwargs["attention_mask"] = (torch.arange(values.shape[1], device=values.device)[None, :]
                                        < lengths.clamp(min=1)[:, None]).long()
        x = self.model(input_values=values, **kwargs).last_hidden_state
        if hasattr(self.model, "_get_feat_extract_output_lengths"):
            frames = self.model._get_feat_extract_output_lengths(lengths.clamp(min=1)).clamp(min=1)
            frames = torch.where(lengths > 0, frames, torch.zeros_like(frames))
        else:
            frames = torch.where(lengths > 0, x.shape[1], 0)
        return x, torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None]


def _hidden_size(config, modality: str) -> int:
    for key in ("hidden_size", "d_model", "dim", "embed_dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{modality} encoder {type(config).__name__}: no hidden_size in its config")


def load_hf_encoder(path: str, modality: str) -> tuple[nn.Module, object, dict]:
    """(pretrained transformers model, its processor, spec for FusionConfig.encoders) from a local directory.

    A composite checkpoint (CLIP, SigLIP) gives its vision_model / text_model tower. Raises ValueError naming
    model.<modality>_encoder for a path that is not a directory or not loadable.
    """
    from transformers import AutoModel, PreTrainedModel

    key = f"model.{modality}_encoder"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{key}: {path} is not a directory (expected 'builtin' or a local Hugging Face "
                                "checkpoint directory; nothing is downloaded)")
    try:
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{key}: cannot load {path} with AutoModel: {exc}") from None
    tower = getattr(model, _TOWER[modality], None)
    if isinstance(tower, PreTrainedModel):
        model = tower
    processor = load_processor(path, modality, key)
    spec = {"type": "hf", "source": str(path), "config": model.config.to_dict()}
    if modality == "audio":
        spec["attention_mask"] = bool(getattr(processor, "return_attention_mask", False))
    return model, processor, spec


def load_processor(path, modality: str, key: str = ""):
    """AutoImageProcessor / AutoTokenizer / AutoFeatureExtractor of a local directory."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    loader = {"image": AutoImageProcessor, "text": AutoTokenizer, "audio": AutoFeatureExtractor}[modality]
    try:
        return loader.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{key or modality}: cannot load the {modality} processor from {path} with "
                         f"{loader.__name__}: {exc}") from None


# ------------------------------------------------------------------------------------------------ builtin specs


def builtin_spec(modality: str, data, *, layers: int = 1, vocab_size: int | None = None, pad_token_id: int = 0) -> dict:
    """The FusionConfig.encoders entry of a built-in encoder, from the data section (image_size, sampling_rate,
    max_audio_seconds, max_text_length)."""
    if modality == "image":
        size = int(data.image_size)
        patch = max(1, size // 4)  # 4 x 4 = 16 patches: enough for 32x32 digits, cheap attention
        while size % patch:
            patch -= 1
        return {"type": "builtin", "image_size": size, "patch_size": patch, "layers": layers}
    if modality == "text":
        if vocab_size is None:
            raise ValueError("text encoder: vocab_size is needed for the built-in text encoder")
        return {"type": "builtin", "vocab_size": int(vocab_size), "pad_token_id": int(pad_token_id),
                "max_length": int(data.max_text_length), "layers": layers}
    if modality == "audio":
        rate = int(data.sampling_rate)
        # ~32 ms frames (256 samples at 8 kHz: 31 Hz bins, enough to tell DTMF tones apart), no overlap.
        frame = 1 << max(4, round(math.log2(rate * 0.032)))
        samples = max(frame, int(round(data.max_audio_seconds * rate)))
        return {"type": "builtin", "sampling_rate": rate, "frame_length": frame, "hop_length": frame,
                "max_frames": (samples - frame) // frame + 1, "max_samples": samples, "layers": layers}
    raise ValueError(f"modality: expected one of {', '.join(MODALITIES)}, got {modality!r}")


def build_encoder(modality: str, spec: dict, config) -> nn.Module:
    """The encoder module of one FusionConfig.encoders entry."""
    kind = spec.get("type")
    if kind == "hf":
        return HFEncoder(modality, spec)
    if kind != "builtin":
        raise ValueError(f"encoders.{modality}.type: expected 'builtin' or 'hf', got {kind!r}")
    return {"image": ImageEncoder, "text": TextEncoder, "audio": AudioEncoder}[modality](config, spec)


# ------------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(texts, max_length: int = 32):
    """A word-level PreTrainedTokenizerFast trained on `texts` (lower-cased NFKC words and punctuation).

    Specials [PAD]=0 [UNK]=1 [MASK]=2 [CLS]=3; every encoding starts with [CLS] (so a sample with an empty text
    still has one real token). Words never seen in training map to [UNK].
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator(sorted(t for t in texts if t), trainer)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if [ids[t] for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"tokenizer: special tokens got ids {ids}, expected 0..3 in order")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A",
                                                             special_tokens=[("[CLS]", ids["[CLS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]", cls_token="[CLS]", model_max_length=max_length,
                                   padding_side="right", truncation_side="right")
