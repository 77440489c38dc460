"""External LLaVA checkpoints + LoRA/QLoRA: learn -> version (adapter only) -> ask -> compare through ModelPool.

The "external checkpoint" is the tiny base saved to a folder of its own (a real LlavaForConditionalGeneration in the
standard format, like a downloaded llava-hf folder); a second copy is laid out as a Hugging Face hub cache entry to
check that a hub id resolves offline. Versions learned from it hold only a LoRA adapter + the projector.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from llaca.data import load_image, to_messages
from llaca.models.llava import QuantizationUnavailable, default_device, load_model
from llaca.serve.serving import ModelPool
from llaca.train.tuner import StageConfig, run_stage
from llaca.versions import Registry, load_version

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What shape is in the image?"


def llaca(*args, home: Path, check=True, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLACA_HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("LLACA_MODEL", None)
    proc = subprocess.run([sys.executable, "-m", "llaca", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"llaca {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def lineage(quick_home, coin_dir, tmp_path_factory):
    """checkpoint folder -> (registered as v1) -> v2 LoRA on sciqa -> v3 LoRA on gqa, all via `learn --model`."""
    root = tmp_path_factory.mktemp("lora")
    home = root / "home"
    shutil.copytree(quick_home, home, symlinks=True)
    ckpt = root / "tiny-llava"
    shutil.copytree(quick_home / "versions" / "base" / "model", ckpt)
    common = ["--model", ckpt, "--lora", "--method", "llaca", "--max-steps", "3", "--batch-size", "8"]
    first = llaca("learn", coin_dir / "sciqa" / "train", *common, "--no-eval", "--name", "sci", home=home)
    second = llaca("learn", coin_dir / "gqa" / "train", *common, "--name", "gqa", home=home)
    assert first.stdout.split()[-1] == "v2" and second.stdout.split()[-1] == "v3"
    return home, ckpt


def an_image(coin_dir):
    return sorted((coin_dir / "sciqa" / "test" / "images").iterdir())[0]


@torch.inference_mode()
def next_token_logits(model, processor, image) -> torch.Tensor:
    """Logits of the first answer token: a far stricter comparison than the tiny model's greedy text."""
    prompt = processor.apply_chat_template(to_messages([(QUESTION, None)]), add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt").to(model.device)
    return model(**inputs).logits[0, -1].float()


def test_lora_versions_store_only_the_adapter(lineage):
    home, ckpt = lineage
    registry = Registry(home)
    root, sci, gqa = registry.get("v1"), registry.get("v2"), registry.get("v3")
    assert root.meta["weights"] == "external" and root.meta["model_path"] == str(ckpt.resolve())
    assert [p.name for p in root.path.iterdir()] == ["meta.json"]  # the checkpoint is never copied
    assert (sci.parent, gqa.parent) == ("v1", "v2")  # `learn --model` continues the newest version of its lineage
    for v in (sci, gqa):
        assert v.weights == "lora" and v.meta["base_version"] == "v1"
        assert (v.path / "adapter").is_dir() and not (v.path / "model").exists()
    adapter_bytes = sum(f.stat().st_size for f in (gqa.path / "adapter").iterdir())
    full_bytes = (ckpt / "model.safetensors").stat().st_size
    assert adapter_bytes < 0.15 * full_bytes, (adapter_bytes, full_bytes)

    from safetensors.torch import load_file

    keys = list(load_file(str(gqa.path / "adapter" / "adapter_model.safetensors")))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"language_model.layers.0.self_attn.{proj}.lora_A" in k or f"mlp.{proj}.lora_A" in k for k in keys), proj
    assert any("multi_modal_projector" in k for k in keys)  # the projector trains in full, as in the paper
    assert not any("vision_tower" in k for k in keys)
    log = json.loads((gqa.path / "train_log.json").read_text())
    assert len(log) == 3 and all("alpha_mean" in e for e in log)  # the rule ran over adapter + projector
    assert {"sciqa-test", "gqa-test"} <= set(gqa.meta["metrics"]["test"])


