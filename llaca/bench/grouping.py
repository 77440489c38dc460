"""What instruction grouping (`llaca.train.grouping`) costs: routing latency per question, disk and memory per group.

    python -m llaca.bench grouping        # -> bench_results/grouping/cost.json, bench_results/grouping/table.md

- routing latency: routers with 1, 5, 10, 20 and 40 groups whose codebooks are real CoIN-mini instruction sets
  (each task's fixed template, and two halves of its paraphrased train templates: 24 sets, then repeated with other
  seeds for 40), asked every CoIN-mini test question (fixed and paraphrased wording). Per question: `route()` on a
  loaded router (the steady state in chat), and `route_question()` through the registry (resolving the version id
  first, reading the router from disk once per version: cached). Goal: <= 2 ms for 20 groups.
- cost per group: a real grouped lineage of 2 short stages with full weights and one with LoRA adapters (from
  `base`, 2 steps each): the member's weight files on disk, and the resident memory (RSS) each member adds when
  `serving.ModelPool` loads it (full-weight members are whole models; LoRA members are adapters on one base).

The table also gathers the grouped quality runs (`python -m llaca.bench quality --methods llaca-grouped ...` with and
without `--paraphrased`, written to bench_results/grouping/{fixed,paraphrased}/) when they exist.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

GOAL_MS = 2.0
GROUP_COUNTS = (1, 5, 10, 20, 40)


def _codebooks(n_sets: int, per_set: int = 300) -> list[list[str]]:
    """`n_sets` real instruction sets: per CoIN-mini task its fixed template, the first and the last five of its
    paraphrased train templates (24 sets per seed; more sets come from further seeds)."""
    from ..data import coin_mini
    from ..data.paraphrase import TEMPLATES, slots

    sets = []
    seed = 0
    while len(sets) < n_sets:
        for task in coin_mini.DEFAULT_SEQUENCE:
            rng = random.Random(coin_mini.split_seed(seed, task, "train"))
            questions = [coin_mini.get_task(task).sample_scene(rng)[1] for _ in range(per_set)]
            sets.append(questions)
            for half in (TEMPLATES[task]["train"][:5], TEMPLATES[task]["train"][5:]):
                pick = random.Random(seed * 31 + len(sets))
                sets.append([pick.choice(half).format(**slots(task, q)) for q in questions])
        seed += 1
    return sets[:n_sets]


def _questions() -> list[str]:
    """Every CoIN-mini test question, fixed and paraphrased wording (100 + 100 per task)."""
    from ..data import coin_mini
    from ..data.paraphrase import paraphrase

    out = []
    for task in coin_mini.DEFAULT_SEQUENCE:
        rng = random.Random(coin_mini.split_seed(0, task, "test"))
        wording = random.Random(1)
        for _ in range(100):
            q = coin_mini.get_task(task).sample_scene(rng)[1]
            out += [q, paraphrase(task, q, "test", wording)]
    return out


def _per_call_ms(fn, items, reps: int = 3) -> dict:
    times = []
    for _ in range(reps):
        for x in items:
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return {"median_ms": round(statistics.median(times) * 1000, 4),
            "p95_ms": round(times[int(0.95 * len(times))] * 1000, 4), "max_ms": round(times[-1] * 1000, 3),
            "n": len(times)}


def routing_latency(work: Path) -> list[dict]:
    """Per group count: the router alone, and through the registry (a grouped version whose meta.json and
    groups.json are real; its members are meta-only entries here: routing never reads weights)."""
    from ..paths import atomic_write_json
    from ..train.grouping import GROUPS_FILE, InstructionRouter, _load_router, route_question
    from ..versions import Registry

    questions = _questions()
    sets = _codebooks(max(GROUP_COUNTS))
    rows = []
    for n in GROUP_COUNTS:
        router = InstructionRouter()
        for k in range(n):
            router.add(None, sets[k], f"m{k}")
        t = time.perf_counter()
        router.route(questions[0])   # first question: idf + centroids are computed once per loaded router
        cold_ms = (time.perf_counter() - t) * 1000
        alone = _per_call_ms(router.route, questions)
        home = work / f"registry-{n}"
        shutil.rmtree(home, ignore_errors=True)
        registry = Registry(home)
        for k in range(n):
            registry.create({"name": f"m{k}", "parent": None, "weights": "full"}, lambda tmp: None, f"m{k}")
        members = [f"m{k}" for k in range(n)]
        v = registry.create({"name": "grouped", "parent": members[-1], "weights": "full",
                             "grouped": {"group": n - 1, "members": members}},
                            lambda tmp: atomic_write_json(tmp / GROUPS_FILE, router.as_json()), "grouped")
        _load_router.cache_clear()
        via = _per_call_ms(lambda q: route_question(registry, v.id, q), questions, reps=1)
        rows.append({"groups": n, "codebook_texts": sum(sum(g.codebook.values()) for g in router.groups),
                     "distinct_words": len(router._routing_state()[0]), "first_route_ms": round(cold_ms, 3),
                     "route": alone, "route_question": via, "versions_in_registry": n + 1})
        print(f"  {n:2d} groups: route {alone['median_ms']:.3f} ms (p95 {alone['p95_ms']:.3f}), via the registry "
              f"{via['median_ms']:.3f} ms (p95 {via['p95_ms']:.3f}), first {cold_ms:.1f} ms", flush=True)
    return rows


def _task_texts(task: str, split: str, paraphrased: bool, n: int) -> list[str]:
    """The instructions `coin_mini` / `coin_mini_paraphrase` write for a task's split (no images rendered)."""
    from ..data import coin_mini
    from ..data.paraphrase import paraphrase

    seed = coin_mini.split_seed(0, task, split)
    scenes, wording = random.Random(seed), random.Random(seed * 7919 + 17)
    out = []
    for _ in range(n):
        q = coin_mini.get_task(task).sample_scene(scenes)[1]
        out.append(paraphrase(task, q, split, wording) if paraphrased else q)
    return out


