"""`python -m llaca corrections ...`: list, add, remove and learn the pending chat corrections.

    python -m llaca corrections [--json]                      # the pending set
    python -m llaca corrections add IMAGE "QUESTION" "ANSWER"  # one correction (single turn)
    python -m llaca corrections remove ID
    python -m llaca corrections learn [--method M] [--from V]  # -> prints the new version id last
"""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    from ..train.rules import RULES

    s = sub.add_parser("corrections", help="the pending corrections from the chat: list / add / remove / learn")
    s.add_argument("--json", action="store_true", help="list as JSON")
    s.set_defaults(func=cmd_list)
    actions = s.add_subparsers(dest="action")
    a = actions.add_parser("add", help="add one correction: IMAGE, the question, the right answer")
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("answer")
    a.set_defaults(func=cmd_add)
    r = actions.add_parser("remove", help="remove one pending correction by id")
    r.add_argument("id")
    r.set_defaults(func=cmd_remove)
    lrn = actions.add_parser("learn", help="learn the pending corrections as a new stage -> new version")
    lrn.add_argument("--method", choices=RULES, default="llaca")
    lrn.add_argument("--from", dest="from_version", default=None, help="parent version (default: newest)")
    lrn.add_argument("--min-steps", type=int, default=None, help="at least this many optimizer steps")
    lrn.add_argument("--replay-per-correction", type=float, default=None,
                     help="lineage replay records mixed in per correction")
    lrn.set_defaults(func=cmd_learn)


def _store():
    from ..train.corrections import CorrectionStore

    return CorrectionStore()


def cmd_list(args) -> int:
    items = _store().list()
    if args.json:
        print(json.dumps([c.as_dict() for c in items], indent=1))
        return 0
    if not items:
        print("no pending corrections")
    for c in items:
        question = c.question.splitlines()[0][:50]
        was = f"  (was {c.original!r} from {c.version})" if c.original is not None else ""
        print(f"{c.id}  {question!r} -> {c.answer[:40]!r}{was}")
    return 0


def cmd_add(args) -> int:
    correction = _store().add(args.image, [(args.question, args.answer)])
    print(correction.id)
    return 0


def cmd_remove(args) -> int:
    _store().remove(args.id)
    print(f"removed {args.id}")
    return 0


def cmd_learn(args) -> int:
    import dataclasses

    from ..train.corrections import learn, recipe_for_parent
    from ..train.progress import progress_printer
    from .common import registry_with_base

    registry = registry_with_base()
    overrides = {"min_steps": args.min_steps, "replay_per_correction": args.replay_per_correction}
    recipe = dataclasses.replace(recipe_for_parent(registry, registry.get(args.from_version).id),
                                 **{k: v for k, v in overrides.items() if v is not None})
    version = learn(_store(), registry, method=args.method, parent=args.from_version, recipe=recipe,
                    on_event=progress_printer(f"corrections {args.method}"))
    if version is not None:
        print(version.id)
    return 0
