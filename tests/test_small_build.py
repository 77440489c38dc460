"""The build of base v3 (`llaca.bases.small_build`) on a tiny FastVLM: its stage-3 loss (KL to the LM with its adapters
off, on text rows; cross-entropy on image rows) and its prompts. The build itself takes ~2 h of 2 cores: not here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llaca.bases import small_build
from llaca.paths import ASSETS_DIR

IMAGE = 63  # the tiny vocabulary's <image> token (`make_tiny_fastvlm`'s image_token_id, tests/conftest.py)


@pytest.fixture()
def tiny_fastvlm(make_tiny_fastvlm):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=small_build.LORA_TARGETS,
                      modules_to_save=["multi_modal_projector"])
    return get_peft_model(make_tiny_fastvlm(), lora)


def _rows():
    """Two image rows (4 <image> slots, cached features) and two text rows of different lengths."""
    image = {"input_ids": torch.tensor([1, IMAGE, IMAGE, IMAGE, IMAGE, 5, 6, 7, 8]),
             "labels": torch.tensor([-100] * 6 + [6, 7, 8])}
    text_a = {"input_ids": torch.tensor([1, 9, 10, 11, 12, 13]), "labels": torch.tensor([-100, -100, -100, 11, 12, 13])}
    text_b = {"input_ids": torch.tensor([1, 14, 15, 16, 17, 18, 19, 20]),
              "labels": torch.tensor([-100] * 4 + [17, 18, 19, 20])}
    features = [torch.randn(4, 320), torch.randn(4, 320), None, None]
    return [image, image, text_a, text_b], features


def test_stage3_loss_is_image_cross_entropy_plus_kl_to_the_lm_without_its_adapters(tiny_fastvlm, monkeypatch):
    # the loss's math, in fp32 like the hand computation below (step_loss autocasts to bf16 where a CPU has it natively)
    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    items, features = _rows()
    image_only = small_build.step_loss(tiny_fastvlm, items[:2], features[:2], pad_id=0)
    with torch.no_grad():
        # LoRA starts as a no-op (B = 0): the student IS the teacher on text rows, the KL is exactly 0
        fresh = small_build.step_loss(tiny_fastvlm, items, features, pad_id=0, distil_text=True)
        assert fresh.item() == pytest.approx(image_only.item(), abs=1e-6)
        for name, p in tiny_fastvlm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        moved_image_only = small_build.step_loss(tiny_fastvlm, items[:2], features[:2], pad_id=0)
    loss = small_build.step_loss(tiny_fastvlm, items, features, pad_id=0, distil_text=True)
    kl = loss.item() - moved_image_only.item()
    assert kl > 1e-4  # the adapters now change the text distribution, and the loss sees it
    # computed by hand: KL(teacher || student) per answer token of the two text rows
    with torch.no_grad():
        student = tiny_fastvlm(input_ids=torch.stack([torch.cat([items[2]["input_ids"], torch.zeros(2).long()]),
                                                       items[3]["input_ids"]]),
                               attention_mask=torch.tensor([[1] * 6 + [0] * 2, [1] * 8])).logits
        with tiny_fastvlm.disable_adapter():
            teacher = tiny_fastvlm(input_ids=torch.stack([torch.cat([items[2]["input_ids"], torch.zeros(2).long()]),
                                                           items[3]["input_ids"]]),
                                   attention_mask=torch.tensor([[1] * 6 + [0] * 2, [1] * 8])).logits
    positions = [(0, 2), (0, 3), (0, 4), (1, 3), (1, 4), (1, 5), (1, 6)]  # each predicts the next (labelled) token
    s = torch.stack([student[r, c] for r, c in positions]).log_softmax(-1)
    t = torch.stack([teacher[r, c] for r, c in positions]).log_softmax(-1)
    assert kl == pytest.approx((t.exp() * (t - s)).sum(-1).mean().item(), rel=1e-3)
    loss.backward()  # the gradient reaches the adapters through the KL
    grads = [p.grad for n, p in tiny_fastvlm.named_parameters() if "lora_A" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_text_only_batch_distils_without_image_rows(tiny_fastvlm):
    items, features = _rows()
    with torch.no_grad():
        loss = small_build.step_loss(tiny_fastvlm, items[2:], features[2:], pad_id=0, distil_text=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)



def test_padding_batches_to_a_multiple_changes_their_shape_not_their_loss(tiny_fastvlm, monkeypatch):
    """`--pad-to-multiple-of`: the padded positions carry no label and no attention, so the loss is the same."""
    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    items, features = _rows()
    assert small_build.D.collate(items, 0, 16)["input_ids"].shape == (4, 16)
    with torch.no_grad():
        plain = small_build.step_loss(tiny_fastvlm, items, features, pad_id=0)
        padded = small_build.step_loss(tiny_fastvlm, items, features, pad_id=0, pad_to_multiple_of=16)
    assert padded.item() == pytest.approx(plain.item(), abs=1e-5)


def test_answer_loss_per_record_by_hand():
    """Three answer tokens, two records (rows 2 and 5): per token the mean of three losses, per record the mean of
    row 2's one loss and row 5's two-token mean."""
    import math

    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)], [math.log(3), 0.0]])
    targets, rows = torch.tensor([0, 1, 0]), torch.tensor([2, 5, 5])
    ln2, ln43 = math.log(2), math.log(4 / 3)  # softmax(0, 0)[0] = 1/2; softmax(0, ln 3)[1] = softmax(ln 3, 0)[0] = 3/4
    assert small_build.answer_loss(logits, targets, rows).item() == pytest.approx((ln2 + 2 * ln43) / 3, rel=1e-6)
    assert small_build.answer_loss(logits, targets, rows, "record").item() == pytest.approx((ln2 + ln43) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="token"):
        small_build.answer_loss(logits, targets, rows, "sentence")


def test_per_record_loss_weighs_a_short_answer_as_much_as_a_long_one(tiny_fastvlm, monkeypatch):
    """`--answer-loss record` on a batch of a 1-token and a 3-token answer is the mean of each record's own loss."""
    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    items, features = _rows()
    short = {"input_ids": items[0]["input_ids"][:7], "labels": items[0]["labels"][:7]}  # one answer token
    batch, feats = [short, items[0]], [features[0], features[1]]
    with torch.no_grad():
        alone = [small_build.step_loss(tiny_fastvlm, [item], [f], pad_id=0).item() for item, f in zip(batch, feats)]
        per_record = small_build.step_loss(tiny_fastvlm, batch, feats, pad_id=0, per="record").item()
        per_token = small_build.step_loss(tiny_fastvlm, batch, feats, pad_id=0).item()
    assert per_record == pytest.approx(sum(alone) / 2, rel=1e-5)
    assert per_token == pytest.approx((alone[0] + 3 * alone[1]) / 4, rel=1e-5)


