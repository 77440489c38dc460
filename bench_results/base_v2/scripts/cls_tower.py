"""Train a v2 tower with the CLS token kept ("full") and the pooled heads on it; probe Tux/digits on CLS; save model."""
import sys, json, time, dataclasses, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from llaca import heldout, base_build_v2 as b2
from llaca.bench.heldout import linear_probe
from llaca.model import build_model, build_processor, save_pretrained
steps, out = int(sys.argv[1]), sys.argv[2]
spec = dataclasses.replace(b2.SPEC, feature_strategy="full")
processor = build_processor(b2.tokenizer(0, spec), spec)
model = build_model(processor, spec, seed=0)
t0 = time.time(); acc = b2.pretrain_vision(model, processor, steps, seed=0); ts = time.time() - t0
res = {"steps": steps, "head_acc": round(acc, 1), "train_s": round(ts)}
def feats(images, which):
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            h = model.model.vision_tower(b2.pixels(processor, images[i:i+64]), output_hidden_states=True).hidden_states[-1]
            outs.append(h[:, 0] if which == "cls" else h[:, 1:].mean(1) if which == "mean" else h[:, 1:].flatten(1))
    return torch.cat(outs).numpy()
for name in ("tuxpaint", "digits"):
    tr, te = getattr(heldout, f"{name}_records")(0)
    for which in ("cls", "mean", "flat"):
        res[f"{name}_{which}"] = linear_probe(feats([r[0] for r in tr], which), [r[2] for r in tr],
                                              feats([r[0] for r in te], which), [r[2] for r in te])
print(json.dumps(res), flush=True)
save_pretrained(model, processor, f"{out}/model")