def test_ask_with_model_answers_from_its_newest_version(lineage, coin_dir, monkeypatch, capsys):
    """`ask --model CKPT` (no version) answers as the newest version learned from CKPT, through its adapter."""
    import llaca.versions
    from llaca.cli import main
    from llaca.serve.chat import answer_once

    home, ckpt = lineage
    monkeypatch.setenv("LLACA_HOME", str(home))
    loaded = []
    real_load = llaca.versions.load_version

    def spy(registry, ref=None, **kw):
        loaded.append(ref)
        return real_load(registry, ref, **kw)

    monkeypatch.setattr(llaca.versions, "load_version", spy)
    assert main(["ask", "--model", str(ckpt), str(an_image(coin_dir)), QUESTION]) == 0
    assert loaded == ["v3"]
    model, processor = real_load(Registry(home), "v3")
    assert isinstance(model, PeftModel)
    assert capsys.readouterr().out.strip() == answer_once(model, processor, str(an_image(coin_dir)), QUESTION,
                                                          max_new_tokens=32)


def test_model_pool_serves_versions_from_one_base(lineage, coin_dir):
    home, _ = lineage
    registry = Registry(home)
    image = load_image(an_image(coin_dir))
    pool = ModelPool(registry)
    pooled = {}
    for vid in ["v2", "v3", "v1", "v2", "v3"]:  # switch back and forth between adapters and the bare base
        with pool.use(vid) as (model, processor):
            pooled.setdefault(vid, []).append(next_token_logits(model, processor, image))
    assert pool.loads == 1  # three versions, one base load
    for vid, got in pooled.items():
        alone = next_token_logits(*load_version(registry, vid), image)
        for logits in got:
            assert torch.allclose(logits, alone, atol=1e-5, rtol=0), vid
    assert not torch.allclose(pooled["v2"][0], pooled["v1"][0])  # the adapters really change the answers
    assert not torch.allclose(pooled["v2"][0], pooled["v3"][0])

    from llaca.serve.chat import answer_once

    for vid in ("v2", "v3"):
        assert pool.answer(vid, image, QUESTION, max_new_tokens=8) == answer_once(
            *load_version(registry, vid), image, QUESTION, max_new_tokens=8)

    # Concurrent users of different adapters on the one model: the lock keeps every answer its own version's.
    results, errors = {"v2": [], "v3": []}, []

    def worker(vid):
        try:
            for _ in range(3):
                with pool.use(vid) as (model, processor):
                    results[vid].append(next_token_logits(model, processor, image))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(vid,)) for vid in ("v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for vid, got in results.items():
        assert all(torch.allclose(x, pooled[vid][0], atol=1e-5, rtol=0) for x in got)
    assert pool.loads == 1
    assert {k: sorted(v) for k, v in pool.loaded().items()} == {"v1@full": ["v2", "v3"]}

    pool.forget("v2")  # e.g. the version was deleted: its adapter goes, the base stays
    assert pool.loaded() == {"v1@full": ["v3"]}
    with pool.use("v2") as (model, processor):  # loaded again on demand, still on the same base
        assert torch.allclose(next_token_logits(model, processor, image), pooled["v2"][0], atol=1e-5, rtol=0)
    assert pool.loads == 1


def test_qlora_4bit_stage_on_cpu(lineage, coin_dir, tmp_path):
    """bitsandbytes 0.50 runs NF4 on CPU here: the base loads quantized and a QLoRA stage trains and serves."""
    import bitsandbytes as bnb

    home, ckpt = lineage
    model, _ = load_model(ckpt, load_in_4bit=True)
    lm_linears = [m for n, m in model.named_modules() if "language_model.layers" in n and isinstance(m, torch.nn.Linear)]
    assert lm_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in lm_linears)
    kept = [model.lm_head, model.model.multi_modal_projector.linear_1, model.model.vision_tower.encoder.layers[0].mlp.fc1]
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in kept)  # trained / small modules stay full precision

    qhome = tmp_path / "home"
    shutil.copytree(home, qhome, symlinks=True)
    registry = Registry(qhome)
    version = run_stage(StageConfig(data=str(coin_dir / "gqa" / "train"), parent="v1", lora=True, load_in_4bit=True,
                                    max_steps=2, batch_size=8, evaluate_after=False), registry)
    assert version.meta["quant_bits"] == 4 and version.weights == "lora" and version.meta["base_version"] == "v1"
    served, processor = load_version(registry, version.id)  # "auto": loaded 4-bit, as trained
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in served.modules())
    assert torch.isfinite(next_token_logits(served, processor, load_image(an_image(coin_dir)))).all()