def _mixture_stand_ins(n_tokens: int, encode):
    """What `Mixture` asks of the record encoder (a tokenizer, each record's token ids from `encode(turns, n_img)`) and
    of the feature cache (a dict of image -> features that knows each image's token count): no tower, no template."""
    class Encoder:
        tokenizer = None
        encode_turns = staticmethod(encode)

    class Cache(dict):
        def n_tokens(self, image):
            return n_tokens

    return Encoder, Cache


def test_word_grid_tokens_are_their_words_mean_embedding_at_a_words_norm_by_hand():
    """`with_word_grids`: a labelled token becomes the mean of its words' embeddings, rescaled to the embeddings' mean
    norm; unlabelled tokens and rows without a grid keep the model's own tokens."""
    emb = torch.tensor([[3.0, 4.0], [0.0, 2.0], [6.0, 8.0]])  # norms 5, 2, 10: mean norm 17 / 3
    tokens = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    out = small_build.with_word_grids(tokens, [[[0, 1], [], [2]], None], emb)
    mean01 = torch.tensor([1.5, 3.0])  # (emb[0] + emb[1]) / 2, norm sqrt(11.25)
    assert torch.allclose(out[0, 0], mean01 * (17 / 3) / 11.25 ** 0.5)
    assert torch.allclose(out[0, 2], torch.tensor([0.6, 0.8]) * 17 / 3)
    assert torch.equal(out[0, 1], tokens[0, 1]) and torch.equal(out[1], tokens[1])


def test_word_grids_fade_out_over_their_share_of_stage_2_and_change_the_loss(tiny_fastvlm, monkeypatch):
    """Rows carry their word grid with probability 1 - step / grid_until: all at step 0, none from grid_until on; a
    row on its grid is scored on the ideal tokens (another loss), a row without one exactly as before."""
    from pathlib import Path

    from llaca.data import Record

    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    items, features = _rows()

    Encoder, Cache = _mixture_stand_ins(4, lambda turns, n_img: items[0])

    records = [Record(f"r{i}", Path(f"{i}.png"), [("q", "a")]) for i in range(10)]
    cache = Cache({r.image: features[0] for r in records})
    grids = {str(r.image): [[2, 3], [], [4], []] for r in records}
    mixture = small_build.Mixture(records, Encoder, cache, seed=0, word_grids=grids, grid_until=100)
    share = {step: sum("word_grid" in it for _ in range(20) for it in mixture.batch(10, step)[0]) / 200
             for step in (0, 50, 100, 150)}
    assert share[0] == 1.0 and 0.35 < share[50] < 0.65 and share[100] == share[150] == 0.0
    assert "word_grid" not in small_build.Mixture(records, Encoder, cache, seed=0).batch(10, 0)[0][0]
    on_grid = {**items[0], "word_grid": grids["0.png"]}
    with torch.no_grad():
        plain = small_build.step_loss(tiny_fastvlm, [items[0]], [features[0]], pad_id=0).item()
        ideal = small_build.step_loss(tiny_fastvlm, [on_grid], [features[0]], pad_id=0).item()
        again = small_build.step_loss(tiny_fastvlm, [items[0]], [features[0]], pad_id=0).item()
    assert ideal != pytest.approx(plain, rel=1e-4) and again == plain


def test_build_prompts_never_include_a_language_check_prompt():
    check = {p["prompt"].lower() for p in json.loads((ASSETS_DIR / "small" / "text_check.json").read_text())["prompts"]}
    for prompts in (small_build.chat_prompts(0), small_build.repair_prompts(0)):
        assert prompts and not {p.lower() for p in prompts} & check
    assert len(small_build.repair_prompts(0)) > 3 * len(small_build.chat_prompts(0))


