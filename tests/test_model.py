"""The embedded default model is a standard HF LLaVA: save/load round trip, offline, any text tokenizes."""
from __future__ import annotations

import torch
from PIL import Image

from llaca.chat import answer_once, stream_answer
from llaca.model import CHAT_TEMPLATE, count_parameters, load_pretrained
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

    from llaca import base_build, base_build_v2, base_world
    from llaca.data import load_instruction_set
    from llaca.evaluate import evaluate

    meta = json.loads((base_build.SHIPPED_BASE / "meta.json").read_text())
    build = meta["build"]
    assert build["world"] == "v2" and build["spec"] == base_build_v2.SPEC.__dict__
    assert (build["vision_steps"], build["align_steps"], build["base_steps"], build["lr"], build["data_version"]) == (
        base_build_v2.VISION_STEPS, base_build_v2.ALIGN_STEPS, base_build_v2.BASE_STEPS, base_build_v2.BASE_LR,
        base_world.DATA_VERSION)
    fresh = base_build_v2.tokenizer(build["seed"])
    shipped = json.loads((base_build.SHIPPED_BASE / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert fresh.get_vocab() == shipped

    registry = Registry(tmp_path / "home")
    base = base_build.install_shipped_base(registry)
    model, processor = load_version(registry, "base")[:2]
    result = evaluate(model, processor, load_instruction_set(base.meta["stage"]["test_path"]))
    assert result.n == build["n_test"]
    assert abs(result.accuracy - meta["metrics"]["base_accuracy"]) <= 2.0, result.accuracy
    # exactly the records the figure was scored on (a generator change would otherwise score other ones silently)
    assert base_build.split_fingerprint(base.meta["stage"]["test_path"]) == build["test_sha256"]


def test_a_base_test_split_other_than_the_scored_one_is_refused_by_benchmarks(tmp_path, caplog):
    """A v1-world build with a recorded fingerprint that today's records do not match: benchmarks refuse it (they
    would report the base's skills on other records), installing only logs it."""
    import pytest

    from llaca import base_build
    from llaca.bench.quality import base_test_split
    from llaca.versions import Version

    build = {"seed": 0, "n_train": 8, "n_test": 4}
    registry = Registry(tmp_path / "home")
    root = base_build.base_data_root(registry, build)
    good = base_build.split_fingerprint(root / "base" / "test")
    base_build.base_data_root(registry, {**build, "test_sha256": good}, strict=True)   # the same records: accepted
    stale = {**build, "test_sha256": "0" * 64}
    with pytest.raises(base_build.StaleTestSplit, match="other test records than the base was scored on"):
        base_build.base_data_root(registry, stale, strict=True)
    with caplog.at_level("WARNING"):
        base_build.base_data_root(registry, stale)
    assert "other test records" in caplog.text
    scored = Version("b", tmp_path, {"build": stale, "stage": {"test_path": str(root / "base" / "test")}})
    with pytest.raises(base_build.StaleTestSplit):
        base_test_split(registry, scored)
