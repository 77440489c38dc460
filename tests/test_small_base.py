"""Smoke test of base v3 (`small`): assembled from the pinned wheels + the shipped adapter, it answers an image
question and a text question, and the product's tuner runs LoRA steps on it. (The suite's other tests run on
`tiny`; this is the one place CI pays for the 140M model: ~1 minute.)"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from llaca.models.small import CHAT_TEMPLATE, SMALL_ASSETS, lm_gguf


@pytest.fixture(scope="module")
def small_home(tmp_path_factory):
    """A registry with `small` installed exactly as the app's first launch does it."""
    from llaca.bases.install import ensure_base
    from llaca.versions import Registry

    home = tmp_path_factory.mktemp("small_home")
    events = []
    version = ensure_base(Registry(home), on_event=events.append, base="small")
    assert version.id == "small" and version.weights == "full"
    labels = [e["label"] for e in events if e.get("type") == "step"]
    assert labels == ["vision tower", "language model", "assemble", "trained projector + LoRA", "write"]
    return home


def test_chat_template_renders_text_exactly_as_smollm2s_own():
    """Text-only chats see the very prompt SmolLM2-Instruct was tuned with (its own template, read from the GGUF)."""
    from transformers import AutoTokenizer

    gguf = lm_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 2 plus 2?"}]
    theirs = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ours = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
    assert ours == theirs
    image_chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    rendered = tok.apply_chat_template(image_chat, tokenize=False, chat_template=CHAT_TEMPLATE)
    assert "<|im_start|>user\n<image>\nWhat is this?<|im_end|>" in rendered


def _picture(shape: str) -> Image.Image:
    image = Image.new("RGB", (64, 64), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)([14, 14, 50, 50], fill=(205, 35, 35))
    return image


def test_small_answers_an_image_question_and_a_text_question(small_home):
    """The installed version loads with transformers' classes, its answer depends on the picture (the tower ->
    projector -> LM path is wired), and it answers a text question as a chat LM does."""
    from llaca.serve.chat import answer_once
    from llaca.versions import Registry, load_version

    from llaca.models.small import IMAGE_SIZE, READOUTS, TOWER_VARIANT

    model, processor = load_version(Registry(small_home), "small")
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    readout = json.loads((SMALL_ASSETS / "meta.json").read_text())["build"].get("readout", "head")
    _, built_with = READOUTS[readout](TOWER_VARIANT, IMAGE_SIZE)  # the tower the shipped adapter was trained on
    assert model.config.vision_config.out_channels == built_with.out_channels
    # Shapes, not colours: the shipped builds name these two shapes ("square", "circle"), while build 2 answered
    # "white" to the colour of any plain square (docs/base-models.md): the check is that the picture reaches the answer.
    square = answer_once(model, processor, _picture("square"), "What shape is this?", max_new_tokens=8)
    circle = answer_once(model, processor, _picture("circle"), "What shape is this?", max_new_tokens=8)
    assert square.strip() and circle.strip() and square != circle, (square, circle)
    text = answer_once(model, processor, None, "What is the capital of France?", max_new_tokens=12)
    assert "paris" in text.lower(), text


