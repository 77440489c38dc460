"""The stage recipe on a real tiny LLaVA: EMA replaces the raw weights, interrupted stages resume exactly,
failed stages leave the registry untouched, replay mixes earlier samples, versions are atomic."""
from __future__ import annotations

import pytest
import torch

from llaca.train.tuner import StageCancelled, StageConfig, StageRecipe, run_stage
from llaca.versions import Registry, VersionError, load_version


def weights(registry, vid):
    """A version's weights by in-memory parameter name (loaded the way the product loads them)."""
    model, _ = load_version(registry, vid)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_llaca_stage_saves_ema_weights_not_raw(llaca_home, coin_dir):
    registry = Registry()
    cfg = StageConfig(data=str(coin_dir / "vqav2" / "train"), method="llaca", max_steps=3, batch_size=8,
                      evaluate_after=False)
    recipe = StageRecipe(cfg, registry)
    recipe.setup()
    raw_before_end, ema_before_end = {}, {}
    original_end = recipe.rule.end_stage

    def capture_then_end(params):
        raw_before_end.update({n: p.detach().to("cpu", copy=True) for n, p in params.items()})  # saved: read on CPU
        ema_before_end.update({k[4:]: v.to("cpu", copy=True)
                               for k, v in recipe.rule.state_dict().items() if k.startswith("ema.")})
        original_end(params)

    recipe.rule.end_stage = capture_then_end
    recipe.train()
    version = recipe.save()
    saved = weights(registry, version.id)
    base = weights(registry, "base")
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert torch.equal(saved[name], ema_before_end[name].to(saved[name].dtype))  # the version holds the EMA
    assert not torch.equal(saved[name], raw_before_end[name])  # ... not the raw optimizer weights
    assert not torch.equal(saved[name], base[name])
    vision = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(saved[vision], base[vision])  # frozen vision tower


def test_cancel_then_resume_matches_uninterrupted(llaca_home, coin_dir):
    registry = Registry()
    data = str(coin_dir / "gqa" / "train")
    common = dict(data=data, method="llaca", parent="base", max_steps=6, batch_size=8, checkpoint_every=2,
                  evaluate_after=False)
    reference = run_stage(StageConfig(**common, name="ref"), registry)
    ref_weights = weights(registry, reference.id)

    steps = {"n": 0}

    def stop_after_three():
        return steps["n"] >= 3

    def count(event):
        if event["type"] == "step":
            steps["n"] = event["step"]

    before = [v.id for v in registry.list()]
    with pytest.raises(StageCancelled):
        run_stage(StageConfig(**common, name="resumed"), registry, on_event=count, should_stop=stop_after_three)
    assert [v.id for v in registry.list()] == before  # nothing half-written is listed
    events = []
    resumed = run_stage(StageConfig(**common, name="resumed"), registry, on_event=events.append)
    assert events[0]["type"] == "start" and events[0]["resumed"] and events[0]["step"] == 3
    got = weights(registry, resumed.id)
    worst = max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst <= 1e-6, f"resumed run differs from uninterrupted by {worst}"


def test_failed_stage_leaves_registry_untouched(llaca_home, coin_dir, monkeypatch):
    registry = Registry()
    before = {v.id: v.meta for v in registry.list()}
    base_w = weights(registry, "base")
    import llaca.models.llava as model_mod

    def broken_save(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_mod, "save_pretrained", broken_save)
    with pytest.raises(OSError):
        run_stage(StageConfig(data=str(coin_dir / "gqa" / "train"), method="seq", max_steps=1, batch_size=8,
                              evaluate_after=False), registry)
    assert {v.id: v.meta for v in registry.list()} == before
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    after = weights(registry, "base")
    assert all(torch.equal(after[k], base_w[k]) for k in base_w)


