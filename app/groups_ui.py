"""What the tabs show of grouped versions (`llaca.train.grouping`): the Learn tab's decision preview, the badge naming the
group that answered in Chat and Compare, and the Versions tab's table of groups and members.

Plain functions over the library, so the tabs need only a few lines each.
"""
from __future__ import annotations

from llaca.train.grouping import (  # noqa: F401 - DEFAULT_THRESHOLD: the Learn tab's slider default
    DEFAULT_THRESHOLD,
    Route,
    group_table,
    grouped_versions,
    plan_stage,
    route_question,
    router_of,
)
from llaca.train.recipes import base_stage_options, recipe_for

from . import Studio, staged_data

GROUPED = "grouped"   # the Learn tab's method value for a grouped stage
GROUP_COLUMNS = ["grouped version", "group", "answered by", "stages (data)", "weights", "disk MB", "instructions"]


# ------------------------------------------------------------------------------------------ Learn

def preview_markdown(studio: Studio, data_path: str, parent: str | None, threshold: float) -> str:
    """Before Start: the set's similarity to each group of the parent's grouped lineage, and the decision."""
    if not data_path:
        return "_Grouped: upload a valid set to see its similarity to each group and the decision._"
    parent = parent or studio.newest_id()
    plan = plan_stage(studio.registry, data_path, parent, float(threshold))
    router = router_of(studio.registry, plan.previous)
    if router is None:
        head = (f"**Grouped**: `{plan.previous}` has no groups yet, so this stage opens **group 0** "
                f"(`seq` from `{plan.parent}`, no EMA).")
        return head
    rows = ["| group | answered by | stages | similarity |", "|---|---|---|---|"]
    for k, (g, s) in enumerate(zip(router.groups, plan.similarities)):
        mark = " ✔" if k == plan.group else ""
        rows.append(f"| {k} | `{g.version}` | {', '.join(g.stages)} | {s:.3f}{mark} |")
    if plan.group is None:
        decision = (f"below the threshold {plan.threshold:.2f} → **new group {plan.new_group}** "
                    f"(`seq` from `{plan.parent}`, no EMA)")
    else:
        decision = (f"≥ threshold {plan.threshold:.2f} → **continue group {plan.group}** "
                    f"(`{plan.method}` from `{plan.parent}`)")
    return f"**Grouped** lineage of `{plan.previous}`: {decision}\n\n" + "\n".join(rows)


def submit_grouped(studio: Studio, data_path: str, parent: str | None, threshold: float, name: str | None,
                   epochs: float, max_steps: float, lr: float, lora: bool):
    """Queue a grouped stage (a `grouped-stage` job: the worker runs `llaca.train.grouping.learn_grouped`)."""
    data = staged_data(studio, data_path)
    upload_dir = data.parent.parent
    parent = parent or studio.newest_id()
    studio.registry.get(parent)
    config = {"data": str(data), "from_version": parent, "threshold": float(threshold), "method": "llaca",
              "name": (name or "").strip() or None, "epochs": float(epochs),
              "max_steps": int(max_steps) if max_steps else None, "lr": float(lr), "lora": bool(lora)}
    recipe = recipe_for(studio.registry, parent)  # the base's adapter size and precision, as a plain stage takes
    config.update(base_stage_options(recipe, bool(lora), float(epochs)))
    label = f"grouped · {data.parent.name}" + (f" → {config['name']}" if config["name"] else "")
    return studio.jobs.submit(config, kind="grouped-stage", label=label, upload_dir=upload_dir)


# ------------------------------------------------------------------------------------------ Chat / Compare

def route(studio: Studio, version_id: str, question: str) -> Route | None:
    return route_question(studio.registry, version_id, question)


def badge(studio: Studio, route: Route) -> str:
    """`group 1 · v2 textvqa-train · similarity 0.98` as inline code (a small grey pill in the Chatbot)."""
    stage = studio.registry.get(route.version).meta.get("stage", {}).get("name", "")
    return f"`answered by group {route.group} · {route.version} {stage} · similarity {route.similarity:.2f}`"


def badge_message(studio: Studio, route: Route) -> dict:
    """A second assistant message under the answer (the chat history ignores it: it follows an answered turn)."""
    return {"role": "assistant", "content": [{"type": "text", "text": badge(studio, route)}]}


# ------------------------------------------------------------------------------------------ Versions

def group_rows(studio: Studio) -> list[list]:
    """One row per group of every grouped version that is the newest stage of its lineage."""
    registry = studio.registry
    grouped = grouped_versions(registry)
    parents = {v.parent for v in registry.list()}
    rows = []
    for v in reversed(grouped):
        if v.id in parents:
            continue
        for row in group_table(registry, v.id):
            rows.append([v.id, row["group"], row["version"], ", ".join(f"{s} ({d})" for s, d in
                                                                      zip(row["stages"], row["data"])),
                         row["weights"], round(row["disk_bytes"] / 2**20, 2), row["instructions"]])
    return rows

