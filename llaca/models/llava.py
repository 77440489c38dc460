"""The embedded default model: a tiny but real LLaVA, built from config, saved in the standard HF format.

It is *just* a `LlavaForConditionalGeneration` (CLIP vision tower + projector + Llama decoder) with a
`LlavaProcessor` (byte-level BPE tokenizer trained offline + CLIP image processor + chat template), so
every Hugging Face tool works on it, and real checkpoints go through the same `load_model` path.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..paths import atomic_dir

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
    # LLaVA's image tokens: "default" drops CLIP's CLS token (LLaVA-1.5), "full" keeps it as one more token
    feature_strategy: str = "default"


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
    tokenizer.model_max_length = spec.max_positions  # the validator's token limit (`llaca.data.token_limit`)
    image_processor = CLIPImageProcessorPil(
        size=size, crop_size=size, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.feature_strategy,
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
        vision_feature_select_strategy=spec.feature_strategy,
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


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | None = None,
                    load_in_4bit: bool = False, load_in_8bit: bool = False):
    """Load a LLaVA model + processor from a local folder (offline; never downloads). CPU unless `device`."""
    return load_model(path, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, dtype=dtype, device=device or "cpu")


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------------
# Any LLaVA checkpoint (a local folder or a hub id already in the user's HF cache), optionally quantized.

class ModelNotFound(FileNotFoundError):
    """A `--model` path or hub id that cannot be found offline (the CLI prints it as one line, exit 2)."""


class QuantizationUnavailable(ValueError):
    """4/8-bit loading asked for where bitsandbytes cannot run it (not installed, or no kernels for the device)."""


# Kept in full precision when quantizing: the projector is trained (a 4-bit Linear cannot be), the vision tower
# is small and frozen, lm_head feeds the loss. Patterns are matched from the start of the module name.
QUANT_SKIP_MODULES = [r".*vision_tower", r".*multi_modal_projector", "lm_head"]


def default_device() -> str:
    """This process's GPU under `accelerate launch` (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_model_path(path_or_id: str | os.PathLike) -> str:
    """An absolute folder path, or a hub id whose files are in the local HF cache. Never downloads."""
    text = str(path_or_id).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model folder {path} holds no config.json (not a Hugging Face checkpoint)")
        return str(path.resolve())
    looks_like_path = text.startswith((".", "/", "~")) or path.exists() or text.count("/") > 1 or not text
    if not looks_like_path:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(text, "config.json")
        except ValueError:  # not a valid repo id
            cached = None
        if isinstance(cached, str):
            return text
    raise ModelNotFound(
        f"model {text!r} not found: no such folder, and no hub checkpoint of that id in the local Hugging Face "
        f"cache (offline: nothing is downloaded; fetch it once with `huggingface-cli download {text}` or pass a folder)")


def _checkpoint_config(resolved: str) -> dict:
    import json

    if Path(resolved).is_dir():
        return json.loads((Path(resolved) / "config.json").read_text(encoding="utf-8"))
    from huggingface_hub import try_to_load_from_cache

    return json.loads(Path(try_to_load_from_cache(resolved, "config.json")).read_text(encoding="utf-8"))


# LLaVA-family containers the product loads: LLaVA itself (a ViT tower, e.g. llava-hf/llava-1.5-7b-hf and the tiny
# base) and FastVLM's (any `AutoModel` tower whose (B, C, h, w) map becomes image tokens: the small base's CNN).
LLAVA_MODEL_TYPES = ("llava", "fast_vlm")


