"""CoIN-mini with paraphrased instructions: every task asks with ~10 templates in train and 10 *other* ones in test.

CoIN also evaluates instruction variants (its "diverse" and "10-type" templates); the later LLaCA groups datasets by
the TF-IDF similarity of their instructions, which fixed templates make trivially exact. This variant checks what
happens when the wording varies: same scenes, images and answers as `coin_mini` (its samplers and answers are reused
as they are: each record is `coin_mini`'s sample with the same seed, only the question is re-worded), but each
record's instruction is drawn from the task's train or test template list, which share no template.

    python -m llaca.data.paraphrase OUT_DIR [--seed N] [--n-train N] [--n-test N]

Slots (option listing, colour, shape) are read back from `coin_mini`'s own question, so the answer stays right.
"""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path
from typing import Sequence

from . import coin_mini

_ANSWER_WORD = ("Answer with a single word.", "Respond with one word.", "Reply using a single word or phrase.")

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "sciqa": {
        "train": [
            "Which shape does the picture show?\n{options}\nReply with the letter of the correct option.",
            "Look at the image and pick the matching shape.\n{options}\nGive only the option letter.",
            "{options}\nWhich of these shapes appears in the image? Respond with a single letter.",
            "Identify the figure in the picture.\n{options}\nChoose one letter.",
            "What kind of shape can you see?\n{options}\nAnswer using the letter of your choice.",
            "Select the option that names the shape in this image.\n{options}\nOutput just the letter.",
            "Choose the right answer: which shape is drawn?\n{options}\nState the letter only.",
            "From the choices below, which one is the pictured shape?\n{options}\nAnswer with its letter.",
            "The image contains one shape. Which?\n{options}\nRespond with the corresponding option letter.",
            "Pick the correct choice for the shape shown.\n{options}\nWrite the letter of that choice.",
        ],
        "test": [
            "Which of the listed shapes is in this picture?\n{options}\nAnswer with the letter.",
            "Determine the shape in the image.\n{options}\nReply using only the option's letter.",
            "What figure is depicted here?\n{options}\nSelect a letter from the options.",
            "Options:\n{options}\nWhich option matches the shape in the image? Give the letter.",
            "Name the shape you see by choosing a letter.\n{options}",
            "Which answer describes the drawn shape?\n{options}\nRespond with the letter of the answer.",
            "Look carefully: which shape is present?\n{options}\nJust the letter, please.",
            "Among these choices, what shape is shown?\n{options}\nAnswer with one option letter.",
            "Classify the shape in the picture.\n{options}\nReturn the letter of the right choice.",
            "Tell me which shape appears.\n{options}\nUse the option letter as your answer.",
        ],
    },
    "textvqa": {
        "train": [
            "What is the word shown in the picture?\n" + _ANSWER_WORD[0],
            "Read the text in this image.\n" + _ANSWER_WORD[1],
            "Which word appears in the image?\n" + _ANSWER_WORD[2],
            "What does the text in the image say?\nGive a one-word answer.",
            "Transcribe the word written here.\nAnswer briefly.",
            "What text can you read in the picture?\nUse one word.",
            "Tell me the written word in this image.\nOne word only.",
            "Look at the image: what word is printed?\nAnswer in a word.",
            "Read out the word displayed in the image.\nKeep the answer to one word.",
            "What is written on the image?\nRespond using a single word.",
        ],
        "test": [
            "Which word is printed in this picture?\nAnswer with one word.",
            "What word can be seen in the image?\nReply briefly.",
            "Read the word in the image and write it.\nA single word, please.",
            "What does the image say?\nAnswer using a single word or phrase.",
            "Identify the text shown.\nGive one word.",
            "What word is displayed here?\nAnswer with the word only.",
            "Please read the writing in the image.\nRespond with a single word.",
            "Which text appears in the picture?\nOne word answer.",
            "What is the written text?\nAnswer in one word.",
            "Spell out the word visible in the image.\nKeep it to one word.",
        ],
    },
    "imagenet": {
        "train": [
            "What object is shown in the picture?\n" + _ANSWER_WORD[0],
            "Name the object in this image.\n" + _ANSWER_WORD[1],
            "Which object can you see?\n" + _ANSWER_WORD[2],
            "What thing is depicted in the image?\nGive a one-word answer.",
            "Classify the object in the picture.\nAnswer briefly.",
            "What is this object?\nUse one word.",
            "Identify the main object in the image.\nOne word only.",
            "What category does the object belong to?\nAnswer in a word.",
            "Tell me what the object is.\nKeep the answer to one word.",
            "What is pictured on the textured background?\nRespond using a single word.",
        ],
        "test": [
            "Which object is in this image?\nAnswer with one word.",
            "What is the item shown?\nReply briefly.",
            "Name the thing you see in the picture.\nA single word, please.",
            "What object appears here?\nAnswer using a single word or phrase.",
            "Recognize the object in the image.\nGive one word.",
            "What kind of object is this?\nAnswer with the name only.",
            "Label the object in the picture.\nRespond with a single word.",
            "What does the picture show?\nOne word answer.",
            "Identify the object.\nAnswer in one word.",
            "What is the object depicted?\nKeep it to one word.",
        ],
    },
    "gqa": {
        "train": [
            "In which region is the {colour} {shape}?\nAnswer with the region name.",
            "Where can you find the {colour} {shape}?\nReply with the region.",
            "Which part of the image contains the {colour} {shape}?\nName the region.",
            "Locate the {colour} {shape}.\nGive its region, e.g. top left.",
            "Where is the {colour} {shape} located?\nRespond with the region name.",
            "In what quadrant does the {colour} {shape} appear?\nAnswer with the quadrant.",
            "Tell me where the {colour} {shape} is.\nUse a region name.",
            "Which region holds the {colour} {shape}?\nAnswer briefly with the region.",
            "Find the {colour} {shape}: where is it?\nRegion name only.",
            "What is the position of the {colour} {shape}?\nAnswer with the region.",
        ],
        "test": [
            "Where in the image is the {colour} {shape}?\nGive the region name.",
            "Which quadrant is the {colour} {shape} in?\nRespond with the region.",
            "Point out the region of the {colour} {shape}.\nRegion name, please.",
            "The {colour} {shape} is in which region?\nAnswer with a region.",
            "Where does the {colour} {shape} sit in the picture?\nName the region.",
            "In which corner is the {colour} {shape}?\nReply with the region name.",
            "Say where the {colour} {shape} is.\nAnswer with the quadrant name.",
            "What region is the {colour} {shape} in?\nJust the region.",
            "Where would I find the {colour} {shape}?\nAnswer using the region name.",
            "Give the location of the {colour} {shape}.\nUse the region name.",
        ],
    },
    "vizwiz": {
        "train": [
            "What colour is the object?\nIf the image does not show enough, answer 'Unanswerable'.\nUse a single word.",
            "Which color does the object have?\nWhen you cannot tell, say 'Unanswerable'.\nOne word.",
            "Tell me the color of the object.\nIf it cannot be answered, reply 'Unanswerable'.",
            "What is the object's color?\nRespond 'Unanswerable' when the information is insufficient.",
            "Name the color of the thing in the image.\nAnswer 'Unanswerable' if there is nothing to see.",
            "Identify the object's colour.\nIf the image lacks the information, write 'Unanswerable'.",
            "What color is shown on the object?\nSay 'Unanswerable' when it cannot be determined.",
            "Describe the color of the object in one word.\nIf impossible, answer 'Unanswerable'.",
            "Which colour is the item?\nIf the picture gives no answer, respond with 'Unanswerable'.",
            "What is the colour of the object in the photo?\nUse 'Unanswerable' if it cannot be answered.",
        ],
        "test": [
            "Can you tell the object's color?\nIf not, answer 'Unanswerable'.",
            "Of what color is the object?\nReply 'Unanswerable' when the image is insufficient.",
            "What's the color of the object here?\nIf it cannot be seen, say 'Unanswerable'.",
            "Give the object's colour.\nAnswer 'Unanswerable' if the information is missing.",
            "Report the color of the object.\nIf there is no object, respond 'Unanswerable'.",
            "Which color is the object painted?\nUse 'Unanswerable' when you cannot answer.",
            "How is the object colored?\nIf the question cannot be answered, write 'Unanswerable'.",
            "State the colour of the object.\nOtherwise reply 'Unanswerable'.",
            "What color does this object appear?\nSay 'Unanswerable' if unsure.",
            "Tell the object's color in a word.\nIf that is impossible, answer 'Unanswerable'.",
        ],
    },
    "grounding": {
        "train": [
            "Give the bounding box of the {colour} {shape}.",
            "Provide the box coordinates [x1,y1,x2,y2] for: {colour} {shape}.",
            "Where exactly is the {colour} {shape}? Answer with its bounding box.",
            "Output the bounding box coordinates of the region described as {colour} {shape}.",
            "Locate the {colour} {shape} and return its box as [x1,y1,x2,y2].",
            "Draw a box around the {colour} {shape}: what are its coordinates?",
            "Find the {colour} {shape}. Reply with the bounding box.",
            "What are the box coordinates of the {colour} {shape}?",
            "Return the region of the {colour} {shape} as a bounding box.",
            "Please give the coordinates of the box enclosing the {colour} {shape}.",
        ],
        "test": [
            "Bounding box for the {colour} {shape}?",
            "Mark the {colour} {shape} with a box and give its coordinates.",
            "Which box [x1,y1,x2,y2] contains the {colour} {shape}?",
            "Give me the coordinates of the {colour} {shape}'s bounding box.",
            "Detect the {colour} {shape}; answer with box coordinates.",
            "Predict the bounding box of this phrase: {colour} {shape}.",
            "What is the bounding box that encloses the {colour} {shape}?",
            "Return box coordinates for the object described: {colour} {shape}.",
            "Ground the phrase '{colour} {shape}' in the image as a box.",
            "Enclose the {colour} {shape} in a bounding box and output it.",
        ],
    },
    "vqav2": {
        "train": [
            "How many objects can you see?\nAnswer with a single number.",
            "Count the objects in the picture.\nReply with a number.",
            "What is the number of objects in the image?\nAnswer briefly.",
            "How many shapes are shown?\nGive one number.",
            "Count the items in this image.\nRespond with a single word or phrase.",
            "How many things are in the picture?\nAnswer with the count.",
            "What is the count of objects shown?\nOne number only.",
            "Tell me how many objects there are.\nUse a digit.",
            "How many figures appear in the image?\nAnswer with a number.",
            "Number of objects in the image?\nReply with the count only.",
        ],
        "test": [
            "How many objects are present?\nGive a number.",
            "Count how many shapes the image contains.\nAnswer with a digit.",
            "What number of objects do you see?\nReply briefly.",
            "How many items does the picture show?\nOne number.",
            "Count everything in the image.\nAnswer with the count.",
            "How many separate objects are there?\nA single number, please.",
            "Give the object count for this image.\nAnswer using a number.",
            "How many shapes can be counted?\nRespond with one digit.",
            "Total number of objects?\nAnswer with a single number.",
            "How many things can be seen here?\nJust the number.",
        ],
    },
    "ocrvqa": {
        "train": [
            "What is this book's title?",
            "Read the title on the book cover.",
            "Which title is printed on this book?",
            "What is the name of this book?",
            "Tell me the book's title.",
            "What title does the cover show?",
            "Give the title of the book in the image.",
            "What is written as the title of this book?",
            "Name the book shown in the picture.",
            "What book is this? Answer with its title.",
        ],
        "test": [
            "Which book is shown? Give its title.",
            "What is the book called?",
            "Read the book's title.",
            "What's the title of the book?",
            "Identify the title of this book.",
            "What does the book cover say the title is?",
            "Title of the book in the picture?",
            "Please tell me what this book is titled.",
            "What title is on the cover?",
            "Report the title of the book.",
        ],
    },
}