def test_tuner_runs_lora_steps_on_small(small_home, coin_dir):
    from llaca.train.tuner import StageConfig, run_stage
    from llaca.versions import Registry

    registry = Registry(small_home)
    task = sorted(p for p in coin_dir.iterdir() if p.is_dir())[0]
    version = run_stage(StageConfig(data=str(task / "train"), method="llaca", parent="small", max_steps=3,
                                    batch_size=4, lr=2e-4, lora=True, lora_r=8, lora_alpha=16, checkpoint_every=0,
                                    evaluate_after=False), registry)
    assert version.weights == "lora" and version.meta["base_version"] == "small"
    adapter = json.loads((version.path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
    trace = version.meta.get("steps")
    assert trace == 3


def test_vision_blocks_put_lora_on_the_efficientnet_towers_last_block_and_head_conv(small_home, coin_dir):
    """`--vision-blocks 1` on `small` adapts what feeds its LM: LoRA on the last MBConv block's 1x1 convs and the head
    conv (the 7x7 map's 1,280 channels), beside the LM's, and no other tower layer; the version loads and answers."""
    import re

    from safetensors.torch import load_file

    from llaca.train.tuner import StageConfig, run_stage
    from llaca.versions import Registry

    task = sorted(p for p in coin_dir.iterdir() if p.is_dir())[0]
    version = run_stage(StageConfig(data=str(task / "train"), method="seq", parent="small", max_steps=2,
                                    batch_size=2, lr=2e-4, lora=True, lora_r=4, lora_alpha=8, vision_blocks=1,
                                    checkpoint_every=0, evaluate_after=False), Registry(small_home))
    adapter = load_file(version.path / "adapter" / "adapter_model.safetensors")
    tower = sorted({re.sub(r"\.lora_[AB].*", "", k.split("vision_tower.")[1]) for k in adapter if "vision_tower" in k})
    assert tower == ["encoder.blocks.20.expansion.expand_conv", "encoder.blocks.20.projection.project_conv",
                     "encoder.top_conv"], tower
    moved = [k for k in adapter if "vision_tower" in k and "lora_B" in k and adapter[k].abs().max() > 0]
    assert moved, "the tower's LoRA learned (lora_B starts at zero)"
    assert any("language_model" in k and "lora_" in k for k in adapter)

    from llaca.serve.chat import answer_once
    from llaca.versions import load_version

    model, processor = load_version(Registry(small_home), version.id)  # the version serves with its tower adapter
    assert answer_once(model, processor, _picture("square"), "What shape is this?", max_new_tokens=4).strip()


def test_the_bench_measures_a_candidate_build_from_its_output_folder_not_the_shipped_assets(tmp_path):
    """`python -m llaca.bench small --candidate DIR`: a build is measured before it ships; its version is assembled
    from DIR's adapter and meta (here a copy of the shipped ones, its meta marked), and assets/small is not read."""
    import shutil

    from llaca.bench.small import install
    from llaca.versions import Registry

    candidate = tmp_path / "candidate"
    shutil.copytree(SMALL_ASSETS, candidate)
    meta = json.loads((candidate / "meta.json").read_text())
    meta["metrics"]["base_accuracy"] = -1.0  # a value no shipped build has
    (candidate / "meta.json").write_text(json.dumps(meta))
    result = install(tmp_path / "home", candidate)
    version = Registry(tmp_path / "home").get("small")
    assert version.meta["metrics"]["base_accuracy"] == -1.0 and result["assets"] == str(candidate)


def test_shipped_adapter_is_what_the_build_recorded():
    """assets/small holds only what this project trained, within the issue's 60 MB."""
    size = sum(f.stat().st_size for f in SMALL_ASSETS.rglob("*") if f.is_file())
    assert size <= 60 * 2**20, size
    build = json.loads((SMALL_ASSETS / "meta.json").read_text())["build"]
    adapter = json.loads((SMALL_ASSETS / "adapter" / "adapter_config.json").read_text())
    # a fact-aligned build (stage 0') also ships, whole, the tower tail it taught: Lite2's last of 21 blocks + head conv
    from llaca.bases.small_build import fact_tail_modules

    tail = fact_tail_modules(21) if build.get("fact_align_epochs") else []  # build 5 predates the key
    assert adapter["r"] == build["lora_r"] and adapter["modules_to_save"] == ["multi_modal_projector", *tail]
    assert torch.__version__.startswith("2.13.0")


def test_shipped_adapter_has_the_model_card_its_build_writes():
    """assets/small/adapter/README.md is the card `small_build` writes from the meta beside it (not peft's blank
    template), and Hugging Face's ModelCard reads its metadata back."""
    from huggingface_hub import ModelCard

    from llaca.bases.model_card import model_card

    meta = json.loads((SMALL_ASSETS / "meta.json").read_text())
    saved = json.loads((SMALL_ASSETS / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    shipped = (SMALL_ASSETS / "adapter" / "README.md").read_text()
    assert shipped == str(model_card(meta, saved))
    assert "More Information Needed" not in shipped and f"**{meta['metrics']['base_accuracy']}%**" in shipped
    card = ModelCard.load(SMALL_ASSETS / "adapter" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "peft"


def test_the_head_plus_mean_readout_assembles_into_49_tokens_of_2560_channels():
    """`small_build --readout head+mean` (not shipped): the tower's 2,560 channels reach LLaVA's projector, which
    turns them into 49 LM-width image tokens."""
    from llaca.models.small import IMAGE_SIZE, assemble

    model, processor = assemble(0, readout="head+mean")
    assert model.model.multi_modal_projector.linear_1.in_features == 2560
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = model.get_image_features(pixel_values=pixels).pooler_output
    assert tokens.shape == (1, 49, model.config.text_config.hidden_size) and torch.isfinite(tokens).all()