def test_replay_mixes_earlier_stage_samples(llaca_home, coin_dir):
    registry = Registry()
    first = run_stage(StageConfig(data=str(coin_dir / "sciqa" / "train"), method="seq", max_steps=1, batch_size=8,
                                  evaluate_after=False), registry)
    assert (first.path / "replay" / "data.json").is_file()
    recipe = StageRecipe(StageConfig(data=str(coin_dir / "gqa" / "train"), method="replay", parent=first.id,
                                     max_steps=1, batch_size=8, rule_hparams={"fraction": 0.25}), registry)
    recipe.setup()
    ids = [r.id for r in recipe.train_records]
    assert len(ids) == 48 + 12
    assert sum(i.startswith("gqa") for i in ids) == 48
    replayed = [i for i in ids if not i.startswith("gqa")]
    # The pool is every earlier version's replay buffer in the lineage: base's (base mixture) and v1's (sciqa).
    assert replayed and all(i.startswith(("sciqa", "base")) for i in replayed)


def test_llaca_with_replay_fraction_mixes_like_replay(llaca_home, coin_dir):
    """`llaca+replay`: the llaca rule over a stage mixed with earlier records exactly as the replay rule mixes them."""
    registry = Registry()
    first = run_stage(StageConfig(data=str(coin_dir / "sciqa" / "train"), method="seq", max_steps=1, batch_size=8,
                                  evaluate_after=False), registry)
    cfgs = {m: StageConfig(data=str(coin_dir / "gqa" / "train"), parent=first.id, max_steps=1, batch_size=8, **kw)
            for m, kw in (("replay", {"method": "replay", "rule_hparams": {"fraction": 0.25}}),
                          ("llaca", {"method": "llaca", "replay_fraction": 0.25}))}
    recipes = {m: StageRecipe(c, registry) for m, c in cfgs.items()}
    for r in recipes.values():
        r.setup()
    assert [r.id for r in recipes["llaca"].train_records] == [r.id for r in recipes["replay"].train_records]
    assert len(recipes["llaca"].train_records) == 48 + 12 and recipes["llaca"].rule.name == "llaca"
    assert cfgs["llaca"].hparams()["replay_fraction"] == 0.25 and "replay_fraction" not in cfgs["replay"].hparams()


def test_registry_guards(llaca_home):
    registry = Registry()
    with pytest.raises(VersionError):
        registry.get("../../etc")
    with pytest.raises(VersionError):
        registry.delete("base")


def test_projector_lr_is_its_own_param_group_and_survives_resume(llaca_home, coin_dir):
    """LLaVA's mm_projector_lr (the paper's recipe: LoRA 2e-4, projector 2e-5): with projector_lr=0 the projector
    stays exactly the parent's while the LoRA weights move, and a cancelled stage resumes with both groups."""
    registry = Registry()
    data = str(coin_dir / "vqav2" / "train")
    cfg = StageConfig(data=data, method="seq", lora=True, lora_r=4, lora_alpha=8, lr=1e-3, projector_lr=0.0,
                      max_steps=3, batch_size=8, evaluate_after=False, checkpoint_every=1)
    steps = {"n": 0}

    def count(event):
        steps["n"] = event.get("step", steps["n"]) if event["type"] == "step" else steps["n"]

    recipe = StageRecipe(cfg, registry, on_event=count, should_stop=lambda: steps["n"] >= 2)
    recipe.setup()
    groups = recipe.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-3, 0.0]
    projector = [n for n in recipe.params if "multi_modal_projector" in n]
    assert projector and list(recipe.params)[-len(projector):] == projector  # state indices follow group order
    assert {id(p) for p in groups[1]["params"]} == {id(recipe.params[n]) for n in projector}
    before = {n: p.detach().clone() for n, p in recipe.params.items()}
    with pytest.raises(StageCancelled):
        recipe.train()
    assert all(torch.equal(recipe.params[n], before[n]) for n in projector)
    lora_b = [n for n in recipe.params if "lora_B" in n]
    assert any(not torch.equal(recipe.params[n], before[n]) for n in lora_b)
    assert "projector_lr" in cfg.hparams() and "projector_lr" not in StageConfig(data=data).hparams()

    resumed = StageRecipe(cfg, registry)
    resumed.setup()
    assert resumed.step == 2
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in recipe.optimizer.param_groups]
    name = lora_b[0]
    assert torch.equal(resumed.optimizer.state[resumed.params[name]]["exp_avg"],
                       recipe.optimizer.state[recipe.params[name]]["exp_avg"])