def test_stored_adapter_is_half_in_small_shards_and_loads_back_as_its_rounded_weights(
        tiny_fastvlm, make_tiny_fastvlm, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from llaca.bases.small import ADAPTER_INDEX, joined_adapter, store_adapter

    for p in tiny_fastvlm.parameters():  # LoRA's B starts at zero: give every trained tensor a value to round
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    tiny_fastvlm.save_pretrained(tmp_path)
    full = load_file(tmp_path / "adapter_model.safetensors")
    store_adapter(tmp_path, max_shard_size=24000)
    shards = sorted(tmp_path.glob("adapter_model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / ADAPTER_INDEX).is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    parts = [load_file(f) for f in shards]
    assert all(sum(t.numel() * t.element_size() for t in part.values()) <= 24000 for part in parts)
    half = {k: v for part in parts for k, v in part.items()}
    assert half.keys() == full.keys() and all(t.dtype == torch.float16 for t in half.values())

    with joined_adapter(tmp_path) as folder:
        reloaded = PeftModel.from_pretrained(make_tiny_fastvlm(), folder)
    loaded = get_peft_model_state_dict(reloaded)
    assert loaded.keys() == full.keys()
    for key, value in loaded.items():
        assert value.dtype == torch.float32 and torch.equal(value, full[key].half().float()), key


def test_tower_tail_on_the_cached_front_is_the_towers_own_output_and_its_lora_learns(make_tiny_fastvlm, tmp_path,
                                                                                     monkeypatch):
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from llaca.train.tuner import vision_block_pattern

    model = make_tiny_fastvlm().eval()
    tower = model.model.vision_tower
    n_blocks = len(tower.encoder.blocks)
    images, rng = [], np.random.default_rng(0)
    for i in range(2):  # noise images: features that differ from image to image
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype="uint8")).save(images[-1])

    class Processor:  # the cache's only use of a processor: pixels of 64 px images
        @staticmethod
        def image_processor(pics, return_tensors):
            arr = torch.stack([torch.from_numpy(np.asarray(p, dtype="float32")) for p in pics])
            return {"pixel_values": arr.permute(0, 3, 1, 2) / 255}

    cache = small_build.FeatureCache(tmp_path / "cache", model, Processor, front=n_blocks - 1)
    cache.fill(images)
    with torch.no_grad():
        front = tower.embeddings(Processor.image_processor([Image.open(images[0])], "pt")["pixel_values"])
        for block in tower.encoder.blocks[:-1]:
            front = block(front)
    scale = front.abs().mean().item()
    assert scale > 1e-4  # not the ~1e-11 of transformers' own init (`make_tiny_fastvlm`)
    # (channels, 2, 2), kept in float16: equal to ~1e-3 of the values' scale
    torch.testing.assert_close(cache[images[0]].float(), front[0], rtol=2e-3, atol=2e-3 * scale)
    assert cache.n_tokens(images[0]) == 4  # a 2x2 map: FastVLM's 4 image tokens
    with torch.no_grad():
        pixels = Processor.image_processor([Image.open(p) for p in images], "pt")["pixel_values"]
        full = tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)
        tail = small_build.tower_tail(model, torch.stack([cache[p] for p in images]).float(), 1)
    tail_scale = full.abs().mean().item()
    assert (full[0] - full[1]).abs().mean() > 0.1 * tail_scale  # the two images' features differ ...
    torch.testing.assert_close(tail, full, rtol=1e-2, atol=1e-2 * tail_scale)  # ... more than the fp16 cache does

    targets = small_build.LORA_TARGETS + "|" + vision_block_pattern(model, 1, lora=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  modules_to_save=["multi_modal_projector"]))
    items, _ = _rows()
    # fp32, so that small gradients are not rounded away
    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    loss = small_build.step_loss(peft_model, items[:2], [cache[p] for p in images], pad_id=0, tower_blocks=1)
    loss.backward()
    # lora_B starts at zero, so the first gradient reaches B (A gets one once B moves)
    tail_lora = {n: p.grad for n, p in peft_model.named_parameters() if "vision_tower" in n and "lora_B" in n}
    assert tail_lora and all(f"blocks.{n_blocks - 1}." in n or "top_conv" in n for n in tail_lora)
    assert any(g is not None and g.abs().sum() > 0 for g in tail_lora.values())


