"""Train a v2 tower with per-token heads (`pretrain_vision(dense=True)`), probe Tux/digits, save it for the
grounding bench (`python -m experiments.grounding --tower-from OUT`). Usage: dense_tower.py STEPS OUT [dense 0|1]"""
import sys, json, time, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
from llaca.bases import tiny as b2
from llaca.bench.heldout import readout_probes
from llaca.models.llava import build_model, build_processor, save_pretrained
steps, out = int(sys.argv[1]), sys.argv[2]
dense = len(sys.argv) < 4 or sys.argv[3] == "1"
processor = build_processor(b2.tokenizer(0, b2.SPEC), b2.SPEC)
model = build_model(processor, b2.SPEC, seed=0)
t0 = time.time(); acc = b2.pretrain_vision(model, processor, steps, seed=0, dense=dense); ts = time.time() - t0
res = {"steps": steps, "dense": dense, "head_acc": round(acc, 1), "train_s": round(ts)}
res.update(readout_probes(model, processor))
print(json.dumps(res), flush=True)
save_pretrained(model, processor, f"{out}/model")
