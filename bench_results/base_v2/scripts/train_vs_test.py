"""Does the shipped base fit its own training mixture? Accuracy per answer family on 300 train vs 300 test records.

    PYTHONPATH=. .venv/bin/python bench_results/base_v2/scripts/train_vs_test.py HOME/datasets/base-v2-mixture-d2-seed0-rehearsal0.3/base 300

(the mixture folder a `python -m llaca build-base` in HOME wrote; the model is the registry's `base`).
"""
import sys, collections, random, torch
torch.set_num_threads(2)
from llaca.versions import Registry, load_version
from llaca.data import load_instruction_set
from llaca.evaluation.evaluate import evaluate
from llaca.evaluation import metrics
from llaca.data.world import family
data, n = sys.argv[1], int(sys.argv[2])
model, proc = load_version(Registry(), "base")[:2]
for split in ("train", "test"):
    ds = load_instruction_set(f"{data}/{split}")
    ds.records = random.Random(0).sample(ds.records, min(n, len(ds.records)))
    r = evaluate(model, proc, ds)
    fam = collections.defaultdict(list)
    for rec, p, g in zip(ds.records, r.predictions, r.golds):
        fam[family(rec.question, g)].append(metrics.accuracy([p], [g]))
    print(split, round(r.accuracy, 1), {k: (round(sum(v)/len(v)), len(v)) for k, v in sorted(fam.items())}, flush=True)
