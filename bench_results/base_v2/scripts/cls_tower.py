"""Train a v2 tower with the CLS token kept ("full") and the pooled heads on it; probe Tux/digits on CLS; save model."""
import sys, json, time, dataclasses, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from llaca.bases import tiny as b2
from llaca.bench.heldout import readout_probes
from llaca.models.llava import build_model, build_processor, save_pretrained
steps, out = int(sys.argv[1]), sys.argv[2]
spec = dataclasses.replace(b2.SPEC, feature_strategy="full")
processor = build_processor(b2.tokenizer(0, spec), spec)
model = build_model(processor, spec, seed=0)
t0 = time.time(); acc = b2.pretrain_vision(model, processor, steps, seed=0); ts = time.time() - t0
res = {"steps": steps, "head_acc": round(acc, 1), "train_s": round(ts)}
res.update(readout_probes(model, processor, ("cls", "mean", "flat")))
print(json.dumps(res), flush=True)
save_pretrained(model, processor, f"{out}/model")
