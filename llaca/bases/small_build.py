"""Train what base v3 (`small`) adds to its pretrained parts: LLaVA's two stages, shrunk to 2 cores.

Stage 0 (optional, `--embed-align-epochs N`; off in the shipped build): the projector alone is fitted, with no LM
pass, to the LM's own embeddings of the short answers, so that stage 1 starts from image tokens that point at words.
Stage 0' (optional, `--fact-align-epochs N`; off in the shipped build): the tower's last block + head conv and the
projector learn, with no LM pass, to put on each image token the LM's embeddings of the words that say what its patch
shows (`fact_align`); the taught tail then ships in the adapter (peft's modules_to_save) and is frozen again.
Stage 1, feature alignment: only the projector learns, on one fixed question per visual attribute of base v2's
world (colour, shape, category, word, region, count: real drawings and emoji, fonts, shapes), as LLaVA-1.5
pre-trains its projector on image-caption pairs with the LM frozen.
Stage 2, visual instruction tuning: projector + LoRA adapters on every Linear of the LM, on the world's eleven
instruction families in many phrasings, mixed with text-only chat records whose answers are the untouched
SmolLM2's own (self-distillation), so the LM keeps the way it answers text. With `--turns-per-image K` each image
is asked up to K questions in one conversation, and `--group-by-length N` batches rows of similar length: more
answers per minute of the same two cores (both off in the shipped build).
Stage 3 (optional, `--repair-steps N`; off in the shipped build): language repair, half of each batch text-only
chat learned as the untouched LM's whole next-token distribution (KL to the model with its adapters off), half the
stage-2 mixture. `--from-adapter DIR` runs it on an adapter built before.
With stage 0', `--word-grid-until F` (off in the shipped build) starts stage 2 from ideal perception: an image row's
labelled tokens are the LM's embeddings of the words stage 0' teaches for their patches, with a chance falling from
1 to 0 over the first F of its steps (`with_word_grids`; build 17: no gain).

The tower is frozen, so its features are computed once per image and cached (`FeatureCache`); each step then runs
only projector + LM, feeding the projected features through `FastVlmModel`'s `mm_encoder_outputs`. With
`--tower-blocks N` the tower's last N blocks + head conv learn in stage 2 (LoRA, as `small`'s stages adapt its last
block): the cache keeps the frozen front's map and each step runs those blocks (`tower_tail`) before the projector.
What ships is the peft adapter (LoRA + the projector as a module to save), in `assets/small/adapter`. Deterministic
for a seed (and torch thread count: the build uses 2; explicit RNGs; a resumed run does not restore the dropout RNG).
`python -m llaca.bases.small_build --help`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import data as D
from ..data import world as base_world
from ..evaluation.evaluate import evaluate
from ..models.small import IMAGE_SIZE, READOUT, READOUTS, SMALL_ASSETS, TOWER_VARIANT, assemble
from ..models.vision import (efficientnet_front, efficientnet_tail, gradients_masked, only_the_taught_copy_learns,
                             twin_learning_masks)
from ..paths import atomic_dir, atomic_write_json, llaca_home
from ..train.tuner import LM_LINEAR_LAYERS
from .model_card import write_model_card
from .small import store_adapter
from .splits import split_fingerprint

LORA_TARGETS = LM_LINEAR_LAYERS
LORA_R, LORA_ALPHA = 32, 64
ALIGN_STEPS, ALIGN_LR = 150, 1e-3
TUNE_STEPS, TUNE_LR = 550, 4e-4
BATCH = 16
CHECKPOINT_EVERY = 50  # steps
N_ALIGN = 8000  # stage-1 records written (align_steps * batch of them are drawn)
# Stage 2: 4 of every 16 records are text-only chat that learns the untouched LM's whole next-token distribution (KL,
# on the repair prompts). Build 5 (shipped 2026-12-05) agrees with SmolLM2 on 90.0% of the text check; build 2 (2 of 16
# records, the LM's greedy answers as labels: `--no-distil-text --text-share 0.125 --tune-steps 700`) on 71.7%.
TEXT_SHARE = 0.25
DISTIL_TEXT = True
# Stage 3, language repair (off by default: tried 2026-12-03 on build 2 with 120 steps, `--repair-steps 120`, it raised
# the text agreement 71.7 -> 88.3% but cost the own test 35.3 -> 28.7% and the text keys 60.0 -> 53.3%; not shipped,
# docs/base-models.md): half of each batch text, learned from the untouched LM's distribution (KL), at a low rate.
REPAIR_STEPS, REPAIR_LR, REPAIR_TEXT_SHARE = 0, 2e-4, 0.5
# The tower's last N blocks + head conv learn in stage 2 (LoRA on their 1x1 convs, as `small`'s stages adapt its last
# block); 0 = the tower frozen, as builds 1-5. Their frozen front is what the feature cache keeps.
TOWER_BLOCKS = 0
# Stage 0 (`embed_align`): epochs of fitting the projector to the LM's embeddings of the answers before stage 1; 0 =
# none, as builds 1-6.
EMBED_ALIGN_EPOCHS = 0
# Stage 0' (`fact_align`): epochs of teaching the tower's last block + head conv and the projector to put, on each image
# token, the LM's embeddings of the words that say what that patch shows; 0 = none, as builds 1-8.
FACT_ALIGN_EPOCHS = 0
FACT_BLOCKS = 1  # the tower blocks (after the frozen front) that fact alignment teaches, with the head conv
# Stage 0' weight on keeping the untouched tail's features recoverable from the image tokens (`fact_align`'s `keep`);
# 0 = the words alone, as build 9.
FACT_KEEP = 0.0
# Stage 0' also says this word on the patch under each thing's centre (`world.patch_words`' `centre_word`), once per
# thing, so the tokens can be counted; None = no such word, as builds 9-14.
FACT_CENTRE_WORD = None
# Stage 0' also says the scene's number of things on every patch a thing owns (`world.patch_words`' `count_word`);
# False = not, as builds 1-20. Build 21 (build 14 + it): counting 79.2% of the own test (builds 9-20: 42-58), reading
# and multiple choice at build 14's level, 52.3% in all (docs/base-models.md).
FACT_COUNT_WORD = False
# Stage 2's records ask each image up to this many questions (a multi-turn record: the 49 image tokens and the chat
# template are paid once for k answers; one question: ~77 tokens an answer, three: ~44); 1 = one question, builds 1-7.
TURNS_PER_IMAGE = 1
# Stage 2 draws this many batches' records at once, sorts them by length and shuffles the batches (transformers'
# `group_by_length`): a batch is padded to its longest row, ~28% of the compute in builds 1-7's mixed batches of one
# question, more with conversations of 1-3 turns. 1 = off, as builds 1-7. Divides the checkpoint interval (50), so a
# resumed build draws what an uninterrupted one does.
GROUP_BY_LENGTH = 1
# Stage 2 pads each batch to a multiple of this many tokens (a few shapes); 1 = off. Build 12 used 32: its resident
# memory still grew over stage 2 (to 13.9 GB, as build 11's without it), so the growth is not the batch shapes.
PAD_TO_MULTIPLE_OF = 1
# How stage 2 averages the image rows' answer-token loss. "token": over every answer token of the batch, as LLaVA does
# (builds 1-15 and the default): a record weighs its answer's length (a letter or yes/no + <|im_end|> 2 tokens, a
# sentence 9.5, a box 18; the test's mean 3.9). "record": each record's mean token loss, then the mean over records,
# so every question weighs what it weighs in the test. Build 16 (build 5 + "record") scored 36.3% against 39.0: the
# one-token families left at chance are not short of gradient (docs/base-models.md, build 16).
ANSWER_LOSS = "token"
ANSWER_LOSSES = ("token", "record")
# Stage 2's curriculum from ideal perception (`with_word_grids`): the share of stage 2's steps over which an image row's
# labelled tokens are, with a chance falling linearly from 1 to 0, the LM's own embeddings of the words stage 0'
# teaches for their patches instead of what the tower and projector make of the pixels. 0: off (builds 1-16). Build
# 17 (build 15 + 0.5) scored 48.7% against 49.3: the LM learns the tasks fast on the grids and none of it carries to
# the real tokens (docs/base-models.md, build 17).
WORD_GRID_UNTIL = 0.0
# With stage 0': keep the projector as stage 0' leaves it, so the LM reads the words it put on the tokens. Stage 1
# trains the projector alone on captions: on build 15's test images the things' tokens whose nearest LM word is one of
# their patch's fell from 66.7% (stage 0') to 12.1% after stage 1 and 20.2% in the finished build
# (`experiments.projector_drift_probe`). True: stage 1 is skipped and stage 2 trains the LoRA alone. False: builds 1-18.
# Build 19 (build 15 + True) scored 48.7% against 49.3: yes/no 53.5 -> 72.1, counting 56.2 -> 45.8, multiple choice
# still at chance (docs/base-models.md, build 19).
KEEP_FACT_PROJECTOR = False
# With stage 0' on the twin map: keep the projector's columns that read the taught (word) half as stage 0' leaves them
# and let stages 1-2 train only the columns that read the untouched ImageNet half (`only_imagenet_columns_learn`), so
# the tokens keep the words (build 19's yes/no) and the projector can still add what ImageNet's map carries and the
# words do not (build 15's counting). False: builds 1-19. Build 20 (build 18 + True) scored 53.0% against 52.0: yes/no
# 72.1 and reading 80.0 kept, counting 43.8 ("1" to 45 of 48), and stage 1 on those columns alone barely learns (its
# loss 6.2 -> 5.8, the whole projector's 6.2 -> 1.0; docs/base-models.md, build 20).
SPLIT_FACT_PROJECTOR = False


# --------------------------------------------------------------------------- text-only chat (self-distilled)

def chat_prompts(seed: int = 0) -> list[str]:
    """Text prompts for self-distillation, built from templates; none of them is in `assets/small/text_check.json`."""
    countries = ["Canada", "Australia", "Egypt", "Kenya", "India", "China", "Mexico", "Peru", "Norway", "Sweden",
                 "Poland", "Greece", "Turkey", "Chile", "Ireland", "Portugal", "Austria", "Cuba", "Nepal", "Ghana"]
    things = ["a cat", "the moon", "a bicycle", "an apple tree", "rain", "a library", "a volcano", "a penguin",
              "the desert", "a river", "a train", "a garden", "snow", "a candle", "a bridge", "a clock"]
    words = ["fast", "light", "early", "open", "wet", "strong", "happy", "full", "soft", "loud", "young", "high"]
    animals = ["dog", "horse", "bird", "ant", "fish", "cow", "snake", "frog", "duck", "bee"]
    prompts = [f"What is the capital of {c}?" for c in countries]
    prompts += [f"Write one sentence about {t}." for t in things]
    prompts += [f"What is the opposite of {w}?" for w in words]
    prompts += [f"Give me a word that means the same as {w}." for w in words]
    prompts += [f"How many legs does a {a} have?" for a in animals]
    prompts += [f"Tell me a fun fact about the {a}." for a in animals]
    rng = random.Random(seed)
    prompts += [f"What is {a} plus {b}?" for a, b in ((rng.randint(2, 40), rng.randint(2, 40)) for _ in range(12))]
    prompts += ["Explain what a computer is in one sentence.", "Why do we need sleep?", "How do plants grow?",
                "What is a good way to start the day?", "Give me three tips for studying.", "What is friendship?",
                "Describe the colour blue to someone.", "What makes a good story?", "Why is exercise healthy?",
                "How do you make a cup of tea?", "What is the weather like in summer?", "Say hello in a friendly way.",
                "Hi! How are you?", "Can you help me plan a picnic?", "What should I pack for a beach trip?",
                "Suggest a name for a pet goldfish.", "What is a rainbow?", "Why is the sea salty?"]
    return prompts


def repair_prompts(seed: int = 0) -> list[str]:
    """More varied text prompts for stage 3 (`chat_prompts` and ~350 more from other templates and fillers), so the
    KL to the untouched LM covers facts, arithmetic, words, translation and open-ended writing. None of them is a
    prompt of `assets/small/text_check.json` (a test checks)."""
    rng = random.Random(seed + 7)
    countries = ["France", "Brazil", "Argentina", "Japan", "Germany", "Italy", "Spain", "Russia", "Thailand",
                 "Vietnam", "Morocco", "Nigeria", "Finland", "Denmark", "Belgium", "Hungary", "Colombia", "Iran",
                 "Pakistan", "New Zealand"]
    prompts = chat_prompts(seed)
    prompts += [f"What language is spoken in {c}?" for c in countries if c not in ("Brazil",)]
    prompts += [f"On which continent is {c}?" for c in countries]
    prompts += [f"What colour is {t}?" for t in ("snow", "coal", "a lemon", "a tomato", "milk", "chocolate",
                                                  "a carrot", "a frog", "an orange", "the sun", "a strawberry")]
    prompts += [f"What do you call a baby {a}?" for a in ("cow", "sheep", "horse", "duck", "goat", "bear",
                                                          "frog", "kangaroo", "lion", "deer")]
    prompts += [f"What is the plural of {w}?" for w in ("child", "foot", "tooth", "goose", "man", "woman",
                                                        "person", "leaf", "box", "city")]
    prompts += [f"What is the past tense of '{v}'?" for v in ("eat", "run", "see", "swim", "take", "write", "buy",
                                                              "think", "sing", "fly")]
    prompts += [f"Translate '{w}' into {lang}." for w in ("goodbye", "please", "water", "cat", "yes", "good morning")
                for lang in ("Spanish", "French", "German", "Italian")]
    prompts += [f"What is {a} times {b}?" for a, b in ((rng.randint(2, 12), rng.randint(2, 12)) for _ in range(12))]
    prompts += [f"What is {a} minus {b}?" for a, b in ((rng.randint(10, 60), rng.randint(1, 9)) for _ in range(12))]
    prompts += [f"What is the square root of {n * n}?" for n in (4, 5, 6, 7, 8, 10, 12)]
    prompts += [f"How many {small} are there in {big}?" for small, big in (
        ("minutes", "an hour"), ("seconds", "a minute"), ("months", "a year"), ("days", "a year"),
        ("weeks", "a year"), ("hours", "a week"), ("centimetres", "a metre"), ("grams", "a kilogram"))]
    prompts += [f"What is the opposite of {w}?" for w in ("cold", "small", "down", "old", "dark", "hard", "rich",
                                                          "empty", "slow", "early", "inside", "always")]
    prompts += [f"Give me a synonym for {w}." for w in ("sad", "big", "quick", "smart", "angry", "pretty", "begin")]
    prompts += [f"Who wrote {b}?" for b in ("Hamlet", "Pride and Prejudice", "Oliver Twist", "The Odyssey",
                                            "Don Quixote", "War and Peace", "Harry Potter", "Macbeth")]
    prompts += [f"Who painted {w}?" for w in ("The Starry Night", "The Scream", "Guernica", "The Last Supper",
                                              "Water Lilies")]
    prompts += [f"What is the chemical symbol for {e}?" for e in ("silver", "iron", "oxygen", "sodium", "carbon",
                                                                  "helium", "hydrogen", "copper")]
    prompts += [f"List three {k}." for k in ("vegetables", "animals", "colours", "sports", "countries in Europe",
                                             "musical instruments", "planets", "kinds of weather")]
    prompts += [f"Name a {k}." for k in ("mammal that lives in the sea", "bird that cannot fly", "fruit that is red",
                                         "country in Africa", "famous scientist", "vegetable that is orange")]
    prompts += [f"What is the largest {k}?" for k in ("animal on Earth", "country by area", "desert in the world",
                                                      "continent", "bone in the human body")]
    prompts += [f"Explain {t} in one sentence." for t in ("gravity", "photosynthesis", "electricity", "the internet",
                                                          "a volcano", "democracy", "a rainbow", "evaporation",
                                                          "a vaccine", "money")]
    prompts += [f"Write a short {k}." for k in ("thank-you note to a teacher", "invitation to a party",
                                                "poem about autumn", "message to cheer up a friend",
                                                "description of a sunset", "story about a lost dog in two sentences")]
    prompts += [f"What is {t} used for?" for t in ("a hammer", "a thermometer", "a compass", "a microscope",
                                                   "an umbrella", "a ladder", "soap", "a map")]
    prompts += [f"Where do {a} live?" for a in ("penguins", "camels", "polar bears", "koalas", "dolphins", "owls")]
    prompts += [f"What do {a} eat?" for a in ("pandas", "rabbits", "whales", "lions", "caterpillars", "squirrels")]
    prompts += ["Who invented the telephone?", "Who discovered penicillin?", "Who developed the theory of relativity?",
                "What is the smallest planet in our solar system?", "How many planets are in our solar system?",
                "What is the longest river in the world?", "What is the capital city of Australia?",
                "Which animal is the tallest in the world?", "What is the hottest planet?",
                "How many sides does a triangle have?", "How many sides does a hexagon have?",
                "What is the main gas in the air we breathe?", "What is the centre of an atom called?",
                "What is frozen water called?", "Which bird is a symbol of peace?", "What is a group of lions called?",
                "What is the shape of a football?", "Tell me a joke.", "What is your name?",
                "What can you help me with?", "Thank you!", "Good night!", "What day comes after Monday?",
                "What is the last month of the year?", "How many minutes are in two hours?",
                "What is half of 50?", "Is a tomato a fruit or a vegetable?", "Do fish breathe air?",
                "Why do leaves change colour in autumn?", "What is the difference between weather and climate?",
                "Summarise the story of Cinderella in two sentences.", "Give me a recipe idea for dinner.",
                "What are the three states of matter?", "Spell the word 'necessary'.",
                "Put these numbers in order: 7, 2, 9, 4.", "Which is heavier, a kilogram of feathers or a kilogram of "
                "iron?", "Finish the sentence: The early bird ...", "What rhymes with cat?"]
    return list(dict.fromkeys(prompts))  # in order, without repeats


def distill_chat(lm, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch: int = 16) -> list[dict]:
    """The untouched LM's own greedy answers: text records that keep the adapters from changing how it talks."""
    tokenizer.padding_side = "left"
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="self-distil chat", leave=False):
        chunk = prompts[i:i + batch]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, enc["input_ids"].shape[1]:]
        for p, ids, g in zip(chunk, new, tokenizer.batch_decode(new, skip_special_tokens=True)):
            out.append({"prompt": p, "answer": g.strip(), "finished": bool((ids == tokenizer.eos_token_id).any())})
    return out


