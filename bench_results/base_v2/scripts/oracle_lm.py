"""An upper bound for any tower: the grounding bench's v2 run with the image tokens replaced by an *oracle*.

Each of the 16 image tokens is the sum of learned embeddings of what that patch shows, read from the scene itself
(`base_world.dense_labels`: group, sprite label, shape, colour, word) plus, on the patch under a thing's centre,
a centre flag and the thing's box (x1, y1, x2, y2 in tenths): the scene's facts, exact, per token; no tower
carries more about the scene. Same records, LM, optimiser, lr, steps and test as `python -m experiments.grounding
--variants v2 --lrs 5e-4` (control: 35.5% at 800 steps on the v2f tower). If the LM with the oracle stays far below
90%, the LM's learning, not the tower, is what keeps the base from its own test in the build's budget.

Usage: oracle_lm.py STEPS TOWER_DIR GROUNDING_WORK OUT.json  (TOWER_DIR only sizes the fresh model; its tower is
unused). Env: THREADS (torch threads, default 1 as the grounding bench), N_TRAIN (records, default the bench's
8000), TEXT_SIZE (e.g. 384x4x4; default base v2's 192x4x4), LOOKUP (below), SEED (default 0), LR (default 5e-4), ALIGNED
(below).
"""
import json, os, random, sys, time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, "/work/main")
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from transformers import get_cosine_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llaca.data import world as bw
from llaca.data.world import family
from experiments.grounding import fresh_model_on_tower
from llaca.data import Record, RecordEncoder, collate, to_messages
from llaca.evaluation.metrics import accuracy

steps, tower, work, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
GRID, FIELDS = 4, ("patch_group", "patch_label", "patch_shape", "patch_colour", "patch_word")


