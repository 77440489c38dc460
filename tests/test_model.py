"""The embedded default model is a standard HF LLaVA: save/load round trip, offline, any text tokenizes."""
from __future__ import annotations

import torch
from PIL import Image

from llaca.models.llava import CHAT_TEMPLATE, TinySpec, count_parameters, load_pretrained
from llaca.serve.chat import answer_once, stream_answer
from llaca.versions import Registry, load_version


def test_base_is_a_standard_llava_folder(llaca_home, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    base = Registry().get("base")
    folder = base.path / "model"
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.chat_template == CHAT_TEMPLATE
    assert 1e6 < count_parameters(model) < 10e6
    assert base.meta["build"]["parameters"] == count_parameters(model)
    assert not list(folder.glob("*.bin")) and (folder / "model.safetensors").is_file()


def test_round_trip_identical_logits_and_generation(llaca_home):
    model, processor = load_version(Registry(), "base")
    image = Image.new("RGB", (64, 64), (40, 80, 220))
    inputs = processor(text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}],
        add_generation_prompt=True), images=image, return_tensors="pt")
    again, _ = load_pretrained(Registry().get("base").path / "model")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    a1 = answer_once(model, processor, image, "What color is the square?")
    a2 = answer_once(again, processor, image, "What color is the square?")
    assert a1 == a2
    streamed = list(stream_answer(model, processor, image, "What color is the square?", max_new_tokens=64))
    assert streamed and streamed[-1] == a1  # the streaming path gives the same greedy answer