def test_8bit_loads_on_cpu(lineage, coin_dir):
    import bitsandbytes as bnb

    _, ckpt = lineage
    model, processor = load_model(ckpt, load_in_8bit=True)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    assert torch.isfinite(next_token_logits(model, processor, load_image(an_image(coin_dir)))).all()


def test_quantization_unavailable_is_one_clear_error(lineage, monkeypatch):
    _, ckpt = lineage
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(QuantizationUnavailable, match="--load-in-4bit needs bitsandbytes"):
        load_model(ckpt, load_in_4bit=True)
    monkeypatch.undo()

    import bitsandbytes as bnb

    def no_kernels(*a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.nn, "Linear8bitLt", no_kernels)
    where = re.escape(default_device())  # the CPU here, cuda:0 on a GPU machine
    with pytest.raises(QuantizationUnavailable, match=rf"cannot run 8-bit layers on {where} \(RuntimeError: no kernel"):
        load_model(ckpt, load_in_8bit=True)


def test_hub_id_resolves_from_the_local_cache(lineage, coin_dir, tmp_path):
    """A hub id in the user's HF cache is registered by id (nothing copied) and loads offline."""
    home, ckpt = lineage
    cache = tmp_path / "hub"
    snapshot = cache / "models--llaca-test--tiny-llava" / "snapshots" / ("0" * 40)
    shutil.copytree(ckpt, snapshot)
    (cache / "models--llaca-test--tiny-llava" / "refs").mkdir()
    (cache / "models--llaca-test--tiny-llava" / "refs" / "main").write_text("0" * 40)
    qhome = tmp_path / "home"
    shutil.copytree(home, qhome, symlinks=True)
    answer = llaca("ask", "--model", "llaca-test/tiny-llava", an_image(coin_dir), QUESTION, home=qhome,
                   HF_HUB_CACHE=str(cache)).stdout.strip()
    registered = [v for v in Registry(qhome).list() if v.meta.get("model_path") == "llaca-test/tiny-llava"]
    assert len(registered) == 1 and registered[0].weights == "external"
    from llaca.serve.chat import answer_once

    assert answer == answer_once(*load_version(Registry(qhome), "base"), str(an_image(coin_dir)), QUESTION,
                                 max_new_tokens=32)


def test_missing_model_is_a_one_line_error(lineage, coin_dir, tmp_path, monkeypatch, capsys):
    home, ckpt = lineage
    before = sorted(p.name for p in (home / "versions").iterdir())
    missing = tmp_path / "no-such-llava"
    proc = llaca("ask", "--model", missing, an_image(coin_dir), QUESTION, home=home, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: model '{missing}' not found: no such folder, and no hub checkpoint of that id in the local Hugging "
        f"Face cache (offline: nothing is downloaded; fetch it once with `huggingface-cli download {missing}` or "
        "pass a folder)"]

    from llaca.cli import main

    def one_line_error(*argv) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    monkeypatch.setenv("LLACA_HOME", str(home))
    monkeypatch.delenv("LLACA_MODEL", raising=False)
    train = str(coin_dir / "gqa" / "train")
    assert "not found" in one_line_error("learn", train, "--model", "llaca-test/not-in-the-cache")
    assert "either --from" in one_line_error("learn", train, "--model", str(ckpt), "--from", "v2")
    assert "add --lora" in one_line_error("learn", train, "--from", "v1", "--load-in-4bit")
    not_llava = tmp_path / "bert"
    not_llava.mkdir()
    (not_llava / "config.json").write_text('{"model_type": "bert"}')
    assert "LLaVA" in one_line_error("register", str(not_llava))
    assert sorted(p.name for p in (home / "versions").iterdir()) == before  # nothing written