def routing_study(n_train: int = 1500, n_test: int = 100) -> dict:
    """All 8 CoIN-mini tasks, text only (routing never looks at images): the decisions a grouped lineage takes at
    the default threshold, routing accuracy per task (fixed and paraphrased instructions), and how similar a
    paraphrased set is to the same task's fixed-template group (would it continue that group at 0.90?)."""
    from ..data import coin_mini
    from ..train.grouping import InstructionRouter

    tasks = coin_mini.DEFAULT_SEQUENCE
    out = {}
    for variant, para in (("fixed", False), ("paraphrased", True)):
        router, decisions, group_of = InstructionRouter(), [], {}
        for t in tasks:
            texts = _task_texts(t, "train", para, n_train)
            group, sims = router.match(texts)
            decisions.append({"task": t, "decision": "new" if group is None else f"continue {group}",
                              "best_similarity": round(max(sims), 3) if sims else None})
            group_of[t] = router.add(group, texts, t)
        per_task, confusions = {}, {}
        for t in tasks:
            routed = [router.route(q).group for q in _task_texts(t, "test", para, n_test)]
            per_task[t] = round(100 * sum(g == group_of[t] for g in routed) / len(routed), 1)
            wrong = [tasks[g] if g < len(tasks) else str(g) for g in routed if g != group_of[t]]
            if wrong:
                confusions[t] = {w: wrong.count(w) for w in sorted(set(wrong))}
        out[variant] = {"decisions": decisions, "routing_per_task": per_task,
                        "routing_accuracy": round(statistics.fmean(per_task.values()), 2), "confusions": confusions}
    fixed = InstructionRouter()
    for t in tasks:
        fixed.add(None, _task_texts(t, "train", False, n_train), t)
    out["paraphrase_vs_fixed"] = {}
    for t in tasks:
        sims = fixed.similarities(_task_texts(t, "train", True, n_train))
        out["paraphrase_vs_fixed"][t] = {"same_task": round(sims[tasks.index(t)], 3),
                                         "best_other": round(max(s for k, s in enumerate(sims) if tasks[k] != t), 3)}
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def group_cost(base_home: Path, work: Path, data_root: Path) -> dict:
    """Disk and resident memory per group, full weights vs LoRA adapters, from real grouped stages."""
    import gc

    from ..bases.install import ensure_base
    from ..serve.serving import ModelPool
    from ..train.grouping import MAX_FULL_GROUPS, MAX_LORA_GROUPS, group_table, learn_grouped
    from ..versions import Registry

    out = {}
    for kind, lora in (("full", False), ("lora", True)):
        home = work / f"cost-{kind}"
        shutil.rmtree(home, ignore_errors=True)
        (home / "versions").mkdir(parents=True)
        shutil.copytree(Registry(base_home).get("base").path, home / "versions" / "base")
        registry = Registry(home)
        ensure_base(registry, base="tiny")
        last = "base"
        for task in ("sciqa", "textvqa"):
            v, _ = learn_grouped(registry, str(data_root / task / "train"), from_version=last, lora=lora,
                                 max_steps=2, batch_size=8, checkpoint_every=0, evaluate_after=False)
            last = v.id
        rows = group_table(registry, last)
        pool = ModelPool(registry, max_models=4)
        with pool.use("base"):    # warm-up: imports and the first load's one-off allocations are not a group's cost
            pass
        gc.collect()
        rss = [_rss_bytes()]
        loads = []
        held = []
        for row in rows:           # load each group's member in turn; what does each add?
            with pool.use(row["version"]) as (model, _):
                if lora:           # the member's own tensors: its adapter (LoRA matrices + projector copy)
                    name = f".{model.active_adapter}."
                    held.append(sum(p.numel() * p.element_size() for n, p in model.named_parameters() if name in n))
                else:              # a whole model
                    held.append(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
            gc.collect()
            rss.append(_rss_bytes())
            loads.append(pool.loads)
        out[kind] = {"groups": [{"group": r["group"], "version": r["version"], "disk_bytes": r["disk_bytes"],
                                 "tensor_bytes": held[k], "rss_added_bytes": rss[k + 1] - rss[k]}
                                for k, r in enumerate(rows)],
                     "model_loads": loads[-1], "cap": MAX_LORA_GROUPS if lora else MAX_FULL_GROUPS}
        del pool
        gc.collect()
        print(f"  {kind}: " + ", ".join(f"group {g['group']} disk {g['disk_bytes'] / 2**20:.2f} MiB, "
                                        f"RSS +{g['rss_added_bytes'] / 2**20:.1f} MiB" for g in out[kind]["groups"]),
              flush=True)
    return out


def _quality_rows(root: Path) -> list[dict]:
    rows = []
    for variant in ("fixed", "paraphrased"):
        for path in sorted((root / variant).rglob("results.json")):   # grouped runs, and e.g. seq/ beside them
            res = json.loads(path.read_text())
            for run in res["runs"]:
                rows.append({"variant": variant, "method": run["method"], "seed": run["seed"], **run["metrics"],
                             "routing": run.get("routing"), "groups": run.get("groups"), "wall_s": run["wall_s"],
                             "config": {k: res["config"][k] for k in ("steps", "lr", "batch_size", "test_n", "tasks")}})
    return rows


def markdown(result: dict) -> str:
    lines = [f"Measured {result['when']} on {result['machine']} (a shared machine, other work running: "
             f"load average {result['load'][0]:.1f} at start, {result['load'][1]:.1f} at end).", ""]
    q = result["quality"]
    if q:
        cfg = q[0]["config"]
        lines += [f"Grouped LLaCA on CoIN-mini, {len(cfg['tasks'])} tasks, {cfg['steps']} steps/stage, "
                  f"{cfg['test_n']} test records/task, 1 seed (`python -m llaca.bench quality --methods llaca-grouped|seq "
                  f"--seeds 0 --tasks {len(cfg['tasks'])} --test-limit 50 [--paraphrased]`):", "",
                  "| instructions | method | Avg.ACC ↑ | New.ACC ↑ | Forgetting ↓ | BWT ↑ | routing accuracy "
                  "| groups opened | s / run |", "|---|---|---|---|---|---|---|---|---|"]
        for r in q:
            routing = f"{r['routing']['accuracy']:.1f}%" if r.get("routing") else "n/a"
            groups = " · ".join("+".join(g["tasks"]) for g in r["groups"]) if r.get("groups") else "n/a"
            fmt = lambda x: "n/a" if x is None else f"{x:.1f}"   # noqa: E731
            lines.append(f"| {r['variant']} | {r['method']} | {fmt(r['avg_acc'])} | {fmt(r['new_acc'])} | "
                         f"{fmt(r['forgetting'])} | {fmt(r['bwt'])} | {routing} | {groups} | {r['wall_s']:.0f} |")
        for r in q:
            if r.get("routing"):
                lines.append(f"\nRouting per task ({r['variant']}): {r['routing']['per_task']}")
        lines.append("")
    st = result["routing_study"]
    lines += ["Routing on all 8 CoIN-mini tasks, text only (`routing_study`: a grouped lineage over the 8 train sets "
              "at the default threshold 0.90, then every test question routed):", "",
              "| task | fixed: decision (best sim) | fixed: routed right | paraphrased: decision (best sim) | "
              "paraphrased: routed right (wrong ones went to) | paraphrased set vs its own fixed group / best other |",
              "|---|---|---|---|---|---|"]
    for k, t in enumerate(st["paraphrase_vs_fixed"]):
        f, p = st["fixed"], st["paraphrased"]
        conf = p["confusions"].get(t)
        conf = f" ({', '.join(f'{w} {n}' for w, n in conf.items())})" if conf else ""
        pv = st["paraphrase_vs_fixed"][t]
        lines.append(f"| {t} | {f['decisions'][k]['decision']} ({f['decisions'][k]['best_similarity']}) | "
                     f"{f['routing_per_task'][t]}% | {p['decisions'][k]['decision']} "
                     f"({p['decisions'][k]['best_similarity']}) | {p['routing_per_task'][t]}%{conf} | "
                     f"{pv['same_task']} / {pv['best_other']} |")
    lines += ["", f"Routing accuracy: fixed {st['fixed']['routing_accuracy']}%, paraphrased "
              f"{st['paraphrased']['routing_accuracy']}%.", ""]
    lines += ["Routing latency per question (every CoIN-mini test question, fixed + paraphrased wording; "
              f"goal <= {GOAL_MS} ms at 20 groups):", "",
              "| groups | codebook texts | route(): median / p95 | via the registry: median / p95 | first question "
              "(builds idf + centroids) |", "|---|---|---|---|---|"]
    for r in result["latency"]:
        lines.append(f"| {r['groups']} | {r['codebook_texts']} | {r['route']['median_ms']:.3f} / "
                     f"{r['route']['p95_ms']:.3f} ms | {r['route_question']['median_ms']:.3f} / "
                     f"{r['route_question']['p95_ms']:.3f} ms | {r['first_route_ms']:.1f} ms |")
    at20 = next(r for r in result["latency"] if r["groups"] == 20)
    met = at20["route_question"]["p95_ms"] <= GOAL_MS
    lines += ["", f"- goal <= {GOAL_MS} ms per question at 20 groups: {'met' if met else 'NOT met'} "
              f"(p95 {at20['route_question']['p95_ms']:.3f} ms through the registry, "
              f"{at20['route']['p95_ms']:.3f} ms for the router alone)", ""]
    c = result["cost"]
    lines += ["Cost per group (2 real grouped stages from `base`, each a new group; RSS added when "
              "`ModelPool` loads the member):", "",
              "| weights | group | member | disk | its tensors in memory (exact) | RSS change (noisy) | model loads "
              "for all groups | cap |", "|---|---|---|---|---|---|---|---|"]
    for kind in ("full", "lora"):
        for g in c[kind]["groups"]:
            lines.append(f"| {kind} | {g['group']} | {g['version']} | {g['disk_bytes'] / 2**20:.2f} MiB | "
                         f"{g['tensor_bytes'] / 2**20:.2f} MiB | {g['rss_added_bytes'] / 2**20:+.1f} MiB | "
                         f"{c[kind]['model_loads']} | {c[kind]['cap']} |")
    lines += ["", "Model loads count `base` (loaded first, as the shared base / a warm-up) plus every full-weight "
              "member; LoRA members are adapters on that one base."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench grouping", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/grouping")
    p.add_argument("--home", help="registry with the `base` version (default $LLACA_HOME)")
    p.add_argument("--work", help="scratch dir (default $LLACA_HOME/bench/grouping)")
    p.add_argument("--table-only", action="store_true", help="rewrite table.md from cost.json and the quality runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        result = json.loads((out / "cost.json").read_text())
        result["quality"] = _quality_rows(out)
        (out / "cost.json").write_text(json.dumps(result, indent=1))
        (out / "table.md").write_text(markdown(result))
        print(markdown(result))
        return 0
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from ..bases.install import ensure_base
    from ..data import coin_mini
    from ..versions import Registry

    registry = Registry(args.home) if args.home else Registry()
    ensure_base(registry, base="tiny")
    work = Path(args.work) if args.work else registry.home / "bench" / "grouping"
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    print("routing study (text only) ...", flush=True)
    study = routing_study()
    print("routing latency ...", flush=True)
    latency = routing_latency(work)
    data = work / "data"
    if not (data / "textvqa" / "train" / "data.json").is_file():
        coin_mini.write_coin_mini(data, seed=0, n_train=32, n_test=8, tasks=["sciqa", "textvqa"])
    print("cost per group ...", flush=True)
    cost = group_cost(registry.home, work, data)
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{os.cpu_count()} CPUs, 1 torch thread", "load": [load0, os.getloadavg()[0]],
              "routing_study": study, "latency": latency, "cost": cost, "quality": _quality_rows(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out}/cost.json, table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
