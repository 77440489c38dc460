"""Instruction grouping, the later (ICML) LLaCA's way to learn and serve (`../shared/docs/llaca.md`, "Later versions").

A *grouped lineage* keeps a codebook of instruction texts per group. Learning a dataset compares its instructions
with every group's codebook (TF-IDF cosine): at or above the threshold (0.90 by default, the paper's value for fixed
templates) the stage continues that group's version with the LLaCA update; below it, a new group opens, initialised
from the lineage's newest version and trained without EMA (`seq`). At answer time every question goes to the version
of its most similar group (no threshold: some group always answers).

In the registry a grouped stage is an ordinary version (full weights or a LoRA adapter) plus

    versions/<id>/groups.json     the router after this stage: per group its codebook and member version
    meta["grouped"]               group, decision, similarities, members; meta["parent"] is the previous stage of
                                  the grouped lineage, meta["grouped"]["trained_from"] the version whose weights
                                  it started from (the group's member, or the newest stage for a new group)

so the version id of a stage answers as the whole grouped assistant *as of that stage* (an immutable snapshot), and
lineage, accuracy matrix and "before vs after" work as for any lineage. LoRA groups are adapters on one base, which
`serving.ModelPool` loads once; full-weight groups are whole copies of the model, hence the cap (`max_groups`).

    plan = plan_stage(registry, "data/sciqa/train")           # what learning it would do (decision + similarities)
    version, plan = learn_grouped(registry, "data/sciqa/train", max_steps=30)
    route = route_question(registry, version.id, "What shape is in the image?")   # -> group, member version
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from pathlib import Path

from ..paths import atomic_write_json
from ..versions import Registry, Version, VersionError

DEFAULT_THRESHOLD = 0.90   # the paper's threshold for fixed instruction templates
CODEBOOK_PER_SET = 300     # instructions a stage adds to its group's codebook (the first ones of the set)
MAX_FULL_GROUPS = 16       # full-weight groups are whole model copies: disk and memory grow with each
MAX_LORA_GROUPS = 64       # adapter groups share one base; 64 keeps routing well under its 2 ms goal
GROUPS_FILE = "groups.json"

_WORD = re.compile(r"[a-z]+")


class GroupingError(ValueError):
    pass


def words(text: str) -> list[str]:
    """Lower-case alphabetic tokens: digits, punctuation and option letters' dots carry no task identity here."""
    return _WORD.findall(text.lower())


@dataclasses.dataclass
class Group:
    codebook: collections.Counter      # instruction text -> how many times the group's stages contained it
    version: str                       # the member version that answers for this group
    stages: list[str]                  # every stage (version id) that trained this group, oldest first
    weights: str = "full"              # "full" or "lora"

    def as_json(self) -> dict:
        return {"codebook": dict(self.codebook), "version": self.version, "stages": self.stages,
                "weights": self.weights}


@dataclasses.dataclass
class Route:
    group: int
    version: str                       # the member version that answers
    similarity: float
    similarities: list[float]