def encode_chat(tokenizer, prompt: str, answer: str, finished: bool = True) -> dict:
    """input_ids / labels of one text-only turn: loss on the answer and its end-of-turn tokens only (not on the end
    of an answer the length limit cut: the LM would learn to stop mid-sentence)."""
    msgs = [{"role": "user", "content": prompt}]
    prefix = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(p_ids) + ids[len(p_ids):]
    if not finished:
        n_answer = len(tokenizer(prefix + answer, add_special_tokens=False)["input_ids"])
        labels = labels[:n_answer] + [-100] * (len(labels) - n_answer)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


# --------------------------------------------------------------------------- frozen tower features

class FeatureCache:
    """The frozen tower's features per image, computed once, kept as float16 on disk.

    The tower costs as much as a few LM tokens per image, but a build visits each image many times; cached, a
    step runs only projector + LM. Keyed by the image file's path and the tower's identity. With `front` (the
    tower's last blocks learn, `tower_blocks`), what is kept is the frozen front's (channels, h, w) map: the output
    of the stem and the first `front` blocks, which `tower_tail` carries on to the (tokens, channels) features.
    """

    def __init__(self, folder: Path, model, processor, front: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model, self.processor, self.front = model, processor, front
        self.memory: dict[str, torch.Tensor] = {}

    def _file(self, image: Path) -> Path:
        return self.folder / (hashlib.sha256(str(image).encode()).hexdigest()[:24] + ".npy")

    def fill(self, images: list[Path], batch: int = 32) -> None:
        todo = sorted({str(p) for p in images if str(p) not in self.memory})
        missing = [p for p in todo if not self._file(Path(p)).is_file()]
        # channels_last: PyTorch's CPU depthwise convolutions run 1.35x faster on it, with identical results
        tower = self.model.model.vision_tower.to(memory_format=torch.channels_last)
        for i in tqdm(range(0, len(missing), batch), desc="tower features", leave=False):
            chunk = missing[i:i + batch]
            pixels = self.processor.image_processor([D.load_image(p) for p in chunk], return_tensors="pt")["pixel_values"]
            pixels = pixels.to(memory_format=torch.channels_last)
            with torch.no_grad():
                if self.front is None:
                    # (B, tokens, C), as FastVLM reads the (B, C, h, w) map
                    maps = tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)
                else:
                    maps = efficientnet_front(tower, pixels, self.front)
            for p, m in zip(chunk, maps):
                np.save(self._file(Path(p)), m.contiguous().to(torch.float16).numpy())
        for p in todo:
            self.memory[p] = torch.from_numpy(np.load(self._file(Path(p))))

    def __getitem__(self, image: Path) -> torch.Tensor:
        return self.memory[str(image)]

    def n_tokens(self, image: Path) -> int:
        """Image tokens the LM reads for `image`: the map's positions (the tower's tail keeps a stride-32 map's)."""
        shape = self.memory[str(image)].shape
        return shape[0] if self.front is None else shape[1] * shape[2]


