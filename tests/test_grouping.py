"""Instruction grouping (`llaca.train.grouping`): the TF-IDF router against hand-computed cosines, a grouped lineage through
the library (new vs continue, routing per record, snapshots, delete guard, cap), the CLI, and the app's routes."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import served_app

from llaca.train.grouping import GroupingError, InstructionRouter, evaluate_routed, learn_grouped, route_question

STAGE = dict(max_steps=2, batch_size=8, checkpoint_every=0)


# ------------------------------------------------------------------------------------------ the router

def test_route_matches_hand_computed_tfidf_cosine():
    """Codebooks: g0 = {"red apple", "red car"}, g1 = {"blue sky"}; N = 3 documents.
    idf(red) = ln(4/3) + 1 = 1.28768 (df 2); idf(apple, car, blue, sky) = ln(4/2) + 1 = 1.69315 (df 1).
    unit("red apple") = (red .60535, apple .79596); g0 = normalised sum = (red .73237, apple .48148, car .48148);
    g1 = (blue .70711, sky .70711). Question "red sky" = (red .60535, sky .79596):
    cos g0 = .60535 * .73237 = .44333; cos g1 = .79596 * .70711 = .56283 -> g1."""
    router = InstructionRouter(0.9)
    router.add(None, ["red apple", "red car"], "v1")
    router.add(None, ["Blue sky!"], "v2")     # case and punctuation do not matter
    route = router.route("red sky")
    assert route.group == 1 and route.version == "v2"
    assert route.similarities[0] == pytest.approx(0.44333, abs=1e-5)
    assert route.similarities[1] == pytest.approx(0.79596 * 0.70711, abs=1e-5)
    assert router.route("Apple, red").similarities[0] == pytest.approx(0.60535 * 0.73237 + 0.79596 * 0.48148,
                                                                       abs=1e-5)


def test_set_similarity_counts_the_new_set_in_idf():
    """match(["red apple"]): N = 4 (the 3 codebook texts + the new one); df red 3, apple 2, car 1:
    idf red = ln(5/4)+1 = 1.22314, apple = ln(5/3)+1 = 1.51083, car = ln(5/2)+1 = 1.91629.
    new = (red .62923, apple .77722); g0 = unit(red apple) + unit(red car = (.53803, .84292)), normalised =
    (red .71341, apple .47502, car .51518); cos = .62923*.71341 + .77722*.47502 = .81809."""
    router = InstructionRouter(0.9)
    router.add(None, ["red apple", "red car"], "v1")
    router.add(None, ["blue sky"], "v2")
    group, sims = router.match(["red apple"])
    assert group is None                                  # .818 < 0.90: a new group
    assert sims == pytest.approx([0.81809, 0.0], abs=1e-4)
    assert InstructionRouter(0.8, groups=router.groups).match(["red apple"])[0] == 0   # .818 >= 0.80: continue


def test_router_round_trip_and_cache():
    router = InstructionRouter(0.75, per_set=2)
    router.add(None, ["what shape is it", "what shape is it", "ignored: beyond per_set"], "v1")
    router.add(None, ["read the word"], "v2", weights="lora")
    assert dict(router.groups[0].codebook) == {"what shape is it": 2}
    again = InstructionRouter.from_json(json.loads(json.dumps(router.as_json())))
    assert again.threshold == 0.75 and again.groups[1].weights == "lora"
    for q in ("which shape", "read it", "nothing in common"):
        assert again.route(q).similarities == pytest.approx(router.route(q).similarities)
    router.add(0, ["which shape"], "v3")                  # adding invalidates the cached routing state
    assert router.route("which shape").version == "v3"
    with pytest.raises(GroupingError):
        InstructionRouter(1.5)


# ------------------------------------------------------------------------------------------ library

def test_grouped_lineage_new_continue_and_routing(llaca_home, coin_dir):
    from llaca.data import load_instruction_set
    from llaca.evaluation.evaluate import evaluate
    from llaca.versions import Registry, VersionError, load_version

    registry = Registry(llaca_home)
    v1, p1 = learn_grouped(registry, str(coin_dir / "sciqa" / "train"), from_version="base", evaluate_after=False,
                           **STAGE)
    assert (p1.decision, p1.group, p1.parent, p1.method) == ("new", None, "base", "seq")
    v2, p2 = learn_grouped(registry, str(coin_dir / "textvqa" / "train"), evaluate_after=False, **STAGE)
    assert (p2.decision, p2.parent, p2.method) == ("new", v1.id, "seq") and p2.similarities[0] < 0.9
    v3, p3 = learn_grouped(registry, str(coin_dir / "sciqa" / "train"), **STAGE)   # same templates: continue
    assert (p3.decision, p3.group, p3.parent, p3.method) == ("continue", 0, v1.id, "llaca")
    assert p3.similarities[0] == pytest.approx(1.0) and p3.similarities[1] < 0.9
    g = v3.meta["grouped"]
    assert v3.parent == v2.id and g["trained_from"] == v1.id and g["members"] == [v3.id, v2.id]
    assert v3.meta["method"] == "llaca" and registry.get(v2.id).meta["method"] == "seq"
    tests = v3.meta["metrics"]["test"]                    # routed evaluation of the whole lineage after the stage
    assert tests["sciqa-test"]["routed"] == {"0": 12} and tests["textvqa-test"]["routed"] == {"1": 12}

    textvqa = load_instruction_set(coin_dir / "textvqa" / "test")
    result, routing = evaluate_routed(registry, v3.id, textvqa)
    assert [r["version"] for r in routing] == [v2.id] * 12 and [r["id"] for r in routing] == [
        r.id for r in textvqa.records]
    assert result.predictions == evaluate(*load_version(registry, v2.id), textvqa).predictions
    sciqa_q = load_instruction_set(coin_dir / "sciqa" / "test").records[0].question
    assert route_question(registry, v3.id, sciqa_q).version == v3.id
    assert route_question(registry, v2.id, sciqa_q).version == v1.id    # an older stage answers as it was then
    assert route_question(registry, "base", sciqa_q) is None

    with pytest.raises(VersionError, match="answers a group"):
        registry.delete(v1.id, force=True)
    n = len(registry.list())
    with pytest.raises(GroupingError, match="full-weight groups"):
        learn_grouped(registry, str(coin_dir / "gqa" / "train"), max_groups=2, **STAGE)
    assert len(registry.list()) == n

    # The app's path: a `grouped-stage` job, run by the worker (in this process), logs the decision.
    from llaca.jobs import JobStore, Worker

    store = JobStore(llaca_home)
    store.submit({"data": str(coin_dir / "gqa" / "train"), "from_version": v3.id, "threshold": 0.9,
                  "method": "llaca", "evaluate_after": False, **STAGE}, kind="grouped-stage", label="grouped gqa")
    job = Worker(llaca_home).run(store.claim_next(12345))
    assert job.status == "done", job.error
    v4 = registry.get(job.version_id)
    assert v4.meta["grouped"]["members"] == [v3.id, v2.id, v4.id] and v4.parent == v3.id
    assert "-> new group 2: seq from " + v3.id in store.log_tail(job.id, 50)


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def paraphrased_sciqa(tmp_path_factory):
    from llaca.data.paraphrase import write_coin_mini_paraphrased

    out = tmp_path_factory.mktemp("para")
    write_coin_mini_paraphrased(out, seed=0, n_train=48, n_test=12, tasks=["sciqa"])
    return out / "sciqa"


def test_paraphrased_variant_keeps_images_and_answers(coin_dir, paraphrased_sciqa):
    from llaca.data import load_instruction_set
    from llaca.data.paraphrase import TEMPLATES

    fixed = load_instruction_set(coin_dir / "sciqa" / "train").records
    para = load_instruction_set(paraphrased_sciqa / "train").records
    test = load_instruction_set(paraphrased_sciqa / "test").records
    assert [r.answer for r in para] == [r.answer for r in fixed]
    assert (para[0].image.read_bytes() == fixed[0].image.read_bytes())
    assert all("A. circle" in r.question for r in para)     # the options listing is kept
    assert len({r.question for r in para}) > 5               # several templates in use
    assert not set(TEMPLATES["sciqa"]["train"]) & set(TEMPLATES["sciqa"]["test"])
    assert not {r.question for r in para} & {r.question for r in test}


def test_cli_grouped_learn_eval_ask(llaca_home, coin_dir, paraphrased_sciqa, tmp_path, capsys):
    """`learn --grouped` prints the decision then the id; `eval --json` routes record by record (run as a real
    `python -m llaca` process); the other commands run in-process through the same `cli.main` to save start-ups."""
    from test_cli import llaca

    from llaca.cli import main
    from llaca.data import load_instruction_set, write_instruction_set

    def cli(*args):
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out.splitlines(), err

    args = ["--grouped", "--max-steps", "2", "--batch-size", "8"]
    rc, out, _ = cli("learn", coin_dir / "sciqa" / "train", *args, "--no-eval")
    assert rc == 0 and out[-1] == "v1" and out[0].startswith("grouped: no groups yet")
    assert "new group 0: seq from base" in out[0]
    rc, out, _ = cli("learn", coin_dir / "textvqa" / "train", *args, "--no-eval")
    assert out[-1] == "v2" and "new group 1: seq from v1" in out[0]
    # A paraphrase of the first set: below the default 0.90, continued with a lower threshold.
    rc, out, _ = cli("learn", paraphrased_sciqa / "train", *args, "--threshold", "0.5")
    assert out[-1] == "v3" and "-> continue group 0: llaca from v1" in out[0], out
    sim = float(out[0].split("best similarity ")[1].split()[0])
    assert 0.5 <= sim < 0.9
    rc, out, _ = cli("versions")
    assert "grouped: group 0 (continue" in "\n".join(out) and "members 0=v3 1=v2" in "\n".join(out)

    mixed = tmp_path / "mixed"   # questions of both groups in one set: routed record by record
    records = (load_instruction_set(paraphrased_sciqa / "test").records[:4]
               + load_instruction_set(coin_dir / "textvqa" / "test").records[:4])
    write_instruction_set(mixed, records)
    res = json.loads(llaca("eval", "v3", mixed, "--json", home=llaca_home).stdout)
    assert res["n"] == 8 and [r["group"] for r in res["routing"]] == [0] * 4 + [1] * 4
    assert [r["version"] for r in res["routing"]] == ["v3"] * 4 + ["v2"] * 4
    assert res["groups"] == {"0": {"version": "v3", "n": 4}, "1": {"version": "v2", "n": 4}}
    rc, out, err = cli("ask", "v3", records[5].image, records[5].question)
    assert rc == 0 and "routed to group 1 (v2)" in err and len(out) == 1
    rc, _, err = cli("learn", coin_dir / "gqa" / "train", "--threshold", "0.5")
    assert rc == 2 and "--grouped" in err


# ------------------------------------------------------------------------------------------ app

@pytest.fixture(scope="module")
def grouped_app(chatty_home, coin_dir, tmp_path_factory):
    """The real app over a home with a grouped lineage from `chatty`: group 0 = sciqa, group 1 = textvqa."""
    from llaca.versions import Registry

    home = tmp_path_factory.mktemp("grouped_app") / "home"
    shutil.copytree(chatty_home, home)
    registry = Registry(home)
    g1, _ = learn_grouped(registry, str(coin_dir / "sciqa" / "train"), from_version="chatty", evaluate_after=False,
                          **STAGE)
    g2, _ = learn_grouped(registry, str(coin_dir / "textvqa" / "train"), evaluate_after=False, **STAGE)
    with served_app(home) as served:
        served.ids = (g1.id, g2.id)
        yield served


def test_app_routes_and_shows_the_group(grouped_app, coin_dir):
    from gradio_client import Client, handle_file

    from llaca.data import load_instruction_set

    client = Client(grouped_app.url, verbose=False)
    g1, g2 = grouped_app.ids
    for task, group, member in (("sciqa", 0, g1), ("textvqa", 1, g2)):
        rec = load_instruction_set(coin_dir / task / "test").records[0]
        message = {"text": rec.question, "files": [handle_file(str(rec.image))]}
        history, _ = client.predict(message, [], g2, 8, 0.0, api_name="/chat")
        badge = history[-1]["content"]
        badge = badge if isinstance(badge, str) else " ".join(p.get("text", "") for p in badge)
        assert f"answered by group {group} · {member}" in badge, history
        assert history[-2]["role"] == "assistant"        # the answer itself, above the badge
        *boxes, answers = client.predict([g2, "chatty"], handle_file(str(rec.image)), rec.question, 8,
                                         api_name="/compare")
        assert answers["routing"][g2]["group"] == group and "chatty" not in answers["routing"]
    *_, groups = client.predict([], None, api_name="/versions")
    rows = groups["data"] if isinstance(groups, dict) else groups
    assert [(r[0], r[1], r[2]) for r in rows] == [(g2, 0, g1), (g2, 1, g2)]
    _, preview = client.predict(str(coin_dir / "sciqa" / "train"), "grouped", g2, 0.9, api_name="/grouping_preview")
    text = preview["value"] if isinstance(preview, dict) else preview
    assert "continue group 0" in text and "| 1 |" in text, text