def scenes_like_grounding(seed: int, n: int):
    """(scene, question, answer) in the order `grounding.write_data("v2")` drew them (its `bw.sample` stream)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        scene = bw.sample_scene(rng)
        while scene.kind == "objects" and not scene.things:
            scene = bw.sample_scene(rng)
        out.append((scene, *bw._ask(rng, scene)))
    return out


def oracle(scene) -> torch.Tensor:
    """(16, 10) long: per patch the dense labels (+1, 0 = none), centre flag, box of the centred thing (+1)."""
    dense = bw.dense_labels(scene, GRID)
    rows = [[dense[f][p] + 1 if dense[f][p] != -100 else 0 for f in FIELDS] + [0] * 5 for p in range(GRID * GRID)]
    cell = bw.SIZE // GRID
    for t in scene.things:
        cx, cy = (t.box[0] + t.box[2]) // 2, (t.box[1] + t.box[3]) // 2
        p = min(cy // cell, GRID - 1) * GRID + min(cx // cell, GRID - 1)
        rows[p][5:] = [1] + [1 + round(v * 10 / bw.SIZE) for v in t.box]
    return torch.tensor(rows)


train = scenes_like_grounding(0 * 1000 + 4242, int(os.environ.get("N_TRAIN", "8000")))  # the bench: 8000
test = scenes_like_grounding(0 * 1000 + 4242 + 1, 200)
# LOOKUP=f: that share of the training records becomes a text-only multiple-choice lookup (the answer is stated in
# the question; the image is an empty frame): does the letter-lookup, not the image, keep multiple choice at chance?
POOLS = {"colour": list(bw.PALETTE), "word": bw.WORDS, "shape": bw.SHAPE_KINDS, "region": bw.REGIONS,
         "number": [str(k) for k in range(1, 7)]}


def lookup_item(rng):
    kind = rng.choice(sorted(POOLS))
    answer = rng.choice(POOLS[kind])
    return (bw.Scene("empty", "blank", seed=0),
            *bw._mcq(rng, f"The {kind} is {answer}. Which {kind} is it?", answer, POOLS[kind]))


lookup_rng, lookup = random.Random(7), float(os.environ.get("LOOKUP", "0"))
train = [lookup_item(lookup_rng) if lookup_rng.random() < lookup else item for item in train]
written = json.loads((work / "v2" / "test" / "data.json").read_text())
assert [r["conversations"][1]["value"] for r in written[:200]] == [a for _, _, a in test], "not the bench's records"

text_size = tuple(int(v) for v in os.environ["TEXT_SIZE"].split("x")) if os.environ.get("TEXT_SIZE") else None
seed = int(os.environ.get("SEED", "0"))  # the LM's init, the oracle tables' and the record order
model, processor = fresh_model_on_tower(tower, seed=seed, text_size=text_size)
hidden = model.config.text_config.hidden_size
sizes = [n + 1 for n in bw.dense_heads().values()] + [2, 12, 12, 12, 12]
torch.manual_seed(seed)
tables = torch.nn.ModuleList(torch.nn.Embedding(n, hidden) for n in sizes)
for t in tables:
    torch.nn.init.normal_(t.weight, std=model.config.text_config.initializer_range)


# ALIGNED=1: the five identity fields are the LM's own input embeddings of their words (mean over the word's tokens),
# as a text-aligned (CLIP-like) tower's features would be after alignment; centre flag and box stay learned tables.
aligned = os.environ.get("ALIGNED") == "1"


def field_words() -> list[list[str]]:
    labels, groups = bw._sprite_labels()
    _, sprites = bw.image_pack.load()
    name_of = {}
    for sp in sprites:
        name_of.setdefault(sp.label, bw.readable_name(sp))
    return [list(groups) + ["shape", "text", "empty", "background"], [name_of[lab] for lab in labels],
            list(bw.SHAPE_KINDS), list(bw.PALETTE), list(bw.WORDS)]


word_ids = []
for words in field_words():  # per field: (values + 1, longest) token ids and mask; row 0 = none
    toks = [[]] + [processor.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    width = max(len(t) for t in toks)
    word_ids.append((torch.tensor([t + [0] * (width - len(t)) for t in toks]),
                     torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in toks])))


def oracle_features(pixel_values=None, **_):
    ids = pixel_values.long()
    if not aligned:
        feats = sum(tables[k](ids[..., k]) for k in range(len(sizes)))
    else:
        embed = model.get_input_embeddings()
        feats = sum(tables[k](ids[..., k]) for k in range(5, len(sizes)))
        for k, (tok, mask) in enumerate(word_ids):
            vecs = (embed(tok) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            feats = feats + vecs[ids[..., k]]
    return BaseModelOutputWithPooling(pooler_output=tuple(feats))


model.model.get_image_features = oracle_features
del model.model.vision_tower  # nothing reads pixels
blank = Image.new("RGB", (bw.SIZE, bw.SIZE))
encoder = RecordEncoder(processor)


def encode(item):
    scene, q, a = item
    enc = encoder.encode(Record("x", Path("x.png"), [(q, a)]), image=blank)
    enc["pixel_values"] = oracle(scene)
    return enc


params = [p for p in model.parameters() if p.requires_grad] + list(tables.parameters())
lr = float(os.environ.get("LR", "5e-4"))  # the build's and the grounding control's
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
sched = get_cosine_schedule_with_warmup(opt, int(0.05 * steps), steps)
order, rng = [], random.Random(seed)
t0 = time.time()
model.train()
losses = []
for step in range(steps):
    if len(order) < 16:
        more = list(range(len(train)))
        rng.shuffle(more)
        order += more
    idx, order = order[:16], order[16:]
    batch = collate([encode(train[i]) for i in idx], processor.tokenizer.pad_token_id)
    loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    losses.append(loss.item())
    if step % 100 == 0:
        print(step, round(sum(losses[-100:]) / len(losses[-100:]), 4), flush=True)
train_s = time.time() - t0

model.eval()
tok = processor.tokenizer
tok.padding_side = "left"
preds = []
with torch.inference_mode():
    for s in range(0, len(test), 32):
        chunk = test[s:s + 32]
        prompts = [processor.apply_chat_template(to_messages([(q, None)]), add_generation_prompt=True)
                   for _, q, _ in chunk]
        inputs = processor(text=prompts, images=[blank] * len(chunk), padding=True, return_tensors="pt")
        inputs["pixel_values"] = torch.stack([oracle(sc) for sc, _, _ in chunk])
        gen = model.generate(**inputs, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
        preds += [p.strip() for p in tok.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
golds = [a for _, _, a in test]
fams = {}
for (_, q, a), p in zip(test, preds):
    fams.setdefault(family(q, a), []).append((p, a))
res = {"run": "oracle image tokens", "steps": steps, "n_train": len(train), "text_size": text_size, "lookup": lookup,
       "seed": seed, "aligned": aligned,
       "parameters": sum(p.numel() for p in params), "lr": lr, "train_seconds": round(train_s, 1),
       "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4), "accuracy": accuracy(preds, golds), "n_test": len(test),
       "per_family": {f: {"accuracy": accuracy([p for p, _ in v], [a for _, a in v]), "n": len(v)}
                      for f, v in sorted(fams.items())}}
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res), flush=True)