def test_stage0_points_each_images_tokens_at_its_answer_embedding_at_a_words_norm(make_tiny_fastvlm, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llaca.data.records import Record

    model = make_tiny_fastvlm()
    words = ["red", "blue", "star", "seven", "cup", "sun"] + [f"w{i}" for i in range(50)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 60}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    answers = ["red", "blue", "star", "seven", "cup", "sun"]
    records = [Record(id=str(i), image=tmp_path / f"{i}.png", turns=[("What is this?", a)])
               for i, a in enumerate(answers)]
    features = {r.image: torch.randn(4, 320, generator=torch.Generator().manual_seed(i)) for i, r in enumerate(records)}
    emb_before = model.get_input_embeddings().weight.detach().clone()
    lm_before = {n: p.detach().clone() for n, p in model.named_parameters() if "multi_modal_projector" not in n}
    log: list = []
    info = small_build.embed_align(model, records, features, tokenizer, epochs=60, batch=3, lr=1e-2, log=log)

    assert info["embed_align_vocab"] == 64  # 6 answer words + every other token of the tiny vocabulary as negatives
    first = sum(e["loss"] for e in log[:4]) / 4
    last = sum(e["loss"] for e in log[-4:]) / 4
    assert last < 0.5 * first
    emb = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        tokens = small_build.projector_of(model)(torch.stack([features[r.image] for r in records]))
        unit = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
        bag = torch.softmax(unit / 0.05, -1).mean(1)  # (6 images, 64 tokens)
    assert bag.argmax(-1).tolist() == [words.index(a) for a in answers]
    # the rescale: the tokens enter the LM at the embeddings' mean norm, not the fit's arbitrary one
    assert tokens.norm(dim=-1).mean().item() == pytest.approx(emb.norm(dim=-1).mean().item(), rel=0.05)
    assert torch.equal(emb, emb_before)  # only the projector learned
    assert all(torch.equal(p, lm_before[n]) for n, p in model.named_parameters() if n in lm_before)


def test_stage0_targets_are_plain_word_answers():
    named = ["3", "egg", "top left", "meats and eggs", "red"]
    not_named = ["A", "yes", "No", "unanswerable", "The text 'egg'.", "A food.", "[0.1,0.2,0.5,0.9]",
                 "The picture shows four leds and two stars."]
    assert all(small_build.names_the_image(a) for a in named)
    assert not any(small_build.names_the_image(a) for a in not_named)
    from pathlib import Path

    from llaca.data import Record

    talk = Record("r1", Path("a.png"), [("What colour is it?", "red"), ("Is there a dog?", "no"),
                                        ("What does the text say?", "lamp")])
    single = Record("r2", Path("b.png"), [("Which option?", "B")])
    assert [(r.image.name, r.turns) for r in small_build.naming_turns([talk, single])] == [
        ("a.png", [("What colour is it?", "red")]), ("a.png", [("What does the text say?", "lamp")])]


def test_grouped_batches_pad_less_and_resume_at_the_checkpoint_interval():
    from pathlib import Path

    from llaca.data import Record

    Encoder, Cache = _mixture_stand_ins(
        49, lambda turns, n_img: {"input_ids": torch.zeros(n_img + 10 * len(turns), dtype=torch.long)})

    records = [Record(f"r{i}", Path(f"{i}.png"), [("q", "a")] * (1 + i % 3)) for i in range(60)]
    cache = Cache({r.image: torch.zeros(1) for r in records})

    def padded(mixture, steps):
        total = 0
        for _ in range(steps):
            items, feats = mixture.batch(8)
            assert len(items) == len(feats) == 8
            total += 8 * max(len(i["input_ids"]) for i in items) - sum(len(i["input_ids"]) for i in items)
        return total

    plain = small_build.Mixture(records, Encoder, cache, seed=3)
    grouped = small_build.Mixture(records, Encoder, cache, seed=3, group_by_length=5)
    assert padded(grouped, 20) < padded(plain, 20) / 3
    assert small_build.CHECKPOINT_EVERY % 5 == 0
    resumed = small_build.Mixture(records, Encoder, cache, seed=0, group_by_length=5)
    resumed.rng.setstate(grouped.rng.getstate())  # what a checkpoint after 20 steps (4 pools) restores
    assert [len(i["input_ids"]) for i in grouped.batch(8)[0]] == [len(i["input_ids"]) for i in resumed.batch(8)[0]]


def test_an_interrupted_stage_resumes_at_its_checkpoint_as_if_never_stopped(make_tiny_fastvlm, tmp_path, monkeypatch):
    """`train` checkpoints every `every` steps; a run killed after one resumes there and ends where an uninterrupted
    run ends: the same weights, losses and learning rates (cosine schedule resumed, not restarted)."""
    import random

    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    rows = _rows()[0][2:]

    class TextRows:  # `Mixture`'s interface: seeded draws from `rng`, which the checkpoint saves and restores
        def __init__(self, stop_at: int | None = None):
            self.rng, self.calls, self.stop_at = random.Random(5), 0, stop_at

        def batch(self, size, step=0):
            self.calls += 1
            if self.calls == self.stop_at:
                raise KeyboardInterrupt  # the build killed while it draws step 5's batch
            return [self.rng.choice(rows) for _ in range(size)], [None] * size

    def model():
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=small_build.LORA_TARGETS, init_lora_weights="gaussian")
        return get_peft_model(make_tiny_fastvlm(), lora)

    def run(m, mixture, folder, log):
        small_build.train(m, mixture, 2, 0, steps=6, lr=1e-2, desc="t", log=log, checkpoint=folder, every=2)

    whole, whole_log = model(), []
    run(whole, TextRows(), tmp_path / "whole", whole_log)
    stopped_log = []
    with pytest.raises(KeyboardInterrupt):
        run(model(), TextRows(stop_at=5), tmp_path / "stopped", stopped_log)
    assert json.loads((tmp_path / "stopped" / "state.json").read_text())["step"] == 4
    resumed, resumed_log = model(), []
    run(resumed, TextRows(), tmp_path / "stopped", resumed_log)
    assert [r["step"] for r in resumed_log] == list(range(1, 7))
    for a, b in zip(whole_log, resumed_log):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    trained = dict(resumed.named_parameters())
    for name, p in whole.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, atol=1e-6, rtol=1e-5)