def test_any_text_tokenizes(llaca_home):
    _, processor = load_version(Registry(), "base")
    tok = processor.tokenizer
    for text in ["Wie heißt das? 你好 🙂", "tab\tnewline\n", "\x00"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_shipped_base_is_what_the_current_recipe_builds_and_scores_its_figure(tmp_path):
    """assets/base must not go stale: it is base v2, built by the current v2 recipe (tokenizer, spec, step counts,
    learning rate, data version), and it still scores its recorded base-test accuracy on the test split that
    installing it regenerates (a full rebuild, ~21 min, is what reproduces the weights)."""
    import json

    from llaca.bases import install, splits
    from llaca.bases import tiny as base_build_v2
    from llaca.data import load_instruction_set
    from llaca.data import world as base_world
    from llaca.evaluation.evaluate import evaluate

    meta = json.loads((install.SHIPPED_BASE / "meta.json").read_text())
    build = meta["build"]
    # a spec field added after the build (feature_strategy) must hold its default in the shipped model
    assert build["world"] == "v2" and TinySpec(**build["spec"]) == base_build_v2.SPEC
    assert (build["vision_steps"], build["align_steps"], build["base_steps"], build["lr"], build["data_version"]) == (
        base_build_v2.VISION_STEPS, base_build_v2.ALIGN_STEPS, base_build_v2.BASE_STEPS, base_build_v2.BASE_LR,
        base_world.DATA_VERSION)
    fresh = base_build_v2.tokenizer(build["seed"])
    shipped = json.loads((install.SHIPPED_BASE / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert fresh.get_vocab() == shipped

    registry = Registry(tmp_path / "home")
    base = install.install_shipped_base(registry)
    model, processor = load_version(registry, "base")[:2]
    result = evaluate(model, processor, load_instruction_set(base.meta["stage"]["test_path"]))
    assert result.n == build["n_test"]
    assert abs(result.accuracy - meta["metrics"]["base_accuracy"]) <= 2.0, result.accuracy
    # exactly the records the figure was scored on (a generator change would otherwise score other ones silently)
    assert splits.split_fingerprint(base.meta["stage"]["test_path"]) == build["test_sha256"]


def test_a_base_test_split_other_than_the_scored_one_is_refused_by_benchmarks(tmp_path, caplog):
    """A v1-world build with a recorded fingerprint that today's records do not match: benchmarks refuse it (they
    would report the base's skills on other records), installing only logs it."""
    import pytest

    from llaca.bases import splits
    from llaca.bench.quality import base_test_split
    from llaca.versions import Version

    build = {"seed": 0, "n_train": 8, "n_test": 4}
    registry = Registry(tmp_path / "home")
    root = splits.base_data_root(registry, build)
    good = splits.split_fingerprint(root / "base" / "test")
    splits.base_data_root(registry, {**build, "test_sha256": good}, strict=True)   # the same records: accepted
    stale = {**build, "test_sha256": "0" * 64}
    with pytest.raises(splits.StaleTestSplit, match="other test records than the base was scored on"):
        splits.base_data_root(registry, stale, strict=True)
    with caplog.at_level("WARNING"):
        splits.base_data_root(registry, stale)
    assert "other test records" in caplog.text
    scored = Version("b", tmp_path, {"build": stale, "stage": {"test_path": str(root / "base" / "test")}})
    with pytest.raises(splits.StaleTestSplit):
        base_test_split(registry, scored)


def test_full_feature_strategy_keeps_the_cls_token_as_an_image_token(tmp_path):
    """`TinySpec.feature_strategy="full"` (a grounding-bench option): one more image token, the CLS, which the
    tower's pooled heads are trained on; saved and loaded as any LLaVA folder, it answers."""
    import dataclasses

    from llaca.bases import tiny as b2
    from llaca.models.llava import build_model, build_processor, save_pretrained

    spec = dataclasses.replace(b2.SPEC, text_hidden=64, text_layers=1, vision_hidden=32, vision_layers=1,
                               feature_strategy="full")
    processor = build_processor(b2.tokenizer(0, b2.SPEC), spec)
    model = build_model(processor, spec, seed=0)
    image = Image.new("RGB", (64, 64), "red")
    ids = processor(text=processor.image_token, images=image)["input_ids"][0]
    assert sum(i == processor.image_token_id for i in ids) == (64 // 16) ** 2 + 1
    # with "default" no head reads the CLS output (only the patches'); with "full" the pooled heads do
    class_embedding = model.model.vision_tower.embeddings.class_embedding
    grads = {}
    for strategy in ("default", "full"):
        model.config.vision_feature_select_strategy = strategy
        hook = class_embedding.register_hook(lambda g, s=strategy: grads.setdefault(s, g.norm().item()) and None)
        b2.pretrain_vision(model, processor, steps=1, seed=0)
        hook.remove()
    # not zero with "default": the CLS embedding still reaches the patches through attention (measured ratio ~10)
    assert grads["full"] > 3 * grads["default"]
    loaded, proc = load_pretrained(save_pretrained(model, processor, tmp_path / "full"))
    assert loaded.config.vision_feature_select_strategy == "full"
    assert isinstance(answer_once(loaded, proc, image, "What colour is it?", max_new_tokens=3), str)


def test_dense_tower_objective_reaches_the_weights():
    """`pretrain_vision(dense=True)` adds per-token heads: the same step moves the tower differently."""
    import dataclasses

    from llaca.bases import tiny as b2
    from llaca.models.llava import build_model, build_processor

    spec = dataclasses.replace(b2.SPEC, text_hidden=64, text_layers=1, vision_hidden=32, vision_layers=1)
    processor = build_processor(b2.tokenizer(0, b2.SPEC), spec)
    towers = {}
    for dense in (False, True):
        model = build_model(processor, spec, seed=0)
        b2.pretrain_vision(model, processor, steps=2, seed=0, dense=dense)
        towers[dense] = model.model.vision_tower.state_dict()
    moved = [k for k in towers[False] if not torch.equal(towers[False][k], towers[True][k])]
    assert "embeddings.patch_embedding.weight" in moved


def test_readout_probes_read_the_digits_from_an_untrained_tower():
    """`readout_probes` fits one linear probe per held-out set and readout; even random CLIP features separate the
    scanned digits well above chance (10%), and the CLS readout is a different feature from the mean."""
    import dataclasses

    from llaca.bases import tiny as b2
    from llaca.bench.heldout import readout_probes
    from llaca.models.llava import build_model, build_processor

    spec = dataclasses.replace(b2.SPEC, text_hidden=64, text_layers=1, vision_hidden=32, vision_layers=1)
    processor = build_processor(b2.tokenizer(0, b2.SPEC), spec)
    model = build_model(processor, spec, seed=0)
    out = readout_probes(model, processor, ("cls", "mean", "flat"), sets=("digits",))
    assert set(out) == {"digits_cls", "digits_mean", "digits_flat"}
    assert out["digits_flat"] > 50 and out["digits_mean"] > 20
    assert out["digits_cls"] != out["digits_mean"]
