"""Per-token linear probes: do a tower's image tokens say what they show (`base_world.dense_labels`)?
Usage: token_probe.py TOWER_DIR [TOWER_DIR ...] (each a folder with model/); prints one JSON line per tower."""
import sys, json, random, numpy as np, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
from llaca.data import world as bw
from llaca.bases import tiny as b2
from llaca.bench.heldout import linear_probe
from llaca.models.llava import load_pretrained
rng = random.Random(123)
scenes = [bw.sample_scene(rng) for _ in range(3000)]
images = [bw.render(s) for s in scenes]
labels = [bw.dense_labels(s, 4) for s in scenes]
for tower in sys.argv[1:]:
    model, processor = load_pretrained(f"{tower}/model")
    with torch.no_grad():
        tokens = torch.cat([model.model.vision_tower(b2.pixels(processor, images[i:i + 100]), output_hidden_states=True)
                            .hidden_states[-1][:, 1:] for i in range(0, len(images), 100)]).numpy()
    res = {"tower": tower}
    for head in ("patch_group", "patch_label", "patch_shape", "patch_colour", "patch_word"):
        x = np.array([tokens[i, p] for i in range(len(scenes)) for p in range(16) if labels[i][head][p] != -100])
        y = [labels[i][head][p] for i in range(len(scenes)) for p in range(16) if labels[i][head][p] != -100]
        cut = int(len(x) * 0.7)
        res[head] = linear_probe(x[:cut], y[:cut], x[cut:], y[cut:])
        res[head + "_n"] = len(x)
    print(json.dumps(res), flush=True)