_TARGET = {"gqa": re.compile(r"Where is the (\w+) (\w+)\?"),
           "grounding": re.compile(r"describes: (\w+) (\w+)\.")}


def slots(task: str, question: str) -> dict[str, str]:
    """The parts of `coin_mini`'s question a paraphrase must keep (options listing, target colour + shape)."""
    if task == "sciqa":
        return {"options": "\n".join(line for line in question.splitlines() if re.fullmatch(r"[A-D]\. \w+", line))}
    if task in _TARGET:
        m = _TARGET[task].search(question)
        if not m:
            raise ValueError(f"cannot read the target of a {task} question: {question!r}")
        return {"colour": m.group(1), "shape": m.group(2)}
    return {}


def paraphrase(task: str, question: str, split: str, rng: random.Random) -> str:
    """A re-worded `question` from the task's `split` templates."""
    return rng.choice(TEMPLATES[task][split]).format(**slots(task, question))


def make_records(task: str, n: int, seed: int, split: str) -> list[coin_mini.Record]:
    """`coin_mini.make_records` (same images and answers for the same seed), questions re-worded for `split`."""
    sampler = coin_mini.get_task(task)
    scenes = random.Random(seed)
    wording = random.Random(seed * 7919 + 17)  # its own stream: the scenes stay coin_mini's
    out = []
    for _ in range(n):
        scene, question, answer = sampler.sample_scene(scenes)
        out.append((coin_mini.render(scene), paraphrase(task, question, split, wording), answer))
    return out


def write_task(out_root, task: str, n_train: int, n_test: int, seed: int) -> Path:
    task_dir = Path(out_root) / task
    for split, n in (("train", n_train), ("test", n_test)):
        records = make_records(task, n, coin_mini.split_seed(seed, task, split), split)
        coin_mini.write_split(task_dir / split, records, f"{task}-para-{split}")
    return task_dir


def write_coin_mini_paraphrased(out_root, seed: int = 0, n_train: int = 1500, n_test: int = 100,
                                tasks: Sequence[str] = tuple(coin_mini.DEFAULT_SEQUENCE)) -> list[Path]:
    """Every task's train/test with paraphrased instructions; returns the task dirs in sequence order."""
    return [write_task(out_root, t, n_train, n_test, seed) for t in tasks]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llaca.data.paraphrase", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=1500)
    p.add_argument("--n-test", type=int, default=100)
    args = p.parse_args(argv)
    for path in write_coin_mini_paraphrased(args.out_dir, args.seed, args.n_train, args.n_test):
        print(path)


if __name__ == "__main__":
    main()