def tower_tail(model, front_maps: torch.Tensor, blocks: int) -> torch.Tensor:
    """The tower's last `blocks` blocks (those after the cached front, `FeatureCache.front`) + its head conv:
    (B, C, h, w) front maps -> the (B, tokens, channels) features FastVLM reads. Runs the model's own modules, so
    their LoRA adapters act."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return efficientnet_tail(inner.model.vision_tower, front_maps, blocks).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- stage 0: towards the LM's words

def answer_tokens(tokenizer, answer: str) -> list[int]:
    """The token ids an answer is spelled with, at the start of a reply and after a space."""
    return sorted(set(tokenizer(answer, add_special_tokens=False).input_ids)
                  | set(tokenizer(" " + answer, add_special_tokens=False).input_ids))


def names_the_image(answer: str) -> bool:
    """A short answer of plain words that names what is in its image (a word, colour, shape, count, place), not a
    yes/no, an option letter, a box, a sentence or 'unanswerable': stage 0's targets."""
    words = answer.split()
    return (len(words) <= 3 and all(w.isalnum() for w in words) and not (len(answer) == 1 and answer.isalpha())
            and answer.lower() not in ("yes", "no", base_world.UNANSWERABLE))


def naming_turns(records: list[D.Record]) -> list[D.Record]:
    """Stage 0's targets: one single-turn record per answer that names its image (a multi-turn record gives one for
    each such turn)."""
    return [D.Record(r.id, r.image, [turn]) for r in records for turn in r.turns if names_the_image(turn[1])]


def token_bag(tokens: torch.Tensor, table: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """(B, tokens, D) image tokens, (V, D) unit-norm embedding rows -> (B, V): each token's soft-max over the rows by
    cosine, averaged over the image's tokens (stage 0's bag: some tokens may carry the colour, others the word)."""
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    return torch.softmax(unit @ table.T / temperature, -1).mean(1)


def fit_epochs(n: int, loss_of, opt, epochs: int, batch: int, gen: torch.Generator, desc: str,
               log: list | None = None) -> int:
    """The LM-free stages' loop: `epochs` shuffled passes over items 0..n-1 in batches, `loss_of(indices)` minimised
    with `opt` on a cosine decay to zero; returns the steps taken."""
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    bar = tqdm(total=steps, desc=desc)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch):
            loss = loss_of(order[i:i + batch])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log is not None:
                log.append({"phase": desc, "epoch": epoch + 1, "loss": round(loss.item(), 4)})
    bar.close()
    return steps


def embedding_table(emb: torch.Tensor, targets: list[list[int]], rows: int, gen: torch.Generator):
    """The rows of the LM's (V, D) embedding matrix an image token is scored against: every target token, then
    random others up to `rows`. Returns (token ids, token id -> row, the (rows, D) unit-norm table)."""
    wanted = sorted({t for ts in targets for t in ts})
    known = set(wanted)
    others = [t for t in torch.randperm(emb.shape[0], generator=gen).tolist() if t not in known]
    vocab = wanted + others[:max(0, rows - len(wanted))]
    return vocab, {t: i for i, t in enumerate(vocab)}, torch.nn.functional.normalize(emb[vocab], dim=-1)