def image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's features that become image tokens, (batch, tokens, channels), before the projector.

    LLaVA: hidden state `vision_feature_layer` of the ViT, CLS dropped under the "default" strategy. FastVLM (a CNN
    tower): its last feature map, flattened (h*w tokens), as `FastVlmModel.get_image_features` reads it.
    """
    cfg = model.config
    tower = model.model.vision_tower
    pixel_values = pixel_values.to(next(tower.parameters()).dtype)
    if cfg.model_type == "fast_vlm":
        return tower(pixel_values).last_hidden_state.flatten(2).transpose(1, 2)
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    return hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden


def check_llava(resolved: str) -> None:
    model_type = _checkpoint_config(resolved).get("model_type")
    if model_type not in LLAVA_MODEL_TYPES:
        raise ValueError(f"{resolved} is a {model_type!r} checkpoint; LLaCA Studio loads LLaVA-family checkpoints "
                         f"(model_type {' or '.join(repr(t) for t in LLAVA_MODEL_TYPES)}, e.g. llava-hf/llava-1.5-7b-hf)")
    folder = Path(resolved)
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin")) or ["no weights file"]
        raise ValueError(f"{resolved} has no .safetensors weights ({', '.join(pickled)}): only safetensors are "
                         "loaded (a pickle can run code); convert it, e.g. model.save_pretrained(out) in transformers")


def _probe_bitsandbytes(bits: int, device: str) -> None:
    """Run one tiny quantized matmul on `device`: bitsandbytes' support differs by version and device, so ask it."""
    flag = f"--load-in-{bits}bit"
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - missing package, or a broken native library
        raise QuantizationUnavailable(f"{flag} needs bitsandbytes, which cannot be imported here ({e})") from None
    try:
        if bits == 4:
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=_compute_dtype(device), quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer = layer.to(device)
        with torch.no_grad():
            layer(torch.randn(2, 64, device=device, dtype=_compute_dtype(device)))
    except Exception as e:  # noqa: BLE001 - whatever the backend says is the reason
        raise QuantizationUnavailable(
            f"{flag}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {bits}-bit layers on {device} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def _compute_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs (as QLoRA), float32 on CPU (measured: what bitsandbytes' CPU kernels run well)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def quantization_config(bits: int, device: str):
    """QLoRA's settings: NF4 + double quantization + bf16 compute (4-bit), or LLM.int8 (8-bit)."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=_compute_dtype(device), llm_int8_skip_modules=QUANT_SKIP_MODULES)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)


class _Int8CastNotice(logging.Filter):
    """bitsandbytes logs the expected fp32 -> fp16 input cast of 8-bit layers on every forward: keep it once."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "inputs will be cast" not in record.getMessage():
            return True
        first, _Int8CastNotice.seen = not _Int8CastNotice.seen, True
        return first


def quant_bits(load_in_4bit: bool = False, load_in_8bit: bool = False) -> int | None:
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of --load-in-4bit and --load-in-8bit")
    return 4 if load_in_4bit else 8 if load_in_8bit else None


def load_model(path_or_id: str | os.PathLike, load_in_4bit: bool = False, load_in_8bit: bool = False,
               dtype: torch.dtype | None = None, device: str | None = None):
    """Load any LLaVA checkpoint + its processor (its own chat template), offline, optionally 4/8-bit.

    dtype None: float32 on CPU, bfloat16 on a GPU (a 7B model in fp32 would double the memory for nothing).
    Quantized weights are placed on `device` at load time (bitsandbytes quantizes while loading).
    """
    bits = quant_bits(load_in_4bit, load_in_8bit)
    resolved = resolve_model_path(path_or_id)
    check_llava(resolved)
    device = str(device or default_device())
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    kwargs = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}  # never unpickle a .bin
    if bits:
        _probe_bitsandbytes(bits, device)
        kwargs.update(quantization_config=quantization_config(bits, device), device_map={"": device})
        if bits == 8:
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Int8CastNotice())
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    processor = AutoProcessor.from_pretrained(resolved, local_files_only=True)
    if getattr(processor, "chat_template", None) is None:  # older checkpoints ship none: LLaVA-1.5's format
        processor.chat_template = CHAT_TEMPLATE
    with _LOAD_LOCK:
        model = AutoModelForImageTextToText.from_pretrained(resolved, **kwargs)  # Llava- or FastVlmForConditionalGeneration
    model.eval()
    return model, processor


# transformers 5's from_pretrained is not safe to run in two threads at once: concurrent loads of two
# models were observed to come back with garbage weights (app engineer's repro with 4 threads). Serialize.
_LOAD_LOCK = threading.RLock()


def is_quantized(model) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))