def test_projector_first_trains_only_the_projector_for_that_share_of_the_steps(llaca_home, coin_dir):
    """LP-FT: with projector_first=0.5 over 4 steps the LoRA weights keep the parent's values for steps 1-2 (their
    group waits at lr 0) while the projector learns, then both learn; the setting is in the run key only when given
    and a fraction outside [0, 1) is refused."""
    registry = Registry()
    data = str(coin_dir / "vqav2" / "train")
    cfg = StageConfig(data=data, method="seq", lora=True, lora_r=4, lora_alpha=8, lr=1e-3, projector_first=0.5,
                      max_steps=4, batch_size=8, evaluate_after=False, warmup_ratio=0.0)
    seen = []
    recipe = StageRecipe(cfg, registry, on_event=lambda e: e["type"] == "step" and seen.append(
        {n: p.detach().clone() for n, p in recipe.params.items()}))
    recipe.setup()
    start = {n: p.detach().clone() for n, p in recipe.params.items()}
    projector = [n for n in recipe.params if "multi_modal_projector" in n]
    lora_b = [n for n in recipe.params if "lora_B" in n]
    assert projector and lora_b and list(recipe.params)[-len(projector):] == projector
    recipe.train()
    assert len(seen) == 4
    for step in (0, 1):  # the waiting share: LoRA exactly the parent's, the projector moved
        assert all(torch.equal(seen[step][n], start[n]) for n in lora_b)
        assert any(not torch.equal(seen[step][n], start[n]) for n in projector)
    assert any(not torch.equal(seen[3][n], seen[1][n]) for n in lora_b)
    assert cfg.hparams()["projector_first"] == 0.5 and "projector_first" not in StageConfig(data=data).hparams()
    with pytest.raises(ValueError, match="projector_first"):
        StageConfig(data=data, projector_first=1.0)


def test_bf16_mixed_precision_autocasts_the_forward_and_keeps_fp32_weights(llaca_home, coin_dir):
    """`mixed_precision="bf16"` (small's recipe): the LM's matmuls run in bf16 (its attention eager on CPU, sdpa again
    after the stage), while the weights (and so AdamW and the LLaCA rule) stay fp32; the first loss matches the fp32
    stage's to bf16 precision; the setting is in the run key only when given, and a typo is refused."""
    registry = Registry()
    data = str(coin_dir / "vqav2" / "train")
    losses, dtypes = {}, {}
    for precision in (None, "bf16"):
        cfg = StageConfig(data=data, method="llaca", max_steps=2, batch_size=8, evaluate_after=False,
                          checkpoint_every=0, mixed_precision=precision)
        seen, attention = [], []

        def on_event(e):
            if e["type"] == "step":
                seen.append(e["loss"])
                attention.append(recipe.model.config.text_config._attn_implementation)
        recipe = StageRecipe(cfg, registry, on_event=on_event)
        recipe.setup()
        lm_linear = next(m for n, m in recipe.model.named_modules()
                         if isinstance(m, torch.nn.Linear) and "language_model" in n)
        outputs = []
        hook = lm_linear.register_forward_hook(lambda mod, inp, out: outputs.append(out.dtype))
        recipe.train()
        hook.remove()
        losses[precision], dtypes[precision] = seen[0], set(outputs)
        assert all(p.dtype == torch.float32 for p in recipe.params.values())
        # bf16 on CPU trains with eager attention (faster than sdpa's bf16 backward there); serving gets sdpa back.
        # On a GPU sdpa's kernels are the fast ones: it stays.
        eager = precision == "bf16" and recipe.accelerator.device.type == "cpu"
        assert attention == ["eager" if eager else "sdpa"] * 2
        assert recipe.model.config.text_config._attn_implementation == "sdpa"
    assert dtypes == {None: {torch.float32}, "bf16": {torch.bfloat16}}
    assert losses["bf16"] == pytest.approx(losses[None], rel=0.02)
    assert "mixed_precision" not in StageConfig(data=data).hparams()
    assert StageConfig(data=data, mixed_precision="bf16").hparams()["mixed_precision"] == "bf16"
    with pytest.raises(ValueError, match="mixed_precision: 'bf17'"):
        StageRecipe(StageConfig(data=data, mixed_precision="bf17"), registry).setup()