def rescale_to_word_norm(projector, features: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Scale the projector's last Linear so its image tokens for `features` enter the LM at the mean norm of its
    word embeddings (a cosine fit leaves their norm free). Returns the factor."""
    with torch.no_grad():
        scale = emb.norm(dim=-1).mean() / projector(features).norm(dim=-1).mean()
        last = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return scale


def embed_align(model, records: list[D.Record], cache: FeatureCache, tokenizer, epochs: int, seed: int = 0,
                batch: int = 64, lr: float = 2e-3, table_rows: int = 4096, temperature: float = 0.05,
                log: list | None = None) -> dict:
    """Stage 0: place the projector's image tokens near the LM's own embeddings of the words that answer them.

    LLaVA's stage 1 teaches the projector through the whole LM (forward and backward through 30 layers per
    record). Here the LM's input embeddings (tied to its head in SmolLM2) serve as the target instead: each image's
    49 projected tokens are scored by cosine against `table_rows` rows of the embedding matrix (every answer token,
    the rest drawn at random), soft-maxed per token, averaged over the tokens (a bag: some tokens may carry the
    colour, others the word), and the answer's tokens are the target. No LM pass, so an epoch over thousands of
    cached images takes seconds; the LM then starts from image tokens that point at the words it should say. The
    output is rescaled to the embeddings' mean norm at the end, so the tokens enter the LM at a word's scale.
    Returns the fit's figures.
    """
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight.detach().float()
    targets = [answer_tokens(tokenizer, r.answer) for r in records]
    vocab, index, table = embedding_table(emb, targets, table_rows, gen)
    rows = [[index[t] for t in ts] for ts in targets]  # each record's answer tokens as rows of the table
    projector = projector_of(model)
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)

    def loss_of(chunk: list[int]) -> torch.Tensor:
        probs = token_bag(projector(torch.stack([cache[records[j].image] for j in chunk]).float()), table,
                          temperature)  # (B, V)
        return torch.stack([-torch.log(probs[k, rows[j]] + 1e-9).mean() for k, j in enumerate(chunk)]).mean()

    steps = fit_epochs(len(records), loss_of, opt, epochs, batch, gen, "embed-align", log)
    scale = rescale_to_word_norm(projector, torch.stack([cache[r.image] for r in records[:512]]).float(), emb)
    return {"embed_align_steps": steps, "embed_align_vocab": len(vocab), "embed_align_scale": round(scale.item(), 4)}


# --------------------------------------------------------------------------- stage 0': facts on every image token

def patch_targets(scene, tokenizer, grid: int, centre_word: str | None = None,
                  count_word: bool = False) -> list[list[int]]:
    """Per image token (row-major over the tower's grid x grid map): the token ids of the words that say what that
    patch shows (`world.patch_words`, with its `centre_word` and `count_word`); [] where nothing is to be said
    (background, an empty frame)."""
    return [sorted({t for w in words for t in answer_tokens(tokenizer, w)})
            for words in base_world.patch_words(scene, grid, centre_word, count_word)]


def fact_tokens(model, fronts: torch.Tensor, blocks: int) -> torch.Tensor:
    """(B, C, h, w) frozen-front maps -> the (B, tokens, D) image tokens the LM would read: tail, then projector."""
    from ..train.tuner import native_bf16

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16("cpu")):
        return projector_of(model)(tower_tail(model, fronts, blocks)).float()


def fact_logprobs(tokens: torch.Tensor, table: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """(B, tokens, D) image tokens -> (B, tokens, rows) log-probabilities of each over the table's words by cosine."""
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    return torch.log_softmax(unit @ table.T / temperature, -1)


def keep_loss(decoded: torch.Tensor, before: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Share of the untouched tower's feature variance a linear read of the image tokens misses: the mean squared
    error of `decoded` against the frozen features `before`, both in units of `before`'s per-channel spread (so 1.0
    is knowing nothing beyond the mean, 0.0 is all of it). `fact_align`'s second term (`keep`)."""
    return (decoded - (before - mean) / std).pow(2).mean()


def fact_loss(logp: torch.Tensor, mask: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Mean over images of `fact_align`'s cross-entropy: an image of things scores the mean over its labelled tokens
    (`mask`, `_target_mask`); an image whose words belong to the whole picture (`whole`: a written word) scores once
    on the bag of its tokens (the mean of their distributions, as stage 0's `token_bag`), so the tokens away from
    the word need not say it. Per image, so that a word weighs as much as a picture of things with 49 tokens."""
    token_loss = -(logp * mask).sum(-1)  # (B, tokens)
    labelled = (mask.sum(-1) > 0).float()
    things = (token_loss * labelled).sum(1) / labelled.sum(1).clamp(min=1)
    bag = torch.logsumexp(logp, 1) - math.log(logp.shape[1])  # (B, rows)
    words = -(bag * mask[:, 0]).sum(-1)
    per_image = torch.where(whole, words, things)[whole | (labelled.sum(1) > 0)]
    return per_image.mean() if len(per_image) else logp.sum() * 0


def _target_mask(targets: list[list[list[int]]], n_rows: int) -> torch.Tensor:
    """(B, tokens, rows) float mask of each token's target rows, each token's row normalised to sum 1 (or 0)."""
    mask = torch.zeros(len(targets), len(targets[0]), n_rows)
    for b, per_token in enumerate(targets):
        for k, rows in enumerate(per_token):
            if rows:
                mask[b, k, rows] = 1.0 / len(rows)
    return mask


def fact_align(model, images: list, scenes: list, cache: FeatureCache, tokenizer, epochs: int,
               blocks: int = FACT_BLOCKS, seed: int = 0, batch: int = 32, lr: float = 5e-3, tail_lr: float = 1e-3,
               table_rows: int = 4096, grid: int | None = None, test: tuple[list, list] | None = None,
               log: list | None = None, keep: float = 0.0, centre_word: str | None = None,
               count_word: bool = False) -> dict:
    """Stage 0': the tower's last `blocks` blocks + head conv and the projector learn to put, on each image token, the
    LM's embedding of the words that say what its patch shows (a shape's colour and shape, a drawing's name and
    group, the written word), so the LM reads the scene from its tokens as it would read it from text.

    Why: with the scene's exact facts as text, `small`'s LM learns 91% of the own test in the build's budget
    (`experiments/small_oracle_lm.py`), from the frozen tower's tokens 39%; a probe reads 90% of the written words
    once the tower's last block learns (76% frozen). Dense and LM-free, this costs a tail + projector pass per image,
    no LM, so it can pass over the images several times; build 7's stage 0 did the same per image (a bag of the
    tokens) with the tower frozen and lifted only reading. The loss per token is the cross-entropy against its words
    spread evenly (`_target_mask`); the tail's BatchNorm statistics and squeeze-excite gate stay as trained
    (only its convolutions learn). A written word is scored on the bag of the image's tokens instead (`fact_loss`).
    `cache` keeps the frozen front (`FeatureCache(front=...)`). `test`: (images, scenes) scored at the end
    (`fact_accuracy`): things' tokens whose nearest table word is one of theirs, written words read off the bag.

    On a twin-head tower (`readout="twin"`, `efficientnet_lite_twin_tower`) only the tail's second copy learns
    (`twin_learning_masks` on its gradients): the tokens keep the untouched ImageNet map beside the taught one.

    `centre_word`: also put on the token under each thing's centre (`world.patch_words`), so that the tokens say how
    many things there are, not only what they are (the words are on every patch a thing covers).
    `count_word`: every patch a thing owns also says the scene's number of things (`world.patch_words`): builds
    9-20 counted 42-58% of the own test against the frozen map's 72.9 (build 5).

    `keep` > 0 adds `keep` x `keep_loss`: a linear decoder (learned alongside, then dropped) must recover the
    untouched tail's features from the image tokens. Words say what a patch shows, not which copy of a thing it is,
    where its edges are or how many there are; build 9 (keep 0) read 57.5% of the words but counted 45.8% against
    the frozen tower's 72.9 (build 5). The term asks the tokens to carry the words *and* what the frozen map
    carried, so the LM can still learn from the latter what words do not say. The test's share of that variance kept
    is reported.
    """
    gen = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight.detach().float()
    grid = grid or cache[images[0]].shape[-1]  # the tail keeps the front's stride: `small`'s 7 x 7 map at 224 px
    targets = [patch_targets(sc, tokenizer, grid, centre_word, count_word) for sc in scenes]
    test_targets = [patch_targets(sc, tokenizer, grid, centre_word, count_word) for sc in test[1]] if test else []
    vocab, index, table = embedding_table(emb, [t for per in targets + test_targets for t in per], table_rows, gen)
    rows = [[[index[t] for t in per] for per in image] for image in targets]
    whole = torch.tensor([sc.kind == "text" for sc in scenes])
    tower = model.model.vision_tower
    tail = [m for b in tower.encoder.blocks[len(tower.encoder.blocks) - blocks:] for name, m in b.named_modules()
            if isinstance(m, torch.nn.Conv2d) and "squeeze_excite" not in name] + [tower.encoder.top_conv]
    tail_params = [p for m in tail for p in m.parameters()]
    projector = projector_of(model)
    was_learning = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad = False
    for p in tail_params + list(projector.parameters()):
        p.requires_grad = True
    groups = [{"params": tail_params, "lr": tail_lr}, {"params": list(projector.parameters()), "lr": lr}]
    if twin_learning_masks(tower) and blocks != 1:  # a twin-head tower teaches only its second copy of the tail
        raise ValueError(f"a twin-head tower has one block in two copies: blocks={blocks} would teach blocks both "
                         "copies read")
    model.eval()  # the tower's BatchNorm statistics and drop-connect as the base runs them
    if keep:  # the untouched tail's features, per channel standardised, and a decoder from the tokens to them
        before = TailFeatures(cache, model, blocks, list(images) + (list(test[0]) if test else []))
        sample = torch.stack([before[im] for im in images[:512]]).float().flatten(0, 1)
        mean, std = sample.mean(0), sample.std(0).clamp(min=1e-3)
        decoder = torch.nn.Linear(emb.shape[1], sample.shape[1])
        torch.nn.init.zeros_(decoder.weight)
        torch.nn.init.zeros_(decoder.bias)
        groups.append({"params": list(decoder.parameters()), "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)

    def loss_of(chunk: list[int]) -> torch.Tensor:
        tokens = fact_tokens(model, torch.stack([cache[images[j]] for j in chunk]).float(), blocks)
        loss = fact_loss(fact_logprobs(tokens, table), _target_mask([rows[j] for j in chunk], len(vocab)),
                         whole[chunk])
        if keep:
            loss = loss + keep * keep_loss(decoder(tokens), torch.stack([before[images[j]] for j in chunk]).float(),
                                           mean, std)
        return loss

    log = [] if log is None else log
    with only_the_taught_copy_learns(tower):
        steps = fit_epochs(len(images), loss_of, opt, epochs, batch, gen, "fact-align", log)
    for p, learning in was_learning.items():  # what learns next is the caller's to say, as before
        p.requires_grad = learning
    losses = [e["loss"] for e in log if e["phase"] == "fact-align"]
    info = {"fact_align_steps": steps, "fact_align_images": len(images), "fact_align_vocab": len(vocab),
            "fact_align_keep": keep, "fact_align_centre_word": centre_word, "fact_align_count_word": count_word,
            "fact_align_loss_first_20": round(sum(losses[:20]) / len(losses[:20]), 4),
            "fact_align_loss_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
    if test:
        test_whole = [sc.kind == "text" for sc in test[1]]
        for name, keep_words in (("things", False), ("words", True)):  # tokens of things; written words, one each
            chosen = [i for i, w in enumerate(test_whole) if w == keep_words]
            info[f"fact_align_test_{name}_accuracy"] = round(100 * fact_accuracy(
                model, [test[0][i] for i in chosen], [test_targets[i] for i in chosen], cache, table, index, blocks,
                whole=keep_words), 1)
        if keep:
            with torch.no_grad():
                missed = keep_loss(decoder(fact_tokens(model, torch.stack([cache[im] for im in test[0]]).float(),
                                                       blocks)),
                                   torch.stack([before[im] for im in test[0]]).float(), mean, std)
            info["fact_align_test_kept"] = round(1 - missed.item(), 3)
    with torch.no_grad():
        features = tower_tail(model, torch.stack([cache[im] for im in images[:256]]).float(), blocks)
    info["fact_align_scale"] = round(rescale_to_word_norm(projector, features, emb).item(), 4)
    return info


class TailFeatures:
    """`FeatureCache`'s interface over a tower whose tail learned and is frozen again (after `fact_align`): each
    image's features = the tail run once on its cached front, kept in memory as float16 (49 x 1280 = 125 KB)."""

    def __init__(self, front: FeatureCache, model, blocks: int, images: list, batch: int = 64):
        self.memory: dict[str, torch.Tensor] = {}
        todo = {str(p): p for p in images}
        keys = sorted(todo)
        with torch.no_grad():
            for i in tqdm(range(0, len(keys), batch), desc="tower tail", leave=False):
                chunk = keys[i:i + batch]
                feats = tower_tail(model, torch.stack([front[todo[k]] for k in chunk]).float(), blocks)
                self.memory.update({k: f.to(torch.float16) for k, f in zip(chunk, feats)})

    def __getitem__(self, image) -> torch.Tensor:
        return self.memory[str(image)]

    def n_tokens(self, image) -> int:
        return self.memory[str(image)].shape[0]


def fact_accuracy(model, images: list, targets: list[list[list[int]]], cache: FeatureCache, table: torch.Tensor,
                  index: dict[int, int], blocks: int, whole: bool = False) -> float:
    """Share of the labelled image tokens whose nearest table word (by cosine) is one of their patch's words; with
    `whole`, of the images whose bag of tokens (`fact_loss`) puts most weight on one of their words."""
    hit = total = 0
    with torch.no_grad():
        for i in range(0, len(images), 64):
            logp = fact_logprobs(fact_tokens(model, torch.stack([cache[im] for im in images[i:i + 64]]).float(),
                                             blocks), table)
            best = (torch.logsumexp(logp, 1, keepdim=True) if whole else logp).argmax(-1)
            for b, per_token in enumerate(targets[i:i + 64]):
                for k, ids in enumerate(per_token[:1] if whole else per_token):  # a whole image's: the same words
                    if ids:
                        total += 1
                        hit += int(best[b, k].item() in {index[t] for t in ids})
    return hit / max(1, total)


# --------------------------------------------------------------------------- the training loop

def projector_of(model):
    """The projector module that trains (peft's modules_to_save copy once the model is wrapped)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.multi_modal_projector


@contextmanager
def only_imagenet_columns_learn(projector):
    """Within it, of the projector only its first layer's columns that read a twin map's first, untouched ImageNet
    half learn (`efficientnet_lite_twin_tower`; the taught copy is the second half, `twin_learning_masks`): its other
    parameters are frozen (and stay so) and the first layer's gradient on the taught half is zeroed
    (`gradients_masked`), so its bias, its second layer and its columns on the taught half keep their values
    (`SPLIT_FACT_PROJECTOR`)."""
    for p in projector.parameters():
        p.requires_grad = False
    weight = projector.linear_1.weight
    weight.requires_grad = True
    mask = torch.zeros_like(weight)
    mask[:, :weight.shape[1] // 2] = 1.0
    with gradients_masked(projector, {"linear_1.weight": mask}):
        yield


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, per: str = "token") -> torch.Tensor:
    """Cross-entropy of answer tokens (`logits` and `targets` of the labelled positions, `rows` their batch row),
    averaged over tokens, or (`per="record"`) over each row's tokens and then over rows (`ANSWER_LOSS`)."""
    if per == "token":
        return torch.nn.functional.cross_entropy(logits, targets)
    if per != "record":
        raise ValueError(f"answer loss per {per!r}: choose one of {ANSWER_LOSSES}")
    token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    _, row_of = torch.unique(rows, return_inverse=True)
    n_rows = int(row_of.max()) + 1
    sums = torch.zeros(n_rows, dtype=token.dtype).index_add(0, row_of, token)
    counts = torch.zeros(n_rows, dtype=token.dtype).index_add(0, row_of, torch.ones_like(token))
    return (sums / counts).mean()


def step_loss(model, items: list[dict], features: list[torch.Tensor | None], pad_id: int,
              distil_text: bool = False, tower_blocks: int = 0, pad_to_multiple_of: int = 1,
              per: str = "token") -> torch.Tensor:
    """Mean answer-token loss of a batch; image rows get their cached tower features projected into the <image> slots.

    The LM head runs only where a label is: over a 49k vocabulary it is a fifth of the LM's compute per token, and
    nine in ten positions here (system prompt, image, question) carry no label. With `distil_text` (stage 3) the
    text-only rows learn the untouched LM's whole next-token distribution instead of its greedy tokens: KL(teacher ||
    student) per answer token, the teacher being this model with its adapters off (peft's `disable_adapter`), so the
    LoRA is pulled back towards SmolLM2 wherever a text answer is, including where SmolLM2 itself hesitates. With
    `tower_blocks` the cached features are the tower's frozen front and its last blocks run here (`tower_tail`).
    bf16 autocast only where the CPU has it natively (an AVX2-only CPU emulates it ~30x slower). `per`: how the
    image rows' cross-entropy is averaged (`answer_loss`).
    """
    from ..train.tuner import native_bf16

    batch = D.collate(items, pad_id, pad_to_multiple_of)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {}
    rows = [f for f in features if f is not None]
    if rows:
        image_features = torch.stack(rows).float()
        if tower_blocks:
            image_features = tower_tail(model, image_features, tower_blocks)
        projected = projector_of(model)(image_features)
        grids = [item.get("word_grid") for item, f in zip(items, features) if f is not None]
        if any(g is not None for g in grids):
            projected = with_word_grids(projected, grids, inner.get_input_embeddings().weight)
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=projected)}
    text = torch.tensor([f is None for f in features])
    distil = distil_text and bool(text.any())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16("cpu")):
        hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)[0]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logits = inner.lm_head(hidden[:, :-1][keep]).float()
        rows = keep.nonzero()[:, 0]  # per kept position: its batch row
        if not distil:
            return answer_loss(logits, targets[keep], rows, per)
        with torch.no_grad(), model.disable_adapter():
            teacher = inner.model(input_ids=batch["input_ids"][text], attention_mask=batch["attention_mask"][text])[0]
            teacher = inner.lm_head(teacher[:, :-1][keep[text]]).float()
    on_text = text[rows]  # per kept position: does it belong to a text row?
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits[on_text], -1), torch.log_softmax(teacher, -1),
                                    log_target=True, reduction="batchmean")
    if not (~on_text).any():
        return kl
    return answer_loss(logits[~on_text], targets[keep][~on_text], rows[~on_text], per) + kl


