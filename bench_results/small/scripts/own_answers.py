"""Every answer of a version on `small`'s own test, with its family and whether it is right (JSON list).

`PYTHONPATH=. python bench_results/small/scripts/own_answers.py HOME VERSION OUT.json` (HOME: an $LLACA_HOME holding
VERSION and the base `small`); the answers are `python -m llaca.bench small`'s own-test ones (`own_test_answers`).
"""
import json
import sys
from pathlib import Path

from llaca.bench.small import own_test_answers
from llaca.data.world import family
from llaca.evaluation.metrics import is_correct
from llaca.versions import Registry, load_version

home, version, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
registry = Registry(home)
model, processor = load_version(registry, version)
records, predictions = own_test_answers(model, processor, registry)
rows = [{"q": r.question, "a": r.answer, "p": p, "fam": family(r.question, r.answer), "ok": bool(is_correct(p, r.answer))}
        for r, p in zip(records, predictions, strict=True)]
out.write_text(json.dumps(rows, indent=1))
print(f"{100 * sum(r['ok'] for r in rows) / len(rows):.2f}% of {len(rows)}")