def test_fact_align_teaches_each_image_token_its_patch_words_and_only_the_tail_and_projector_learn(
        make_tiny_fastvlm, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llaca.data import world
    from llaca.models.vision import efficientnet_front

    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    model = make_tiny_fastvlm().eval()
    tower = model.model.vision_tower
    n_blocks = len(tower.encoder.blocks)
    words = ["red", "blue", "star", "ring", "dog", "animal", "owl"] + [f"w{i}" for i in range(50)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 60}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")

    def shape(colour, kind, box):
        return world.Thing("shape", kind, "shape", box, colour=colour, shape=kind)

    dog = world.Thing("sprite", "dog", "animal", (34, 34, 62, 62), sprite=0)
    scenes = [world.Scene("objects", "plain", things=[shape("red", "star", (0, 0, 30, 30)), dog]),
              world.Scene("objects", "plain", things=[shape("blue", "ring", (34, 0, 62, 30))]),
              world.Scene("text", "plain", text="owl"),
              world.Scene("objects", "plain", things=[shape("blue", "star", (0, 34, 30, 62)), dog])]
    images = [f"{i}.png" for i in range(len(scenes))]
    with torch.no_grad():  # the shape of the frozen front's map (`FeatureCache(front=...)` keeps it), at unit scale:
        shape = efficientnet_front(tower, torch.rand(1, 3, 64, 64), n_blocks - 1).shape[1:]
    fronts = torch.randn(len(scenes), *shape, generator=torch.Generator().manual_seed(0))
    cache = dict(zip(images, fronts))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # what the caller had set to learn next (stage 1: the projector)
        p.requires_grad = "multi_modal_projector" in n
    log: list = []
    info = small_build.fact_align(model, images, scenes, cache, tokenizer, epochs=150, batch=4, lr=1e-2,
                                  tail_lr=1e-3, grid=2, test=(images, scenes), log=log)

    assert info["fact_align_vocab"] == 64  # the 7 patch words + every other token of the tiny vocabulary
    assert sum(e["loss"] for e in log[-5:]) < 0.5 * sum(e["loss"] for e in log[:5])
    # every labelled token's nearest word is one of its patch's (the 4 images learned by heart)
    assert info["fact_align_test_things_accuracy"] == 100.0 and info["fact_align_test_words_accuracy"] == 100.0
    emb = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        tokens = small_build.projector_of(model)(small_build.tower_tail(model, fronts, 1))
    assert tokens.norm(dim=-1).mean().item() == pytest.approx(emb.norm(dim=-1).mean().item(), rel=0.05)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    tail = f"vision_tower.encoder.blocks.{n_blocks - 1}."
    assert any(tail in n for n in changed) and any("top_conv" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)
    # nothing else: not the LM, not the front, not the tail's BatchNorms or its pinned squeeze-excite gate
    assert all(("multi_modal_projector" in n or tail in n or "top_conv" in n) and "bn" not in n
               and "norm" not in n and "squeeze_excite" not in n for n in changed), sorted(changed)
    assert all(p.requires_grad == ("multi_modal_projector" in n) for n, p in model.named_parameters())
    # what the LM reads from then on: the taught tail, run once per image
    features = small_build.TailFeatures({k: v for k, v in cache.items()}, model, 1, images)
    with torch.no_grad():
        expected = small_build.tower_tail(model, fronts, 1)
    torch.testing.assert_close(features[images[1]].float(), expected[1], rtol=1e-2, atol=1e-2)
    assert features.n_tokens(images[0]) == 4


def test_fact_loss_by_hand():
    """Per labelled token for things (a token's words share its target evenly), once per image on the bag of its
    tokens for a written word."""
    import math

    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]],  # things: rows {0, 1}, none, {2}
                      [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]],  # a written word: row 2 on every token
                      [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]]])  # nothing to say (background)
    mask = small_build._target_mask([[[0, 1], [], [2]], [[2], [2], [2]], [[], [], []]], 3)
    assert mask[0, 0].tolist() == [0.5, 0.5, 0.0] and mask[0, 1].sum() == 0
    loss = small_build.fact_loss(p.log(), mask, torch.tensor([False, True, False]))
    things = (-(0.5 * math.log(0.5) + 0.5 * math.log(0.3)) - math.log(0.6)) / 2  # the mean of its two labelled tokens
    word = -math.log((0.2 + 0.6 + 0.6) / 3)
    assert loss.item() == pytest.approx((things + word) / 2, rel=1e-6)  # per image; the background image not counted
    only_things = small_build.fact_loss(p.log()[:1], mask[:1], torch.tensor([False]))
    assert only_things.item() == pytest.approx(things, rel=1e-6)


def test_keep_loss_by_hand():
    """In units of each channel's spread: a decoder that knows nothing beyond the mean misses all (1.0 on the sample
    the spread came from, up to n/(n-1)), one that reads the features back exactly misses nothing."""
    before = torch.tensor([[[1.0, 10.0], [3.0, 30.0]], [[5.0, 50.0], [7.0, 70.0]]])  # (B=2, tokens=2, channels=2)
    flat = before.flatten(0, 1)
    mean, std = flat.mean(0), flat.std(0)
    assert small_build.keep_loss(torch.zeros_like(before), before, mean, std).item() == pytest.approx(3 / 4)
    assert small_build.keep_loss((before - mean) / std, before, mean, std).item() == pytest.approx(0.0, abs=1e-7)
    off = (before - mean) / std + torch.tensor([0.5, 0.0])  # half a spread off on the first channel only
    assert small_build.keep_loss(off, before, mean, std).item() == pytest.approx(0.25 / 2)