class InstructionRouter:
    """TF-IDF cosine between instruction sets and per-group codebooks.

    Each text is a TF-IDF vector (raw term counts x smooth idf `ln((1+N)/(1+df)) + 1`, as scikit-learn's default,
    over the N codebook texts, plus the new set's texts when a set is compared), normalised to unit length; a set (or
    a group's codebook) is the normalised mean of its texts' unit vectors; similarity is the dot product of two such
    unit vectors. Routing one question uses the codebook idf and centroids, computed once and cached.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, per_set: int = CODEBOOK_PER_SET,
                 groups: list[Group] | None = None):
        if not 0.0 < threshold <= 1.0:
            raise GroupingError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.per_set = float(threshold), int(per_set)
        self.groups: list[Group] = list(groups or [])
        self._cache = None   # (idf, centroids) for routing; reset by add()

    # ------------------------------------------------------------------ the maths
    def _idf(self, extra: list[str] = ()) -> dict[str, float]:
        df: collections.Counter = collections.Counter()
        n_docs = 0
        for g in self.groups:
            for text, count in g.codebook.items():
                n_docs += count
                for w in set(words(text)):
                    df[w] += count
        for text in extra:
            n_docs += 1
            df.update(set(words(text)))
        return {w: math.log((1 + n_docs) / (1 + n)) + 1 for w, n in df.items()}

    @staticmethod
    def _unit(text: str, idf: dict[str, float]) -> dict[str, float]:
        vec: dict[str, float] = {}
        for w in words(text):
            vec[w] = vec.get(w, 0.0) + idf.get(w, 1.0)
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {w: v / norm for w, v in vec.items()}

    @classmethod
    def _centroid(cls, counted: dict[str, int], idf: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for text, count in counted.items():
            for w, v in cls._unit(text, idf).items():
                out[w] = out.get(w, 0.0) + count * v
        norm = math.sqrt(sum(v * v for v in out.values())) or 1.0
        return {w: v / norm for w, v in out.items()}

    @staticmethod
    def _dot(a: dict[str, float], b: dict[str, float]) -> float:
        if len(a) > len(b):
            a, b = b, a
        return sum(v * b.get(w, 0.0) for w, v in a.items())

    # ------------------------------------------------------------------ sets (learning)
    def codebook_texts(self, texts: list[str]) -> list[str]:
        return list(texts[:self.per_set])

    def similarities(self, texts: list[str]) -> list[float]:
        """Cosine similarity of a new set's instructions (its first `per_set`) to each group's codebook."""
        texts = self.codebook_texts(texts)
        idf = self._idf(texts)
        new = self._centroid(collections.Counter(texts), idf)
        return [self._dot(new, self._centroid(g.codebook, idf)) for g in self.groups]

    def match(self, texts: list[str]) -> tuple[int | None, list[float]]:
        """(the group a new set continues, or None for a new group; the similarities to every group)."""
        sims = self.similarities(texts)
        best = max(range(len(sims)), key=sims.__getitem__, default=None)
        return (best if best is not None and sims[best] >= self.threshold else None), sims

    def add(self, group: int | None, texts: list[str], version: str, weights: str = "full") -> int:
        """Record a learned stage: a new group (group=None) or one more stage of `group`; returns the group."""
        if group is None:
            self.groups.append(Group(collections.Counter(), version, [], weights))
            group = len(self.groups) - 1
        g = self.groups[group]
        g.codebook.update(self.codebook_texts(texts))
        g.version, g.weights = version, weights
        g.stages.append(version)
        self._cache = None
        return group

    # ------------------------------------------------------------------ questions (answering)
    def _routing_state(self):
        if self._cache is None:
            idf = self._idf()
            self._cache = (idf, [self._centroid(g.codebook, idf) for g in self.groups])
        return self._cache

    def route(self, question: str) -> Route:
        """The group whose codebook is most similar to one question (ties: the older group)."""
        if not self.groups:
            raise GroupingError("the router has no groups yet")
        idf, centroids = self._routing_state()
        v = self._unit(question, idf)
        sims = [self._dot(v, c) for c in centroids]
        best = max(range(len(sims)), key=sims.__getitem__)
        return Route(best, self.groups[best].version, sims[best], sims)

    # ------------------------------------------------------------------ persistence
    def as_json(self) -> dict:
        return {"threshold": self.threshold, "per_set": self.per_set, "groups": [g.as_json() for g in self.groups]}

    @classmethod
    def from_json(cls, data: dict) -> "InstructionRouter":
        groups = [Group(collections.Counter(g["codebook"]), g["version"], list(g["stages"]), g.get("weights", "full"))
                  for g in data["groups"]]
        return cls(data["threshold"], data.get("per_set", CODEBOOK_PER_SET), groups)


# ====================================================================================== the registry side

def is_grouped(version: Version) -> bool:
    return bool(version.meta.get("grouped")) and (version.path / GROUPS_FILE).is_file()


@functools.lru_cache(maxsize=64)
def _load_router(path: str, stamp: float) -> InstructionRouter:
    """The parsed groups.json at `path`; `stamp` (its mtime) keys the cache."""
    import json

    return InstructionRouter.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def router_of(registry: Registry, ref: str) -> InstructionRouter | None:
    """The router a grouped stage was saved with (a fresh copy: callers may add to it), or None for other versions."""
    v = registry.get(ref)
    if not is_grouped(v):
        return None
    path = v.path / GROUPS_FILE
    return _copy(_load_router(str(path), path.stat().st_mtime_ns))


def _copy(router: InstructionRouter) -> InstructionRouter:
    out = InstructionRouter(router.threshold, router.per_set,
                            [dataclasses.replace(g, codebook=collections.Counter(g.codebook), stages=list(g.stages))
                             for g in router.groups])
    out._cache = router._routing_state()   # the same groups: the routing state can be shared (it is never mutated)
    return out


def route_question(registry: Registry, ref: str, question: str) -> Route | None:
    """For a grouped version: which group (member version) answers `question`; None for any other version.

    Called for every chat question, so an existing id costs one stat of its groups.json (written last, once, when
    the version became grouped) rather than a listing of the registry; a name goes through `registry.get`."""
    try:
        path = registry._dir(ref) / GROUPS_FILE
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        if path.with_name("meta.json").is_file():
            return None    # an existing id without groups: a plain version
        path = None
    except VersionError:
        path = None
    if path is None:       # a name (or unknown): resolve it the registry's way
        v = registry.get(ref)
        if not is_grouped(v):
            return None
        path = v.path / GROUPS_FILE
        stamp = path.stat().st_mtime_ns
    return _load_router(str(path), stamp).route(question)


def instructions(data) -> list[str]:
    """The first-turn instructions of an instruction set (path or loaded set), in file order."""
    from ..data import InstructionSet, load_instruction_set

    ds = data if isinstance(data, InstructionSet) else load_instruction_set(data)
    return [r.question for r in ds.records]


@dataclasses.dataclass
class Plan:
    """What learning a set in a grouped lineage does, decided before anything trains."""

    previous: str | None               # the lineage's newest stage (or the plain version it starts from)
    grouped_previous: bool             # whether `previous` is itself a grouped stage
    threshold: float
    similarities: list[float]          # to every existing group, in group order
    group: int | None                  # the group continued, or None: a new group
    new_group: int                     # the index the stage will have
    parent: str                        # the version whose weights the stage starts from
    method: str                        # the rule it trains with (`seq` for a new group)
    members: list[str]                 # member version per existing group

    @property
    def decision(self) -> str:
        return "new" if self.group is None else "continue"

    @property
    def best(self) -> tuple[int | None, float | None]:
        if not self.similarities:
            return None, None
        k = max(range(len(self.similarities)), key=self.similarities.__getitem__)
        return k, self.similarities[k]

    def describe(self) -> str:
        """One line a person reads: the decision, the best similarity, and what trains from what."""
        k, s = self.best
        best = "no groups yet" if k is None else f"best similarity {s:.3f} to group {k} ({self.members[k]})"
        if self.group is None:
            what = f"new group {self.new_group}: {self.method} from {self.parent} (no EMA)"
        else:
            what = f"continue group {self.group}: {self.method} from {self.parent}"
        return f"grouped: {best}; threshold {self.threshold:.2f} -> {what}"

    def as_json(self) -> dict:
        k, s = self.best
        return {"decision": self.decision, "group": self.new_group if self.group is None else self.group,
                "best_group": k, "best_similarity": None if s is None else round(s, 4),
                "similarities": [round(x, 4) for x in self.similarities], "threshold": self.threshold,
                "trained_from": self.parent, "method": self.method, "previous": self.previous}


def plan_stage(registry: Registry, data, from_version: str | None = None, threshold: float | None = None,
               method: str = "llaca") -> Plan:
    """Compare a set's instructions with the grouped lineage ending at `from_version` (default: the newest version).

    A plain `from_version` (no groups yet) starts a grouped lineage: its first stage opens group 0 from it.
    """
    prev = registry.get(from_version)
    router = router_of(registry, prev.id) or InstructionRouter()
    if threshold is not None:
        router = InstructionRouter(threshold, router.per_set, router.groups)
    group, sims = router.match(instructions(data))
    members = [g.version for g in router.groups]
    if group is None:
        parent, rule = prev.id, "seq"          # a new group: from the newest version, without EMA (the paper)
    else:
        parent, rule = members[group], method  # continue the group's own version with the rule
    return Plan(prev.id, is_grouped(prev), router.threshold, sims, group, len(router.groups), parent, rule, members)


def _weights_kind(registry: Registry, parent: str, lora: bool) -> str:
    return "lora" if lora or registry.get(parent).weights == "lora" else "full"


def check_capacity(registry: Registry, plan: Plan, lora: bool, max_groups: int | None = None) -> None:
    """Refuse to open a group beyond the cap, with what each group costs."""
    if plan.group is not None:
        return
    kind = _weights_kind(registry, plan.parent, lora)
    cap = max_groups if max_groups is not None else (MAX_LORA_GROUPS if kind == "lora" else MAX_FULL_GROUPS)
    if plan.new_group < cap:
        return
    size = sum(f.stat().st_size for f in registry.get(plan.parent).path.rglob("*") if f.is_file()) / 2**20
    if kind == "full":
        raise GroupingError(
            f"grouped lineage {plan.previous} already has {plan.new_group} full-weight groups (the cap is {cap}); each "
            f"is a whole copy of the model (~{size:.1f} MiB on disk, about as much in memory when it answers), so a "
            "new group is refused. Learn with --lora (adapter groups share one base), continue an existing group "
            "with a lower --threshold, or raise --max-groups.")
    raise GroupingError(f"grouped lineage {plan.previous} already has {plan.new_group} adapter groups (the cap is "
                        f"{cap}); raise --max-groups to open more")


def learn_grouped(registry: Registry, data: str, from_version: str | None = None, threshold: float | None = None,
                  method: str = "llaca", max_groups: int | None = None, on_event=None, should_stop=None,
                  evaluate_after: bool = True, **stage) -> tuple[Version, Plan]:
    """Learn `data` as one stage of a grouped lineage; returns (the new version, the plan it followed).

    `stage`: further `StageConfig` fields (max_steps, lr, lora, seed, rule_hparams, ...); rule_hparams apply only
    when the stage continues a group (a new group trains with `seq`).
    """
    from .tuner import StageConfig, run_stage

    on_event = on_event or (lambda e: None)
    plan = plan_stage(registry, data, from_version, threshold, method)
    check_capacity(registry, plan, bool(stage.get("lora")), max_groups)
    on_event({"type": "grouping", **plan.as_json(), "text": plan.describe()})
    if plan.group is None:
        stage.pop("rule_hparams", None)
    cfg = StageConfig(data=str(data), method=plan.method, parent=plan.parent, evaluate_after=False, **stage)
    version = run_stage(cfg, registry, on_event=on_event, should_stop=should_stop)
    if version is None:   # a non-main rank under `accelerate launch`
        return None, plan
    router = router_of(registry, plan.previous) if plan.grouped_previous else InstructionRouter()
    router = InstructionRouter(plan.threshold, router.per_set, router.groups)
    group = router.add(plan.group, instructions(data), version.id, version.weights)
    grouped = {**plan.as_json(), "group": group, "groups": len(router.groups),
               "members": [g.version for g in router.groups]}
    version = registry.update_meta(version.id, parent=plan.previous, grouped=grouped)
    atomic_write_json(version.path / GROUPS_FILE, router.as_json())   # last: the file makes the version grouped
    if evaluate_after:
        evaluate_stage(registry, version, on_event=on_event)
        version = registry.get(version.id)
    return version, plan


# ====================================================================================== answering and evaluating

def evaluate_routed(registry: Registry, ref: str, dataset, limit: int | None = None, pool=None, progress=False):
    """Accuracy of a grouped version on a set, every question answered by its group's member.

    Returns (EvalResult in record order, routing: one {"id", "group", "version", "similarity"} per record).
    LoRA members are adapters on one loaded base (`serving.ModelPool`).
    """
    from ..data import load_image
    from ..evaluation import metrics
    from ..evaluation.evaluate import EvalResult, generate_answers
    from ..serve.serving import ModelPool

    router = router_of(registry, ref)
    if router is None:
        raise VersionError(f"{ref} is not a grouped version")
    pool = pool or ModelPool(registry, max_models=2)
    records = dataset.records[:limit] if limit else dataset.records
    routes = [router.route(r.question) for r in records]
    preds = [""] * len(records)
    by_member: dict[str, list[int]] = {}
    for i, rt in enumerate(routes):
        by_member.setdefault(rt.version, []).append(i)
    for member, idx in by_member.items():
        with pool.use(member) as (model, processor):
            answers = generate_answers(model, processor, [load_image(records[i].image) for i in idx],
                                       [records[i].question for i in idx], progress=progress)
        for i, a in zip(idx, answers):
            preds[i] = a
    golds = [r.answer for r in records]
    result = EvalResult(dataset.name, metrics.accuracy(preds, golds), len(records), preds, golds)
    routing = [{"id": r.id, "group": rt.group, "version": rt.version, "similarity": round(rt.similarity, 4)}
               for r, rt in zip(records, routes)]
    return result, routing


def evaluate_stage(registry: Registry, version: Version, on_event=None, limit: int | None = None) -> dict:
    """The routed assistant on the test split of every stage of its lineage (a row of A), recorded as metrics."""
    from ..data import load_instruction_set
    from ..serve.serving import ModelPool

    on_event = on_event or (lambda e: None)
    tests = []
    for v in registry.lineage(version.id):
        tp = v.meta.get("stage", {}).get("test_path")
        if tp and Path(tp).is_dir() and tp not in tests:
            tests.append(tp)
    pool = ModelPool(registry, max_models=2)
    results = {}
    for tp in tests:
        ts = load_instruction_set(tp)
        r, routing = evaluate_routed(registry, version.id, ts, limit=limit, pool=pool)
        share = collections.Counter(x["group"] for x in routing)
        key = ts.name if ts.name not in results else f"{ts.name}@{Path(tp).parent.parent.name}"  # same-named splits
        results[key] = {"accuracy": round(r.accuracy, 2), "n": r.n,
                            "routed": {str(k): n for k, n in sorted(share.items())}}
        on_event({"type": "eval", "dataset": key, "accuracy": r.accuracy})
    if results:
        registry.record_metrics(version.id, {"test": results})
    return results


# ====================================================================================== what groups cost

def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def group_table(registry: Registry, ref: str) -> list[dict]:
    """Per group of a grouped version: member, stages, weights kind and the member's weight files on disk."""
    router = router_of(registry, ref)
    if router is None:
        return []
    rows = []
    for k, g in enumerate(router.groups):
        member = registry.get(g.version)
        weights_dir = member.path / ("adapter" if member.weights == "lora" else "model")
        stage_names = []
        for sid in g.stages:
            try:
                stage_names.append(registry.get(sid).meta.get("stage", {}).get("name", sid))
            except VersionError:
                stage_names.append(f"{sid} (deleted)")
        rows.append({"group": k, "version": g.version, "stages": g.stages, "data": stage_names,
                     "weights": member.weights, "disk_bytes": _dir_bytes(weights_dir),
                     "instructions": sum(g.codebook.values()), "distinct_instructions": len(g.codebook)})
    return rows


def grouped_versions(registry: Registry) -> list[Version]:
    return [v for v in registry.list() if is_grouped(v)]
