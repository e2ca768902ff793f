"""One training step of a small LLaVA-style model: forward with labels, backward, AdamW step.

A benchmark module for harness.py (`mmfast bench train-step`): the end-to-end measure of mmfast.patch. The
model is transformers' LlavaForConditionalGeneration built from a config (random weights, no download): a
tiny CLIP vision tower and a Llama decoder (grouped-query attention) with a 32000-token vocabulary, so that
the (tokens x vocab) logits weigh what they weigh in real fine-tuning. The batch is ragged: each sample has
one image (its image tokens right after the first token) and text of its own length, right-padded, labels
-100 on padding and image tokens. Dropout is off.

    unpatched         the model as transformers builds it (attn_implementation="sdpa"), PEFT's LoRA layers
    patched-<backend> the same model after mmfast.patch(model, backend=<backend>): attention on
                      mmfast.ops.cross_modal_attention, LoRA layers fused, the loss on linear cross-entropy
                      without logits

`train` in the shape says what trains: "full" (every parameter, AdamW states for all) or "lora" (PEFT LoRA
r=8 on the attention and MLP projections, the rest frozen: gradients and optimizer states are small, and
the logits dominate the memory of a step). Each step starts with the gradients freed (refresh) and ends
after optimizer.step(); the weights change from step to step as in training.
"""

from __future__ import annotations

import importlib.util

import torch

import mmfast
from mmfast import backends

from . import cross_entropy
from .harness import Workload

UNPATCHED = "unpatched"
PATCHED = "patched-"
VARIANTS = (UNPATCHED, *(f"{PATCHED}{b}" for b in backends.BACKENDS))
BASELINES = (UNPATCHED,)
OPS = ("cross_modal_attention", "lora_linear", "linear_cross_entropy")
LEGEND = (
    "unpatched: LlavaForConditionalGeneration (CLIP tower + Llama decoder, sdpa attention) from a config, "
    "forward with labels + backward + AdamW step; "
    "patched-<backend>: the same after mmfast.patch(model, backend=<backend>) "
    "(attention, LoRA layers, loss without logits)"
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    # Full fine-tuning of a 2-layer, 256-wide decoder over 4 x ~250 tokens: logits 4 x 256 x 32000.
    "full": {"batch": 4, "length": 256, "ragged": 37, "vocab": 32000, "hidden": 256, "intermediate": 688,
             "layers": 2, "heads": 8, "kv_heads": 2, "vision_hidden": 64, "vision_layers": 2, "image_size": 32,
             "patch": 8, "train": "full"},
    "lora": {"batch": 4, "length": 256, "ragged": 37, "vocab": 32000, "hidden": 256, "intermediate": 688,
             "layers": 2, "heads": 8, "kv_heads": 2, "vision_hidden": 64, "vision_layers": 2, "image_size": 32,
             "patch": 8, "train": "lora"},
}
QUICK = {"batch": 2, "length": 48, "ragged": 11, "vocab": 8000, "hidden": 64, "intermediate": 128, "layers": 1,
         "heads": 4, "kv_heads": 2, "vision_hidden": 32, "vision_layers": 1, "image_size": 16, "patch": 8,
         "train": "full"}
ITERATIONS = {False: (2, 8), True: (1, 3)}