def test_fact_align_with_keep_leaves_the_untouched_features_readable_from_its_tokens(make_tiny_fastvlm, monkeypatch):
    """`keep` > 0: the taught tokens still say their patch's words, and a linear read of them recovers most of what the
    untouched tail's features held (the share reported for the test images)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llaca.data import world
    from llaca.models.vision import efficientnet_front

    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    model = make_tiny_fastvlm().eval()
    tower = model.model.vision_tower
    words = ["red", "blue", "star", "ring"] + [f"w{i}" for i in range(20)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 30}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    scenes = [world.Scene("objects", "plain", things=[world.Thing("shape", k, "shape", box, colour=c, shape=k)])
              for c, k, box in [("red", "star", (0, 0, 30, 30)), ("blue", "ring", (34, 0, 62, 30)),
                                ("blue", "star", (0, 34, 30, 62)), ("red", "ring", (34, 34, 62, 62))]]
    images = [f"{i}.png" for i in range(len(scenes))]
    with torch.no_grad():
        shape = efficientnet_front(tower, torch.rand(1, 3, 64, 64), len(tower.encoder.blocks) - 1).shape[1:]
    cache = dict(zip(images, torch.randn(len(scenes), *shape, generator=torch.Generator().manual_seed(0))))
    info = small_build.fact_align(model, images, scenes, cache, tokenizer, epochs=150, batch=4, lr=1e-2,
                                  tail_lr=1e-3, grid=2, test=(images, scenes), keep=1.0)
    assert info["fact_align_keep"] == 1.0
    assert info["fact_align_test_things_accuracy"] == 100.0
    assert info["fact_align_test_kept"] > 0.5  # 0 would be a read that knows only the features' mean


def test_fact_stage_keeps_the_taught_tail_and_an_interrupted_build_loads_it_instead_of_teaching_again(
        make_tiny_fastvlm, tmp_path, monkeypatch):
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llaca.data import Record, world

    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    words = ["red", "star", "owl"] + [f"w{i}" for i in range(50)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 60}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    scenes = [world.Scene("objects", "plain", things=[world.Thing("shape", "star", "shape", (0, 0, 30, 30),
                                                                  colour="red", shape="star")]),
              world.Scene("text", "plain", text="owl")]
    records = [Record(str(i), Path(f"{i}.png"), [("What is this?", "x")]) for i in range(2)]
    by_image = {str(r.image): sc for r, sc in zip(records, scenes)}
    first = make_tiny_fastvlm().eval()
    n_blocks = len(first.model.vision_tower.encoder.blocks)
    fronts = torch.randn(2, 48, 2, 2, generator=torch.Generator().manual_seed(0))
    cache = {r.image: f for r, f in zip(records, fronts)}
    untaught = {n: p.detach().clone() for n, p in first.named_parameters()}
    features = small_build.fact_stage(first, tmp_path, records, lambda: by_image, records, lambda: by_image, cache,
                                      tokenizer,
                                      epochs=3, seed=0, lm_images=[r.image for r in records])
    assert (tmp_path / "fact_align.safetensors").is_file() and not (tmp_path / "fact_align.partial").exists()
    assert set(json.loads((tmp_path / "fact_align.json").read_text())) >= {"fact_align_steps",
                                                                            "fact_align_test_words_accuracy"}
    tail = f"encoder.blocks.{n_blocks - 1}."
    assert any(tail in n and not torch.equal(p, untaught[n]) for n, p in first.named_parameters())

    def teach_again(*args, **kwargs):
        raise AssertionError("the taught weights were on disk: nothing to teach again")

    monkeypatch.setattr(small_build, "fact_align", teach_again)
    resumed = make_tiny_fastvlm().eval()
    again = small_build.fact_stage(resumed, tmp_path, records, teach_again, records, teach_again, cache,
                                   tokenizer,
                                   epochs=3, seed=0, lm_images=[r.image for r in records])
    kept = ("multi_modal_projector", tail, "top_conv")
    taught = {n: p for n, p in first.named_parameters() if any(k in n for k in kept)}
    assert all(torch.equal(p, taught[n]) for n, p in resumed.named_parameters() if n in taught)
    assert all(torch.equal(features[r.image], again[r.image]) for r in records)


@pytest.mark.parametrize("meta_file", ["assets/small/meta.json", "bench_results/small/build9/meta.json"])
def test_the_model_cards_command_repeats_the_build_it_describes(meta_file):
    """`model_card.build_command` (the card's "Training" line), parsed by `small_build`'s own parser, gives back the
    recipe recorded in the meta: the shipped build's and a fact-aligned one's (stage 0')."""
    from llaca.bases.model_card import RECIPE_KEYS, build_command, recipe_value
    from llaca.paths import REPO_DIR

    build = json.loads((REPO_DIR / meta_file).read_text())["build"]
    command = build_command(build).split()
    assert command[:3] == ["python", "-m", "llaca.bases.small_build"]
    args = small_build.parser().parse_args(command[3:])
    assert args.distil_text == build["distil_text"]
    for key in RECIPE_KEYS:
        assert getattr(args, key) == recipe_value(build, key), key
    assert {"seed", "tune_steps", "fact_align_epochs", "pad_to_multiple_of"} <= set(RECIPE_KEYS)


def test_the_answer_loss_is_in_the_command_only_where_a_build_weighed_records():
    """Builds 1-15 averaged per token (no `answer_loss` in their meta): their commands stay as they were, and a build
    that weighed records says so in its command and its card's stage-2 row."""
    from llaca.bases.model_card import _recipe_rows, build_command
    from llaca.paths import REPO_DIR

    build = json.loads((REPO_DIR / "assets/small/meta.json").read_text())["build"]
    assert "--answer-loss" not in build_command(build)
    assert small_build.parser().parse_args(build_command(build).split()[3:]).answer_loss == "token"
    per_record = {**build, "answer_loss": "record"}
    assert small_build.parser().parse_args(build_command(per_record).split()[3:]).answer_loss == "record"
    assert "each record's answer loss weighed equally" in dict(_recipe_rows(per_record))["2, visual instruction tuning"]


def test_word_grids_are_in_the_command_only_where_a_build_faded_them():
    """Builds 1-16 read their own tokens throughout: their commands stay as they were; a build whose stage 2 started
    from word grids repeats with `--word-grid-until` and its card's stage-2 row says so."""
    from llaca.bases.model_card import _recipe_rows, build_command
    from llaca.paths import REPO_DIR

    build = json.loads((REPO_DIR / "assets/small/meta.json").read_text())["build"]
    assert "--word-grid-until" not in build_command(build)
    faded = {**build, "word_grid_until": 0.5}
    assert small_build.parser().parse_args(build_command(faded).split()[3:]).word_grid_until == 0.5
    assert "over the first 50% of the steps" in dict(_recipe_rows(faded))["2, visual instruction tuning"]
    with pytest.raises(ValueError, match="--fact-align-epochs"):  # the grids are the words stage 0' teaches
        small_build.build(word_grid_until=0.5, fact_align_epochs=0)
    with pytest.raises(ValueError, match="share"):
        small_build.build(word_grid_until=1.5, fact_align_epochs=10)


def test_a_kept_fact_projector_is_in_the_command_and_the_card_drops_stage_1():
    """Builds 1-18 retrain the projector in stages 1-2; a build that keeps the one stage 0' taught repeats with
    `--keep-fact-projector`, and its card lists no stage 1 and a LoRA-only stage 2. It needs stage 0'."""
    from llaca.bases.model_card import _recipe_rows, build_command
    from llaca.paths import REPO_DIR

    build = json.loads((REPO_DIR / "assets/small/meta.json").read_text())["build"]
    assert "--keep-fact-projector" not in build_command(build)
    assert "1, feature alignment" in dict(_recipe_rows(build))
    kept = {**build, "keep_fact_projector": True, "fact_align_epochs": 10}
    assert small_build.parser().parse_args(build_command(kept).split()[3:]).keep_fact_projector
    rows = dict(_recipe_rows(kept))
    assert "1, feature alignment" not in rows
    assert rows["2, visual instruction tuning"].startswith("LoRA r=")
    assert "the projector stays as stage 0' taught it" in rows["2, visual instruction tuning"]
    with pytest.raises(ValueError, match="--fact-align-epochs"):
        small_build.build(keep_fact_projector=True, fact_align_epochs=0)


def test_a_split_projector_learns_only_its_columns_on_the_imagenet_half(make_tiny_fastvlm):
    """`--split-fact-projector`: after AdamW steps on a loss that reads both halves of the twin map, the first layer's
    columns on the first (ImageNet) half have moved and its columns on the taught half, its bias and the second layer
    are exactly as they were; the command and the card say so, and the option needs stage 0' on the twin map."""
    from peft import LoraConfig, get_peft_model

    from llaca.bases.model_card import _recipe_rows, build_command

    # as stage 2 wraps it: LoRA on the LM, the projector a copy peft trains and saves
    wrapped = get_peft_model(make_tiny_fastvlm(), LoraConfig(r=4, target_modules=small_build.LORA_TARGETS,
                                                             modules_to_save=["multi_modal_projector"]))
    projector = small_build.projector_of(wrapped).modules_to_save["default"]
    before = {n: p.detach().clone() for n, p in projector.named_parameters()}
    with small_build.only_imagenet_columns_learn(projector):
        learning = [p for p in projector.parameters() if p.requires_grad]
        assert learning == [projector.linear_1.weight]
        opt = torch.optim.AdamW(learning, lr=1e-2, weight_decay=0.0)
        features = torch.randn(2, 4, projector.linear_1.in_features)
        for _ in range(3):
            projector(features).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    half = projector.linear_1.in_features // 2
    w, w0 = projector.linear_1.weight.detach(), before["linear_1.weight"]
    assert not torch.equal(w[:, :half], w0[:, :half])
    assert torch.equal(w[:, half:], w0[:, half:])
    for name in ("linear_1.bias", "linear_2.weight", "linear_2.bias"):
        assert torch.equal(dict(projector.named_parameters())[name].detach(), before[name])
    build = {**json.loads((ASSETS_DIR / "small/meta.json").read_text())["build"], "split_fact_projector": True,
             "fact_align_epochs": 10, "readout": "twin"}
    assert small_build.parser().parse_args(build_command(build).split()[3:]).split_fact_projector
    rows = dict(_recipe_rows(build))
    assert "ImageNet half learn" in rows["2, visual instruction tuning"]
    assert rows["1, feature alignment"].startswith("the projector's columns on the twin map's ImageNet half alone")
    for wrong in (dict(fact_align_epochs=0, readout="twin"), dict(fact_align_epochs=10, readout="head"),
                  dict(fact_align_epochs=10, readout="twin", keep_fact_projector=True)):
        with pytest.raises(ValueError, match="--split-fact-projector"):
            small_build.build(split_fact_projector=True, **wrong)


def test_a_centre_word_is_in_the_command_only_where_a_build_said_one():
    """`--fact-centre-word` has no value by default: the card's command names it only for a build that used one, and
    `small_build` refuses it without stage 0', whose target it is."""
    from llaca.bases.model_card import build_command
    from llaca.paths import REPO_DIR

    build = json.loads((REPO_DIR / "bench_results/small/build13/meta.json").read_text())["build"]
    assert "--fact-centre-word" not in build_command(build)
    assert small_build.parser().parse_args(build_command(build).split()[3:]).fact_centre_word is None
    args = small_build.parser().parse_args(build_command({**build, "fact_centre_word": "one"}).split()[3:])
    assert args.fact_centre_word == "one" and args.fact_align_epochs == build["fact_align_epochs"]
    with pytest.raises(ValueError, match="--fact-align-epochs"):
        small_build.build(fact_centre_word="one", fact_align_epochs=0)


def test_a_count_word_is_in_the_command_and_the_card_only_where_a_build_said_it():
    """`--fact-count-word` is off by default: the card's command and its stage-0' row name it only for a build that
    used it, the command parses back to it, and `small_build` refuses it without stage 0'."""
    from llaca.bases.model_card import _recipe_rows, build_command
    from llaca.paths import REPO_DIR

    build = json.loads((REPO_DIR / "bench_results/small/build15/meta.json").read_text())["build"]
    assert "--fact-count-word" not in build_command(build)
    assert not small_build.parser().parse_args(build_command(build).split()[3:]).fact_count_word
    counted = {**build, "fact_count_word": True}
    args = small_build.parser().parse_args(build_command(counted).split()[3:])
    assert args.fact_count_word and args.fact_centre_word == build["fact_centre_word"]
    row = dict(_recipe_rows(counted))["0' (no LM pass)"]
    assert row.endswith("the scene's number of things on every patch a thing owns")
    assert "number of things" not in dict(_recipe_rows(build))["0' (no LM pass)"]
    with pytest.raises(ValueError, match="--fact-count-word"):
        small_build.build(fact_count_word=True, fact_align_epochs=0)


def test_fact_align_on_a_twin_head_tower_teaches_only_the_second_copy(make_tiny_fastvlm, monkeypatch):
    """`efficientnet_lite_twin_tower` keeps the ImageNet head map in its first half: `fact_align` multiplies the tail's
    gradients by `twin_learning_masks`, so the kept copy's weights and the zero blocks between the copies come out
    exactly as they went in while the second copy learns."""
    from llaca.data import world
    from llaca.models.vision import efficientnet_front, twin_learning_masks

    monkeypatch.setattr("llaca.train.tuner.native_bf16", lambda device_type=None: False)
    model = make_tiny_fastvlm().eval()
    tower = model.model.vision_tower
    tower.config.twin_head = True  # the masks read only this mark and the tail's shapes
    masks = twin_learning_masks(tower)
    assert len(masks) == 4 and all(0 < m.mean() < 1 for m in masks.values())
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["red", "star", "blue", "ring"] + [f"w{i}" for i in range(50)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 60}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    scenes = [world.Scene("objects", "plain", things=[world.Thing("shape", "star", "shape", (0, 0, 30, 30),
                                                                  colour="red", shape="star")]),
              world.Scene("objects", "plain", things=[world.Thing("shape", "ring", "shape", (34, 0, 62, 30),
                                                                  colour="blue", shape="ring")])]
    images = ["a.png", "b.png"]
    n_blocks = len(tower.encoder.blocks)
    with torch.no_grad():
        shape = efficientnet_front(tower, torch.rand(1, 3, 64, 64), n_blocks - 1).shape[1:]
    cache = dict(zip(images, torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))))
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    small_build.fact_align(model, images, scenes, cache, tokenizer, epochs=20, batch=2, lr=1e-2, tail_lr=1e-2, grid=2)
    params = dict(tower.named_parameters())
    for name, mask in masks.items():
        kept, taught = mask == 0, mask == 1
        assert torch.equal(params[name][kept], before[name][kept]), name
        assert not torch.equal(params[name][taught], before[name][taught]), name
    hooks_left = [p._backward_hooks for p in params.values() if getattr(p, "_backward_hooks", None)]
    assert not hooks_left  # the masks act during stage 0' only
    with pytest.raises(ValueError, match="twin-head"):  # earlier blocks feed both copies: teaching them is refused
        small_build.fact_align(model, images, scenes, cache, tokenizer, epochs=1, batch=2, blocks=2, grid=2)