def with_word_grids(tokens: torch.Tensor, grids: list, emb: torch.Tensor) -> torch.Tensor:
    """(B, tokens, D) projected image tokens with, on each row that has a word grid (per token: the token ids of its
    patch's words, `patch_targets`; None for a row without one), every labelled token replaced by the mean of its
    words' embeddings rescaled to the mean norm of the LM's word embeddings: what stage 0' aims the token at
    (`fact_align`), seen without error. Background tokens stay the model's own.

    Why (`--word-grid-until`): with the scene's exact facts as text the LM learns 91% of the own test in the build's
    550 steps, from the image tokens at most 49%. A row on its word grid teaches the task on perfect perception in
    the form the LM will read it later (a word per patch); as the grids fade out the LM reads the taught tokens,
    which stage 0' aimed at the same words."""
    emb = emb.detach().float()
    norm = emb.norm(dim=-1).mean()
    ideal, use = torch.zeros_like(tokens), torch.zeros(tokens.shape[:2] + (1,), dtype=torch.bool)
    for b, grid in enumerate(grids):
        for k, ids in enumerate(grid or []):
            if ids:
                mean = emb[ids].mean(0)
                ideal[b, k] = (mean * (norm / mean.norm())).to(tokens.dtype)
                use[b, k] = True
    return torch.where(use, ideal, tokens)