def skip_reason(variant: str, device: torch.device) -> str | None:
    for package in ("transformers", "peft"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
    if variant.startswith(PATCHED):
        backend = variant.removeprefix(PATCHED)
        if backend == "triton" and device.type == "cpu":
            return cross_entropy.skip_reason(f"mmfast-{backend}", device)
        for op in OPS:
            reason = backends.unavailable_reason(op, backend, device)
            if reason is not None:
                return reason
    return None


def shape(quick: bool) -> dict:
    return QUICK if quick else SHAPES["full"]


def image_tokens(shape: dict) -> int:
    return (shape["image_size"] // shape["patch"]) ** 2


def lengths(shape: dict) -> list[int]:
    """The real length of each sample (image tokens included), the longest first."""
    return [shape["length"] - i * shape["ragged"] for i in range(shape["batch"])]


def tokens(shape: dict) -> int:
    return shape["batch"] * shape["length"]


def logits_bytes(shape: dict, dtype: torch.dtype) -> int:
    """One (tokens x vocab) buffer: what an unpatched step allocates (several times) and a patched one never."""
    return tokens(shape) * shape["vocab"] * dtype.itemsize


def config(shape: dict):
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=shape["vision_hidden"], intermediate_size=2 * shape["vision_hidden"],
        num_hidden_layers=shape["vision_layers"], num_attention_heads=4, image_size=shape["image_size"],
        patch_size=shape["patch"], attention_dropout=0.0)
    text = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(512, shape["length"]), pad_token_id=0)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=shape["vocab"] - 1,
                                    image_seq_length=image_tokens(shape))


def batch(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(1)
    n, length, vocab, image = shape["batch"], shape["length"], shape["vocab"], shape["vocab"] - 1
    ids = torch.randint(2, vocab - 1, (n, length), generator=generator)
    mask = torch.zeros(n, length, dtype=torch.long)
    for row, real in enumerate(lengths(shape)):
        mask[row, :real] = 1
    ids[mask == 0] = 0
    ids[:, 1:1 + image_tokens(shape)] = image
    labels = ids.masked_fill((mask == 0) | (ids == image), -100)
    pixels = torch.randn(n, 3, shape["image_size"], shape["image_size"], generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "pixel_values": pixels.to(device, dtype)}


def model(shape: dict, dtype: torch.dtype, device: torch.device):
    """The unpatched model, the same weights for every variant."""
    import peft
    import transformers

    torch.manual_seed(0)
    built = transformers.LlavaForConditionalGeneration._from_config(config(shape), attn_implementation="sdpa",
                                                                    dtype=dtype).to(device)
    if shape["train"] == "lora":
        lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        built = peft.get_peft_model(built, lora, autocast_adapter_dtype=False)
    elif shape["train"] != "full":
        raise ValueError(f"shape['train']: expected 'full' or 'lora', got {shape['train']!r}")
    return built.train()


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # The least a step reads and writes: the logits' last-layer input and output once (a fused loss reads
    # the hidden states and the head's weight; the rest of the model is small next to them), the trained
    # parameters read in forward and backward, their gradient written, and AdamW's read-modify-write of
    # parameter, exp_avg and exp_avg_sq (fp32 states). A floor for GB/s, not a model of the traffic.
    n, h, v = tokens(shape), shape["hidden"], shape["vocab"]
    head = 2 * (n * h + v * h) * dtype.itemsize
    trained = (2 * v * h + 12 * shape["layers"] * h * h) if shape["train"] == "full" else 0
    return head + trained * (3 * dtype.itemsize + 6 * 4)


def flops(shape: dict, dtype: torch.dtype) -> int:
    # The language model's matmuls, forward and backward (6 per parameter per token), and attention's.
    n, h, layers = tokens(shape), shape["hidden"], shape["layers"]
    kv = h * shape["kv_heads"] // shape["heads"]
    per_layer = h * (2 * h + 2 * kv) + 3 * h * shape["intermediate"]
    attention = layers * 4 * shape["batch"] * shape["length"] ** 2 * h * 3
    return 6 * n * (layers * per_layer + h * shape["vocab"]) + attention


def build(variant: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Workload:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    net = model(shape, dtype, device)
    if variant.startswith(PATCHED):
        report = mmfast.patch(net, backend=variant.removeprefix(PATCHED), strict=False)
        if not report.swapped.get("loss"):
            raise RuntimeError(f"mmfast.patch left the loss alone:\n{report}")
    inputs = batch(shape, dtype, device)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def refresh():
        optimizer.zero_grad(set_to_none=True)

    def step():
        loss = net(**inputs).loss
        loss.backward()
        optimizer.step()

    return Workload(step=step, refresh=refresh)