def test_run_folders_share_stages_0_and_1_between_builds_that_differ_in_stage_2_alone(tmp_path):
    """The run folder holds stages 0'-1, so it is named by what changes them; the stage-2 checkpoint carries the rest.
    A folder named the earlier way (every option in it) is resumed where it exists and the new one does not."""
    base = dict(seed=0, align_steps=150, tune_steps=550, batch=16, readout="twin", tower_blocks=0,
                tune_lr=small_build.TUNE_LR, embed_align_epochs=0, fact_align_epochs=10, fact_keep=0.0,
                fact_centre_word="one", turns_per_image=1, group_by_length=10, pad_to_multiple_of=32,
                answer_loss_per="token", text_share=small_build.TEXT_SHARE, distil_text=small_build.DISTIL_TEXT,
                word_grid_until=0.0)
    run, suffix = small_build.run_folders(tmp_path, **base)
    assert run == tmp_path / "small-build-seed0-a150-t550-b16-twin-facts10-centre-one"
    assert suffix == "-group10-pad32"
    others = [dict(base, tune_lr=1e-4), dict(base, group_by_length=1), dict(base, answer_loss_per="record"),
              dict(base, text_share=0.125), dict(base, word_grid_until=0.5), dict(base, keep_fact_projector=True),
              dict(base, split_fact_projector=True)]
    suffixes = {suffix}
    for options in others:
        other_run, other_suffix = small_build.run_folders(tmp_path, **options)
        assert other_run == run
        suffixes.add(other_suffix)
    assert len(suffixes) == 1 + len(others)
    assert small_build.run_folders(tmp_path, **dict(base, fact_count_word=True))[0].name.endswith("-one-count")
    for changes_stage_0_or_1 in (dict(base, tune_steps=700), dict(base, fact_centre_word=None),
                                 dict(base, fact_count_word=True),
                                 dict(base, readout="head"), dict(base, tower_blocks=1)):
        assert small_build.run_folders(tmp_path, **changes_stage_0_or_1)[0] != run
    # the default recipe's folder keeps build 5's name
    plain = dict(base, readout="head", fact_align_epochs=0, fact_centre_word=None, group_by_length=1,
                 pad_to_multiple_of=1)
    assert small_build.run_folders(tmp_path, **plain) == (tmp_path / "small-build-seed0-a150-t550-b16", "")
    legacy = tmp_path / "small-build-seed0-a150-t550-b16-twin-facts10-centre-one-group10-pad32"
    legacy.mkdir()
    assert small_build.run_folders(tmp_path, **base) == (legacy, "")
    assert small_build.run_folders(tmp_path, **dict(base, word_grid_until=0.5)) == (legacy, "-grid0.5")
    assert small_build.run_folders(tmp_path, **dict(base, keep_fact_projector=True)) == (legacy, "-fact-projector")
    assert small_build.run_folders(tmp_path, **dict(base, split_fact_projector=True)) == (legacy, "-split-projector")
    run.mkdir()
    assert small_build.run_folders(tmp_path, **base) == (run, "-group10-pad32")
