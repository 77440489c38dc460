"""The embedded default model: a tiny but real LLaVA, built from config, saved in the standard HF format.

It is *just* a `LlavaForConditionalGeneration` (CLIP vision tower + projector + Llama decoder) with a
`LlavaProcessor` (byte-level BPE tokenizer trained offline + CLIP image processor + chat template), so
every Hugging Face tool works on it, and real checkpoints go through the same `load_model` path.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .paths import atomic_dir

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_TOKEN = "<image>"

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>"), as a Jinja chat template over
# the multimodal message format of transformers ({"role", "content": [{"type": "image"|"text", ...}]}).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclasses.dataclass
class TinySpec:
    """Sizes of the embedded model (measured on 2 cores: ~5M params learns a CoIN-mini stage in a minute)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    vocab_size: int = 2048
    max_positions: int = 256


def train_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on the task texts: any typed question still tokenizes (bytes fall back)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",  # generation pads on the left; training builds its own padding
        model_max_length=1024,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: TinySpec = TinySpec()) -> LlavaProcessor:
    size = {"height": spec.image_size, "width": spec.image_size}
    image_processor = CLIPImageProcessorPil(
        size=size, crop_size=size, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(processor: LlavaProcessor, spec: TinySpec = TinySpec(), seed: int = 0) -> LlavaForConditionalGeneration:
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.text_hidden,
        intermediate_size=int(8 / 3 * spec.text_hidden) // 32 * 32,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def save_pretrained(model, processor, path: str | os.PathLike) -> Path:
    """Atomic save (temp dir + rename) in safetensors; readable by `from_pretrained` anywhere."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for f in Path(tmp).iterdir():  # transformers writes weights 0600; versions are shared read-only files
            f.chmod(0o644)
    return path


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load a LLaVA model + processor from a local folder (offline; never downloads)."""
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    if device:
        model.to(device)
    model.eval()
    return model, processor


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