def test_auto_mixed_precision_is_bf16_only_where_the_hardware_runs_it(monkeypatch):
    """small's recipes say "auto": bf16 on a GPU or an AVX512-BF16 CPU, fp32 on an AVX2 CPU (where emulated bf16 is
    ~30x slower); resolved when the config is made, so the run key and the version's hparams say what ran."""
    from llaca.train import tuner

    for native, expected in ((True, "bf16"), (False, None)):
        monkeypatch.setattr(tuner, "native_bf16", lambda device_type=None, native=native: native)
        cfg = StageConfig(data="somewhere", mixed_precision="auto")
        assert cfg.mixed_precision == expected
        assert cfg.hparams().get("mixed_precision") == expected
    assert StageConfig(data="somewhere", mixed_precision="no").mixed_precision is None
    assert StageConfig(data="somewhere", mixed_precision="bf16").mixed_precision == "bf16"  # asked for: as asked


def test_answer_loss_is_the_models_own_loss_with_the_head_only_on_label_tokens(llaca_home, coin_dir):
    """`answer_loss` (LM head on label positions only) gives the model's own token-mean loss and the same gradients;
    rows of different lengths (padding) and a row whose labels are cut included."""
    from llaca import data as D
    from llaca.train.loss import answer_loss

    model, processor = load_version(Registry(), "base")
    records = D.load_instruction_set(coin_dir / "vqav2" / "train").records[:3]
    batch = D.collate([D.RecordEncoder(processor).encode(r) for r in records], processor.tokenizer.pad_token_id)
    n = (batch["labels"][:, 1:] != -100).sum()
    assert 0 < n < batch["labels"][:, 1:].numel() // 2  # most positions carry no label

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ours, g_ours = loss_and_grads(lambda: answer_loss(model, batch, n))
    theirs, g_theirs = loss_and_grads(lambda: model(**batch, num_items_in_batch=n).loss)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) > 10
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-4, atol=1e-6)


def test_bf16_stage_casts_frozen_weights_once_exactly_and_puts_them_back(llaca_home, coin_dir, monkeypatch):
    """Under bf16 the frozen Linear weights (LoRA base layers, the head) are held as bf16 copies while the stage runs,
    instead of being cast on every forward: the same losses bit for bit as without, and afterwards the model has its
    fp32 weights back, unchanged, with the head tied again where it was."""
    import contextlib

    from llaca.train import tuner

    registry = Registry()
    data = str(coin_dir / "vqav2" / "train")

    def stage(with_cast: bool):
        if not with_cast:
            monkeypatch.setattr(tuner, "frozen_linears_cast", lambda *a, **k: contextlib.nullcontext())
        cfg = StageConfig(data=data, method="replay", max_steps=2, batch_size=4, evaluate_after=False,
                          checkpoint_every=0, mixed_precision="bf16", lora=True, lora_r=4, lora_alpha=8)
        losses, dtypes = [], set()

        def on_event(e):
            if e["type"] == "step":
                losses.append(e["loss"])
                dtypes.update(m.base_layer.weight.dtype for m in recipe.model.modules() if hasattr(m, "lora_A"))
        recipe = StageRecipe(cfg, registry, on_event=on_event)
        recipe.setup()
        frozen = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if not p.requires_grad}
        recipe.train()
        monkeypatch.undo()
        return recipe, losses, dtypes, frozen

    cast, losses_cast, dtypes_cast, frozen = stage(True)
    _, losses_plain, dtypes_plain, _ = stage(False)
    assert dtypes_cast == {torch.bfloat16} and dtypes_plain == {torch.float32}
    assert losses_cast == losses_plain  # exact: autocast would have cast the same weights the same way
    after = dict(cast.model.named_parameters())
    assert after.keys() == frozen.keys() | {n for n, p in after.items() if p.requires_grad}
    for name, value in frozen.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], value), name
    base = cast.model.get_base_model()
    tied = base.config.get_text_config().tie_word_embeddings or base.config.tie_word_embeddings
    assert (base.lm_head.weight is base.get_input_embeddings().weight) == bool(tied)
