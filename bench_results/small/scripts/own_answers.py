"""Every answer of a version on `small`'s own test, with its family and whether it is right (JSON list).

`PYTHONPATH=. python bench_results/small/scripts/own_answers.py HOME VERSION OUT.json` (HOME: an $LLACA_HOME holding
VERSION and the base `small`); the accuracy it prints is `python -m llaca.bench small`'s own-test figure.
"""
import json
import sys
from pathlib import Path

from llaca.bench.quality import _test_set, base_test_split
from llaca.data.world import family
from llaca.evaluation.evaluate import evaluate
from llaca.evaluation.metrics import is_correct
from llaca.versions import Registry, load_version

home, version, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
registry = Registry(home)
model, processor = load_version(registry, version)
test = _test_set(base_test_split(registry, registry.get("small")))
result = evaluate(model, processor, test, batch_size=16)
rows = [{"q": r.question, "a": r.answer, "p": p, "fam": family(r.question, r.answer), "ok": bool(is_correct(p, r.answer))}
        for r, p in zip(test.records, result.predictions)]
out.write_text(json.dumps(rows, indent=1))
print(f"{100 * sum(r['ok'] for r in rows) / len(rows):.2f}% of {len(rows)}")
