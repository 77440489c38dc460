"""Tower pre-training variants -> linear probe on the held-out sets (tux, digits). Session experiment, 2026-11-26.

    [SPEC='{"patch_size": 8}'] [OUT=DIR] python bench_results/base_v2/scripts/tower_exp.py VARIANT STEPS P_SPRITE

VARIANT: control | aug (a P_SPRITE share of augmented single sprites) | labw (label 1.0, group 2.0 head weights) |
aug_labw (both). SPEC: TinySpec fields that differ from the shipped tower's (2026-11-26, second session: patch 8,
and 256 wide x 6 layers). One torch thread; ~3.5 min per 1,500 steps at the shipped size. Appends a JSON line to
$OUT/tower_exp.jsonl (default /tmp; the sessions' lines: ../tower_exp.jsonl).
"""
import sys, time, json, torch
from safetensors.torch import save_file
from PIL import Image, ImageOps, ImageEnhance
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from transformers import AutoProcessor
from llaca.data import world as base_world, image_pack
from llaca.bases import tiny as b2
from llaca.models.llava import build_model
from llaca.bench.heldout import readout_probes

variant, steps = sys.argv[1], int(sys.argv[2])
P_SPRITE = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
processor = AutoProcessor.from_pretrained("/work/main/assets/base/model")
import dataclasses, os
SPEC = dataclasses.replace(b2.SPEC, **json.loads(os.environ.get("SPEC", "{}")))
model = build_model(processor, SPEC, seed=0)
print(SPEC, sum(p.numel() for p in model.model.vision_tower.parameters()), flush=True)
orig_aux_batch = base_world.aux_batch
labels_idx, groups_idx = base_world._sprite_labels()
pack, sprites = image_pack.load()

def aug_sprite(rng):
    """One real sprite, augmented, on a random plain/gradient background: label + group heads."""
    i = rng.randrange(len(sprites))
    im = Image.fromarray(pack[i])
    if rng.random() < 0.5: im = ImageOps.mirror(im)
    im = im.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, expand=True)
    rgb, a = im.convert("RGB"), im.getchannel("A")
    rgb = ImageEnhance.Color(rgb).enhance(rng.uniform(0.0, 1.6) if rng.random() < 0.8 else 0.0)
    rgb = ImageEnhance.Brightness(rgb).enhance(rng.uniform(0.7, 1.3))
    rgb = ImageEnhance.Contrast(rgb).enhance(rng.uniform(0.7, 1.3))
    im = rgb.convert("RGBA"); im.putalpha(a)
    if im.getbbox(): im = im.crop(im.getbbox())
    side = rng.randint(30, 62); im.thumbnail((side, side), Image.BILINEAR)
    bg = tuple(rng.randint(140, 255) for _ in range(3)) if rng.random() < 0.8 else tuple(rng.randint(0, 255) for _ in range(3))
    c = Image.new("RGBA", (64, 64), bg + (255,))
    c.paste(im, (rng.randint(0, 64 - im.width), rng.randint(0, 64 - im.height)), im)
    lab = {h: -100 for h in base_world.aux_heads()}
    lab.update(label=labels_idx[sprites[i].label], group=groups_idx[sprites[i].group], shape=0, colour=0, count=1, region=-100, word=0)
    return c.convert("RGB"), lab

def aux_batch_aug(rng, n):
    k = sum(rng.random() < P_SPRITE for _ in range(n))
    imgs, labs = orig_aux_batch(rng, n - k)
    extra = [aug_sprite(rng) for _ in range(k)]
    imgs = list(imgs) + [e[0] for e in extra]
    labs = {h: torch.cat([labs[h], torch.tensor([e[1][h] for e in extra], dtype=torch.long)]) for h in labs}
    return imgs, labs

if variant.startswith("aug"):
    base_world.aux_batch = aux_batch_aug
if "labw" in variant:
    base_world.AUX_WEIGHTS["label"] = 1.0; base_world.AUX_WEIGHTS["group"] = 2.0
if "grp4" in variant:
    base_world.AUX_WEIGHTS["label"] = 1.0; base_world.AUX_WEIGHTS["group"] = 4.0
t0 = time.time()
acc = b2.pretrain_vision(model, processor, steps, seed=0)
train_s = time.time() - t0
model.eval()
res = {"spec": os.environ.get("SPEC", "{}"), "variant": variant, "steps": steps, "p_sprite": P_SPRITE, "head_acc": round(acc, 1), "train_s": round(train_s)}
res.update(readout_probes(model, processor))
print(json.dumps(res), flush=True)
with open(os.environ.get("OUT", "/tmp") + "/tower_exp.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
save_file({k: v.contiguous() for k, v in model.model.vision_tower.state_dict().items()},
          os.environ.get("OUT", "/tmp") + f"/tower_{variant}_{steps}_{P_SPRITE}.safetensors")