def _save_checkpoint(folder: Path, model, opt, step: int, mixture: "Mixture", log: list) -> None:
    """Trainable weights + AdamW moments (safetensors) and step, batch RNG and log (JSON), atomically."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                state[f"{names[id(p)]}::{key}"] = torch.as_tensor(value).detach().clone()
    with atomic_dir(folder) as tmp:
        save_file({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp / "trainable.safetensors"))
        save_file(state, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "rng": mixture.rng.getstate(), "log": log}))


def _load_checkpoint(folder: Path, model, opt, mixture: "Mixture", log: list) -> int:
    """Resume from `_save_checkpoint`'s folder; returns the step to continue from (0 when there is none)."""
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file():
        return 0
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(folder / "trainable.safetensors")).items():
            params[n].copy_(t)
    saved = load_file(str(folder / "optimizer.safetensors"))
    for n, p in params.items():
        if f"{n}::exp_avg" in saved:
            opt.state[p] = {k: saved[f"{n}::{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
    meta = json.loads((folder / "state.json").read_text())
    version, internal, gauss = meta["rng"]
    mixture.rng.setstate((version, tuple(internal), gauss))
    log[:] = meta["log"]
    return meta["step"]


def train(model, mixture: "Mixture", batch: int, pad_id: int, steps: int, lr: float, desc: str, log: list,
          checkpoint: Path, warmup: float = 0.05, every: int = CHECKPOINT_EVERY, distil_text: bool = False,
          tower_blocks: int = 0, pad_to_multiple_of: int = 1, per: str = "token") -> None:
    """AdamW + linear warmup + cosine decay over `steps` batches of `mixture`; checkpoints every `every` steps to
    `checkpoint` and resumes from it, so an interrupted build goes on where it stopped."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup * steps))
    schedule = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))  # noqa: E731
    start = _load_checkpoint(checkpoint, model, opt, mixture, log)
    if start:  # a scheduler resumed mid-run (last_epoch >= 0) scales each group's `initial_lr`, which torch requires
        for group in opt.param_groups:
            group["initial_lr"] = lr
    # the scheduler's first step sets the rate of step `start`: schedule(start)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule, last_epoch=start - 1)
    from ..train.tuner import keep_frozen_in_eval

    model.train()
    keep_frozen_in_eval(model)  # the tower's frozen parts and every BatchNorm as the stages run them
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps)
    t0 = time.perf_counter()
    for step in bar:
        loss = step_loss(model, *mixture.batch(batch, step), pad_id, distil_text, tower_blocks, pad_to_multiple_of, per)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.append({"phase": desc, "step": step + 1, "loss": round(loss.item(), 4),
                    "lr": round(sched.get_last_lr()[0], 7), "seconds": round(time.perf_counter() - t0, 1)})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % every == 0 and step + 1 < steps:
            _save_checkpoint(checkpoint, model, opt, step + 1, mixture, log)
    model.eval()


class Mixture:
    """Encoded records of one phase: image records (with cached features) and, optionally, text-only chat.

    `group_by_length` > 1: that many batches are drawn at once, sorted by length into batches of similar rows and
    handed out in a shuffled order (less padding; the image and text shares stay what they are).
    `word_grids` (image path -> per token the ids of its patch's words) with `grid_until` > 0: an image row drawn at
    step s carries its word grid (`with_word_grids`) with probability max(0, 1 - s / grid_until) (`WORD_GRID_UNTIL`)."""

    def __init__(self, records: list[D.Record], encoder: D.RecordEncoder, cache: FeatureCache,
                 chat: list[dict] = (), text_share: float = 0.0, seed: int = 0, group_by_length: int = 1,
                 word_grids: dict[str, list[list[int]]] | None = None, grid_until: int = 0):
        self.records, self.encoder, self.cache = records, encoder, cache
        self.chat = [encode_chat(encoder.tokenizer, c["prompt"], c["answer"], c["finished"]) for c in chat]
        self.text_share, self.rng = text_share, random.Random(seed)
        self.group_by_length = group_by_length
        self.word_grids, self.grid_until = (word_grids, grid_until) if word_grids and grid_until > 0 else (None, 0)
        self._encoded: dict[int, dict] = {}
        self._queue: list[tuple[list[dict], list]] = []

    def _image_item(self, i: int) -> dict:
        if i not in self._encoded:
            r = self.records[i]
            self._encoded[i] = self.encoder.encode_turns(r.turns, self.cache.n_tokens(r.image))
        return self._encoded[i]

    def batch(self, size: int, step: int = 0) -> tuple[list[dict], list]:
        """`size` rows (encoded items, tower features or None for text) for training step `step`."""
        if self.group_by_length <= 1:
            return self._draw(size, step)
        if not self._queue:
            items, feats = self._draw(size * self.group_by_length, step)
            order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
            chunks = [order[i:i + size] for i in range(0, len(order), size)]
            self.rng.shuffle(chunks)
            self._queue = [([items[i] for i in c], [feats[i] for i in c]) for c in chunks]
        return self._queue.pop()

    def _draw(self, size: int, step: int = 0) -> tuple[list[dict], list]:
        n_text = round(size * self.text_share) if self.chat else 0
        items, feats = [], []
        grid_share = max(0.0, 1.0 - step / self.grid_until) if self.word_grids else 0.0
        for _ in range(size - n_text):
            i = self.rng.randrange(len(self.records))
            item = self._image_item(i)
            if self.word_grids and self.rng.random() < grid_share:  # no draw without grids: builds 1-16 unchanged
                item = {**item, "word_grid": self.word_grids[str(self.records[i].image)]}
            items.append(item)
            feats.append(self.cache[self.records[i].image])
        for _ in range(n_text):
            items.append(self.rng.choice(self.chat))
            feats.append(None)
        return items, feats


def mixture_scenes_of(records: list[D.Record], seed: int, n: int, split: str = "train") -> dict[str, object]:
    """Image path -> the scene behind it, for the written v2 mixture's `records` (rehearsal 0.3, as `build` writes
    it), replayed without pixels; every record's question and answer must be the replay's."""
    draws = base_world.mixture_draws(split, n, seed, 0.3, draw=base_world.keep_scene)
    if len(draws) != len(records):
        raise ValueError(f"the written {split} split has {len(records)} records, its replay {len(draws)}")
    for r, (scene, question, answer) in zip(records, draws):
        if r.turns[0] != (question.strip(), answer):
            raise ValueError(f"record {r.id} is not its replay: {r.turns[0]!r} vs {(question, answer)!r}")
    return {str(r.image): scene for r, (scene, _, _) in zip(records, draws)}


def fact_tail_modules(n_blocks: int) -> list[str]:
    """The tower modules `fact_align` teaches (its last FACT_BLOCKS blocks and head conv), as peft's modules_to_save."""
    return [f"encoder.blocks.{i}" for i in range(n_blocks - FACT_BLOCKS, n_blocks)] + ["encoder.top_conv"]


def fact_stage(model, run: Path, tune: list[D.Record], scenes_of, test: list[D.Record], test_scenes_of,
               cache: FeatureCache, tokenizer, epochs: int, seed: int, lm_images: list,
               keep: float = 0.0, centre_word: str | None = None, count_word: bool = False) -> "TailFeatures":
    """Run `fact_align` on the stage-2 images (or load its weights from an earlier, interrupted run) and return the
    features the LM reads from then on, the taught tail frozen again (`TailFeatures`). `scenes_of` / `test_scenes_of`
    give image path -> scene (`mixture_scenes_of`); called only when there is something to teach."""
    from safetensors.torch import load_file, save_file

    weights = run / "fact_align.safetensors"
    if weights.is_file():
        model.load_state_dict(load_file(str(weights)), strict=False)
    else:
        images = sorted({str(r.image) for r in tune})
        scenes, test_scenes = scenes_of(), test_scenes_of()
        info = fact_align(model, [Path(p) for p in images], [scenes[p] for p in images], cache, tokenizer, epochs,
                          seed=seed, test=([r.image for r in test], [test_scenes[str(r.image)] for r in test]),
                          keep=keep, centre_word=centre_word, count_word=count_word)
        keep = tuple(fact_tail_modules(len(model.model.vision_tower.encoder.blocks))) + ("multi_modal_projector",)
        partial = weights.with_suffix(".partial")  # temp + rename: a build killed while writing resumes cleanly
        save_file({n: t.contiguous() for n, t in model.state_dict().items() if any(k + "." in n for k in keep)},
                  str(partial))
        partial.replace(weights)
        atomic_write_json(run / "fact_align.json", info)
    return TailFeatures(cache, model, FACT_BLOCKS, lm_images)


def readout_tag(readout: str) -> str:
    """The read-out's part of a cache or run folder name: none for the head map, so build 2's caches keep their name."""
    return "" if readout == "head" else f"-{readout}"


def run_folders(cache: Path, *, seed: int, align_steps: int, tune_steps: int, batch: int, readout: str,
                tower_blocks: int, tune_lr: float, embed_align_epochs: int, fact_align_epochs: int, fact_keep: float,
                fact_centre_word: str | None, turns_per_image: int, group_by_length: int, pad_to_multiple_of: int,
                answer_loss_per: str, text_share: float, distil_text: bool,
                word_grid_until: float, keep_fact_projector: bool = False,
                split_fact_projector: bool = False, fact_count_word: bool = False) -> tuple[Path, str]:
    """(the run folder, the suffix of its stage-2 and stage-3 checkpoints).

    The folder is named by what changes stages 0'-1 (its draws, read-out, tower and stage-0 options), the
    checkpoints by what changes stage 2 alone (rate, batching, loss, text rows, word grids, a kept stage-0' projector,
    which skips stage 1 without changing what it would write), so builds that differ
    only in stage 2 share stages 0'-1 (~23 min). A run folder named the earlier way (every option in the folder's
    name; builds 1-18) is used as it is when it exists and the new one does not, so interrupted builds still resume.
    """
    facts = (f"-facts{fact_align_epochs}" + (f"-keep{fact_keep:g}" if fact_keep else "")
             + (f"-centre-{fact_centre_word}" if fact_centre_word else "")
             + ("-count" if fact_count_word else "")) if fact_align_epochs else ""
    before = (f"-e{embed_align_epochs}" if embed_align_epochs else "") + facts \
        + (f"-turns{turns_per_image}" if turns_per_image > 1 else "")
    stage2 = ((f"-group{group_by_length}" if group_by_length > 1 else "")
              + (f"-pad{pad_to_multiple_of}" if pad_to_multiple_of > 1 else "")
              + (f"-per-{answer_loss_per}" if answer_loss_per != "token" else ""))
    text = (f"-text{text_share}{'-kl' if distil_text else ''}"
            if (text_share, distil_text) != (TEXT_SHARE, DISTIL_TEXT) else "")
    # options added after the earlier naming: a folder named that way never ran them, so they name its checkpoints too
    newer = ((f"-grid{word_grid_until:g}" if word_grid_until else "")
             + ("-fact-projector" if keep_fact_projector else "")
             + ("-split-projector" if split_fact_projector else ""))
    stem = f"small-build-seed{seed}-a{align_steps}-t{tune_steps}-b{batch}{readout_tag(readout)}"
    run = cache / (stem + (f"-tower{tower_blocks}" if tower_blocks else "") + before)
    legacy = cache / (stem + (f"-tower{tower_blocks}-lr{tune_lr:g}" if tower_blocks or tune_lr != TUNE_LR else "")
                      + before + stage2 + text)
    if legacy != run and legacy.is_dir() and not run.is_dir():
        return legacy, newer
    return run, (f"-lr{tune_lr:g}" if tune_lr != TUNE_LR else "") + stage2 + text + newer


def draw_records(tune_all: list[D.Record], seed: int, align_steps: int = ALIGN_STEPS, tune_steps: int = TUNE_STEPS,
                 batch: int = BATCH) -> tuple[list[int], list[D.Record]]:
    """A build's draws: stage 1's indices into the N_ALIGN alignment records, then stage 2's records of `tune_all`,
    indices first, so the draws are the same whether or not stages 1-2 run (`from_adapter`)."""
    rng = random.Random(seed)
    align_picked = rng.sample(range(N_ALIGN), min(N_ALIGN, align_steps * batch))
    return align_picked, rng.sample(tune_all, min(len(tune_all), tune_steps * batch))


def build(out: Path = SMALL_ASSETS / "adapter", seed: int = 0, align_steps: int = ALIGN_STEPS,
          tune_steps: int = TUNE_STEPS, batch: int = BATCH, n_train: int = 16000, home: Path | None = None,
          repair_steps: int = REPAIR_STEPS, from_adapter: Path | None = None, readout: str = READOUT,
          text_share: float = TEXT_SHARE, distil_text: bool = DISTIL_TEXT, tower_blocks: int = TOWER_BLOCKS,
          tune_lr: float = TUNE_LR, embed_align_epochs: int = EMBED_ALIGN_EPOCHS,
          turns_per_image: int = TURNS_PER_IMAGE, group_by_length: int = GROUP_BY_LENGTH,
          fact_align_epochs: int = FACT_ALIGN_EPOCHS, fact_keep: float = FACT_KEEP,
          pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, fact_centre_word: str | None = FACT_CENTRE_WORD,
          answer_loss_per: str = ANSWER_LOSS, word_grid_until: float = WORD_GRID_UNTIL,
          keep_fact_projector: bool = KEEP_FACT_PROJECTOR,
          split_fact_projector: bool = SPLIT_FACT_PROJECTOR, fact_count_word: bool = FACT_COUNT_WORD) -> dict:
    """Train projector (stage 1), projector + LoRA (stage 2), then repair the LM's language (stage 3); write the
    adapter to `out`; return the meta. `from_adapter`: start from a built adapter (stages 1-2 done) and run stage 3.
    `turns_per_image` > 1: the mixture's `n_train` questions are asked as that many per image (n_train / k images).
    `fact_align_epochs`: stage 0' (`fact_align`) first; the tower's tail it teaches ships in the adapter; `fact_keep`:
    its weight on keeping the untouched tail's features (`fact_align`'s `keep`); `fact_centre_word`: its word on each
    thing's centre patch (`fact_align`'s `centre_word`); `fact_count_word`: the scene's number of things on every
    patch a thing owns (`fact_align`'s `count_word`). `pad_to_multiple_of`: stage 2's
    batches come in a few lengths (it did not stop the resident memory's growth in build 12). `answer_loss_per`: stage
    2's image loss averaged per answer token or per record (`ANSWER_LOSS`). `word_grid_until`: the share of stage 2
    over which image rows fade from their ideal word grids to their own tokens (`WORD_GRID_UNTIL`).
    `keep_fact_projector`: the projector stays as stage 0' taught it (`KEEP_FACT_PROJECTOR`); `split_fact_projector`:
    only its columns on the ImageNet half of the twin map learn in stages 1-2 (`SPLIT_FACT_PROJECTOR`)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..data.world import ensure_alignment, ensure_mixture
    from ..train.tuner import native_bf16, vision_block_pattern
    from ..versions import Registry
    from .tiny import ALIGN_PHASES

    if embed_align_epochs and tower_blocks:
        raise ValueError("--embed-align-epochs needs the tower's features, and --tower-blocks caches only its front: "
                         "choose one")
    if word_grid_until and not fact_align_epochs:
        raise ValueError("--word-grid-until fades the words stage 0' teaches into stage 2: it needs "
                         "--fact-align-epochs")
    if not 0 <= word_grid_until <= 1:
        raise ValueError(f"--word-grid-until {word_grid_until}: a share of stage 2's steps, from 0 (off) to 1")
    if keep_fact_projector and not fact_align_epochs:
        raise ValueError("--keep-fact-projector keeps the projector stage 0' teaches: it needs --fact-align-epochs")
    if split_fact_projector and (keep_fact_projector or not fact_align_epochs or readout != "twin"):
        raise ValueError("--split-fact-projector keeps the columns stage 0' taught on the twin map's word half: it "
                         "needs --fact-align-epochs and --readout twin, and not --keep-fact-projector")
    if (fact_centre_word or fact_count_word) and not fact_align_epochs:
        raise ValueError("--fact-centre-word and --fact-count-word are targets of stage 0': they need "
                         "--fact-align-epochs")
    if fact_align_epochs and (tower_blocks or embed_align_epochs or from_adapter or turns_per_image > 1):
        raise ValueError("--fact-align-epochs teaches the tower's tail itself: it goes with neither --tower-blocks, "
                         "--embed-align-epochs, --from-adapter nor --turns-per-image")
    torch.set_num_threads(1 if torch.get_num_threads() < 2 else 2)
    torch.manual_seed(seed)
    t0 = time.time()
    registry = Registry(home or llaca_home())
    model, processor = assemble(seed, readout=readout)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id
    encoder = D.RecordEncoder(processor)
    n_blocks = len(model.model.vision_tower.encoder.blocks)
    front = n_blocks - tower_blocks if tower_blocks else n_blocks - FACT_BLOCKS if fact_align_epochs else None
    cache = FeatureCache(registry.home / "cache" / (f"small-tower-{TOWER_VARIANT}-{IMAGE_SIZE}{readout_tag(readout)}"
                                                    + (f"-front{front}" if front else "")), model, processor, front)
    if answer_loss_per not in ANSWER_LOSSES:  # before the build's first hour, not at stage 2's first step
        raise ValueError(f"--answer-loss {answer_loss_per!r}: choose one of {ANSWER_LOSSES}")
    if group_by_length < 1 or CHECKPOINT_EVERY % group_by_length:
        raise ValueError(f"--group-by-length must divide {CHECKPOINT_EVERY} (the checkpoint interval)")

    n_images = n_train // turns_per_image
    mixture_root = ensure_mixture(registry, seed, n_images, 300, splits=("train", "test"), rehearsal=0.3,
                                  turns=turns_per_image)
    tune_all = D.load_instruction_set(mixture_root / "base" / "train").records
    repair_chat = _distilled(registry.home / "cache" / f"small-chat-repair-seed{seed}.json", model, tokenizer,
                             repair_prompts(seed)) if repair_steps else []
    align_picked, tune = draw_records(tune_all, seed, align_steps, tune_steps, batch)
    log: list[dict] = []
    timings = {}
    chat: list[dict] = []  # stage 2's text records (stages 1-2 only)
    if from_adapter:
        cache.fill([r.image for r in tune[:repair_steps * batch]])
        timings["prepare_seconds"] = round(time.time() - t0, 1)
        peft_model = PeftModel.from_pretrained(model, str(from_adapter), is_trainable=True)
        log += json.loads((Path(from_adapter).parent / "train_log.json").read_text()) \
            if (Path(from_adapter).parent / "train_log.json").is_file() else []
        run = registry.home / "cache" / f"small-repair-{_folder_digest(Path(from_adapter))}-r{repair_steps}-b{batch}"
        run.mkdir(parents=True, exist_ok=True)
        stage2_suffix = ""
    else:
        kind, prompts = ("repair", repair_prompts(seed)) if distil_text else ("distilled", chat_prompts(seed))
        chat = _distilled(registry.home / "cache" / f"small-chat-{kind}-seed{seed}.json", model, tokenizer,
                          prompts)  # no pixels: the VLM is its LM
        align_all = D.load_instruction_set(ensure_alignment(registry, seed, ALIGN_PHASES[0], N_ALIGN) / "train").records
        align = [align_all[i] for i in align_picked]
        test_records = D.load_instruction_set(mixture_root / "base" / "test").records if fact_align_epochs else []
        cache.fill([r.image for r in align + tune + test_records])
        timings["prepare_seconds"] = round(time.time() - t0, 1)  # assembly, data, self-distillation, tower features

        # Stage 1: the projector alone (LM and tower frozen).
        for name, p in model.named_parameters():
            p.requires_grad = "multi_modal_projector" in name
        run, stage2_suffix = run_folders(
            registry.home / "cache", seed=seed, align_steps=align_steps, tune_steps=tune_steps, batch=batch,
            readout=readout, tower_blocks=tower_blocks, tune_lr=tune_lr, embed_align_epochs=embed_align_epochs,
            fact_align_epochs=fact_align_epochs, fact_keep=fact_keep, fact_centre_word=fact_centre_word,
            turns_per_image=turns_per_image, group_by_length=group_by_length, pad_to_multiple_of=pad_to_multiple_of,
            answer_loss_per=answer_loss_per, text_share=text_share, distil_text=distil_text,
            word_grid_until=word_grid_until, keep_fact_projector=keep_fact_projector,
            split_fact_projector=split_fact_projector, fact_count_word=fact_count_word)
        run.mkdir(parents=True, exist_ok=True)
        lm_cache = cache
        if fact_align_epochs:  # stage 0': the tower's tail + projector put the scene's words on its tokens
            lm_cache = fact_stage(model, run, tune, lambda: mixture_scenes_of(tune_all, seed, n_images),
                                  test_records, lambda: mixture_scenes_of(test_records, seed, 300, "test"), cache,
                                  tokenizer, fact_align_epochs, seed, [r.image for r in align + tune], fact_keep,
                                  fact_centre_word, fact_count_word)
        split = "-split" if split_fact_projector else ""  # stage 1 of a split projector: its own file in the folder
        projector_file = run / f"projector{split}.safetensors"
        if keep_fact_projector:  # stage 1 trains the projector alone: skipped, so it stays as stage 0' taught it
            pass
        elif projector_file.is_file():  # stage 1 done in an earlier, interrupted run
            from safetensors.torch import load_file

            model.model.multi_modal_projector.load_state_dict(load_file(str(projector_file)))
            log += json.loads((run / f"align_log{split}.json").read_text())
        else:
            if embed_align_epochs:  # stage 0: towards the LM's embeddings of the short answers (no LM pass)
                stage0 = embed_align(model, naming_turns(align + tune), cache, tokenizer, embed_align_epochs,
                                     seed=seed)
                atomic_write_json(run / "embed_align.json", stage0)
            stage1 = Mixture(align, encoder, lm_cache, seed=seed)  # built only where stage 1 runs
            with only_imagenet_columns_learn(projector_of(model)) if split_fact_projector else nullcontext():
                train(model, stage1, batch, pad_id, align_steps, ALIGN_LR, "align", log,
                      run / f"align-checkpoint{split}", tower_blocks=tower_blocks)
            from safetensors.torch import save_file

            save_file(model.model.multi_modal_projector.state_dict(), str(projector_file))
            atomic_write_json(run / f"align_log{split}.json", log)
        timings["align_seconds"] = round(time.time() - t0 - sum(timings.values()), 1)

        # Stage 2: LoRA on every LM Linear + the projector (saved whole, as peft's modules_to_save).
        targets = LORA_TARGETS + ("|" + vision_block_pattern(model, tower_blocks, lora=True) if tower_blocks else "")
        saved = ["multi_modal_projector"] + (fact_tail_modules(n_blocks) if fact_align_epochs else [])
        peft_model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                                      target_modules=targets, modules_to_save=saved))
        if keep_fact_projector:  # saved whole in the adapter (stage 0' taught it), not learning in stage 2
            for name, p in peft_model.named_parameters():
                if "multi_modal_projector" in name:
                    p.requires_grad = False
        grids = None
        if word_grid_until:  # the targets of stage 0' for each stage-2 image, on the map the LM reads
            scenes = mixture_scenes_of(tune_all, seed, n_images)
            grid = math.isqrt(lm_cache.n_tokens(tune[0].image))
            grids = {str(r.image): patch_targets(scenes[str(r.image)], tokenizer, grid, fact_centre_word,
                                                  fact_count_word) for r in tune}
        stage2 = Mixture(tune, encoder, lm_cache, chat=chat, text_share=text_share, seed=seed + 1,
                         group_by_length=group_by_length, word_grids=grids,
                         grid_until=round(word_grid_until * tune_steps))
        learning = only_imagenet_columns_learn(projector_of(peft_model).modules_to_save["default"]) \
            if split_fact_projector else nullcontext()  # the projector's copy peft trains and saves
        with learning:
            train(peft_model, stage2, batch, pad_id, tune_steps, tune_lr, "instruct", log,
                  run / f"tune-checkpoint{stage2_suffix}",
                  distil_text=distil_text, tower_blocks=tower_blocks, pad_to_multiple_of=pad_to_multiple_of,
                  per=answer_loss_per)
        timings["tune_seconds"] = round(time.time() - t0 - sum(timings.values()), 1)

    # Stage 3: language repair. Half of each batch is text, learned as the untouched LM's distribution (KL), half the
    # stage-2 mixture again (its first repair_steps * batch records: the image skills are rehearsed, not traded), at
    # half of stage 2's rate.
    if repair_steps:
        stage3 = Mixture(tune[:repair_steps * batch], encoder, cache, chat=repair_chat, text_share=REPAIR_TEXT_SHARE,
                         seed=seed + 2)
        train(peft_model, stage3, batch, pad_id, repair_steps, REPAIR_LR, "language", log,
              run / f"repair-checkpoint{stage2_suffix}",
              distil_text=True, tower_blocks=tower_blocks)
        timings["repair_seconds"] = round(time.time() - t0 - sum(timings.values()), 1)

    with atomic_dir(Path(out)) as tmp:
        peft_model.save_pretrained(tmp)
        store_adapter(tmp)
    stage0_info = {k: v for f in ("embed_align.json", "fact_align.json") if (run / f).is_file()
                   for k, v in json.loads((run / f).read_text()).items()}
    build_info = {"world": "v2", "seed": seed, "n_train": n_images, "n_test": 300, "rehearsal": 0.3,
                  "turns_per_image": turns_per_image, "group_by_length": group_by_length,
                  "pad_to_multiple_of": pad_to_multiple_of, "answer_loss": answer_loss_per,
                  "word_grid_until": word_grid_until, "keep_fact_projector": keep_fact_projector,
                  "split_fact_projector": split_fact_projector, "data_version": base_world.DATA_VERSION,
                  "align_steps": align_steps, "tune_steps": tune_steps,
                  "batch": batch, "align_lr": ALIGN_LR, "tune_lr": tune_lr,
                  "tower_blocks": tower_blocks, "embed_align_epochs": embed_align_epochs,
                  "fact_align_epochs": fact_align_epochs, "fact_keep": fact_keep, "fact_centre_word": fact_centre_word,
                  "fact_count_word": fact_count_word,
                  **stage0_info,
                  "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                  "text_share": text_share, "distil_text": distil_text, "n_chat": len(chat), "repair_steps": repair_steps, "repair_lr": REPAIR_LR,
                  "repair_text_share": REPAIR_TEXT_SHARE, "n_repair_chat": len(repair_chat),
                  "from_adapter": str(from_adapter) if from_adapter else None,
                  "align_data": "+".join(ALIGN_PHASES[0]),
                  "tower": f"efficientnet-{TOWER_VARIANT}", "readout": readout, "image_size": IMAGE_SIZE, "lm": "SmolLM2-135M-Instruct",
                  "torch_threads": torch.get_num_threads(), "native_bf16": native_bf16("cpu"), **timings,
                  "test_sha256": split_fingerprint(mixture_root / "base" / "test")}
    merged = peft_model.merge_and_unload()
    test = D.load_instruction_set(mixture_root / "base" / "test")
    result = evaluate(merged, processor, test, batch_size=16, progress=True)
    build_info["eval_seconds"] = round(time.time() - t0 - sum(v for k, v in timings.items()), 1)
    build_info["seconds"] = round(time.time() - t0, 1)
    meta = {"name": "small", "parent": None, "weights": "full", "base_version": None,
            "stage": {"name": "base-train", "n_records": len(tune), "path": str(mixture_root / "base" / "train"),
                      "test_path": str(mixture_root / "base" / "test")},
            "method": "pretrain", "rule": {}, "hparams": {"lora": True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                                                          "lr": tune_lr, "batch_size": batch, "seed": seed},
            "steps": align_steps + tune_steps + repair_steps, "processes": 1, "quant_bits": None,
            "metrics": {"test": {"base-test": {"accuracy": round(result.accuracy, 2), "n": result.n}},
                        "base_accuracy": round(result.accuracy, 2)},
            "build": build_info}
    atomic_write_json(Path(out).parent / "meta.json", meta)
    atomic_write_json(Path(out).parent / "train_log.json", log)
    write_model_card(out, meta)
    return meta


def _distilled(file: Path, model, tokenizer, prompts: list[str]) -> list[dict]:
    """`distill_chat` of the untouched model, cached in `file` (the build's teacher answers are computed once)."""
    if file.is_file():
        return json.loads(file.read_text())
    chat = distill_chat(model, tokenizer, prompts)
    atomic_write_json(file, chat)
    return chat


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:12]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train base v3's projector + LoRA adapter (writes assets/small)")
    ap.add_argument("--out", type=Path, default=SMALL_ASSETS / "adapter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--align-steps", type=int, default=ALIGN_STEPS)
    ap.add_argument("--tune-steps", type=int, default=TUNE_STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--repair-steps", type=int, default=REPAIR_STEPS, help="stage 3 (language repair); 0 skips it")
    ap.add_argument("--readout", default=READOUT, choices=sorted(READOUTS),
                    help="the tower map the LM reads (llaca.models.small.READOUTS)")
    ap.add_argument("--text-share", type=float, default=TEXT_SHARE, help="share of each stage-2 batch that is text chat")
    ap.add_argument("--distil-text", action=argparse.BooleanOptionalAction, default=DISTIL_TEXT,
                    help="stage 2's text rows learn the untouched LM's distribution (KL) on the repair prompts")
    ap.add_argument("--tower-blocks", type=int, default=TOWER_BLOCKS,
                    help="the tower's last N blocks + head conv learn in stage 2 (LoRA); 0: the tower frozen")
    ap.add_argument("--embed-align-epochs", type=int, default=EMBED_ALIGN_EPOCHS,
                    help="stage 0: epochs fitting the projector to the LM's word embeddings (0 skips it)")
    ap.add_argument("--fact-align-epochs", type=int, default=FACT_ALIGN_EPOCHS,
                    help="stage 0': epochs teaching the tower's last block + projector each patch's words (0: off)")
    ap.add_argument("--fact-keep", type=float, default=FACT_KEEP,
                    help="stage 0': weight on keeping what the untouched tail's features carry (0: words alone)")
    ap.add_argument("--fact-centre-word", default=FACT_CENTRE_WORD,
                    help="stage 0': also say this word on each thing's centre patch, once per thing (counting)")
    ap.add_argument("--fact-count-word", action="store_true", default=FACT_COUNT_WORD,
                    help="stage 0': also say the scene's number of things on every patch a thing owns (counting)")
    ap.add_argument("--tune-lr", type=float, default=TUNE_LR, help="stage 2's learning rate")
    ap.add_argument("--turns-per-image", type=int, default=TURNS_PER_IMAGE,
                    help="stage 2 asks each image up to this many questions (one multi-turn record)")
    ap.add_argument("--group-by-length", type=int, default=GROUP_BY_LENGTH,
                    help="stage 2 sorts this many batches' records by length into batches (less padding; 1: off)")
    ap.add_argument("--pad-to-multiple-of", type=int, default=PAD_TO_MULTIPLE_OF,
                    help="stage 2 pads each batch to a multiple of this many tokens (a few shapes; 1: off)")
    ap.add_argument("--answer-loss", default=ANSWER_LOSS, choices=ANSWER_LOSSES,
                    help="stage 2's image loss averaged over answer tokens (LLaVA's) or per record, then over records")
    ap.add_argument("--word-grid-until", type=float, default=WORD_GRID_UNTIL,
                    help="stage 2's image rows fade from the words stage 0' teaches (ideal perception) to their own "
                         "tokens over this share of its steps (0: off; needs --fact-align-epochs)")
    ap.add_argument("--keep-fact-projector", action="store_true", default=KEEP_FACT_PROJECTOR,
                    help="the projector stays as stage 0' teaches it: stage 1 skipped, stage 2 trains the LoRA alone "
                         "(needs --fact-align-epochs)")
    ap.add_argument("--split-fact-projector", action="store_true", default=SPLIT_FACT_PROJECTOR,
                    help="stages 1-2 train only the projector's columns on the twin map's ImageNet half; those on the "
                         "half stage 0' taught stay (needs --fact-align-epochs, --readout twin)")
    ap.add_argument("--from-adapter", type=Path, default=None,
                    help="a built adapter (e.g. a copy of assets/small/adapter): skip stages 1-2, run stage 3 on it")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    print(json.dumps(build(args.out, args.seed, args.align_steps, args.tune_steps, args.batch,
                           repair_steps=args.repair_steps, from_adapter=args.from_adapter, readout=args.readout,
                           text_share=args.text_share, distil_text=args.distil_text,
                           tower_blocks=args.tower_blocks, tune_lr=args.tune_lr,
                           embed_align_epochs=args.embed_align_epochs, turns_per_image=args.turns_per_image,
                           group_by_length=args.group_by_length, fact_align_epochs=args.fact_align_epochs,
                           fact_keep=args.fact_keep, pad_to_multiple_of=args.pad_to_multiple_of,
                           fact_centre_word=args.fact_centre_word, answer_loss_per=args.answer_loss,
                           word_grid_until=args.word_grid_until, keep_fact_projector=args.keep_fact_projector,
                           split_fact_projector=args.split_fact_projector,
                           fact_count_word=args.fact_count_word),
                     indent=1))


if __name__ == "__main__":
    main()
