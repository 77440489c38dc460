"""Shared fixtures: a real (tiny, briefly trained) base model in a throw-away $LLACA_HOME, and CoIN-mini data.

The quick base is the real build recipe with fewer steps (~15 s); it answers badly but is a genuine
LlavaForConditionalGeneration going through every code path the product uses.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import types
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# The suite runs on the tiny base (seconds per stage); `tests/test_small_base.py` is the smoke test of `small`.
os.environ.setdefault("LLACA_BASE", "tiny")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (pytest.ini): two workers share the cores, so each runs torch (and the apps, workers and launches
    # it starts) on one thread; more threads than cores makes OpenMP spin and slows every process down.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def quick_home(tmp_path_factory) -> Path:
    """A $LLACA_HOME holding a quickly built `base` version (built once per test session)."""
    from llaca.bases.tiny_v1 import build_base
    from llaca.versions import Registry

    home = tmp_path_factory.mktemp("llaca_home")
    build_base(Registry(home), seed=0, vision_steps=30, base_steps=30, n_train=300, n_test=30)
    return home


@pytest.fixture()
def llaca_home(quick_home, tmp_path, monkeypatch) -> Path:
    """A private copy of `quick_home` per test, exported as $LLACA_HOME."""
    home = tmp_path / "home"
    shutil.copytree(quick_home, home, symlinks=True)
    monkeypatch.setenv("LLACA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def coin_dir(tmp_path_factory) -> Path:
    """Small CoIN-mini task folders (train/test each)."""
    from llaca.data import coin_mini

    out = tmp_path_factory.mktemp("coin")
    coin_mini.write_coin_mini(out, seed=0, n_train=48, n_test=12)
    return out


@pytest.fixture()
def make_tiny_fastvlm():
    """Builds a tiny FastVLM, `small`'s container (an EfficientNet tower -> projector -> Llama), the same weights on
    every call (seeded): for tests of what the product does to `small`'s model without its 140M parameters."""
    def build():
        import torch
        from transformers import EfficientNetConfig, FastVlmConfig, FastVlmForConditionalGeneration, LlamaConfig

        torch.manual_seed(0)
        # the head conv makes 1280 x width channels (small: 1280); a 64 px image -> a 2x2 map = 4 image tokens
        # no drop-connect: a learning block in train mode would otherwise mask its output at random, and the tests
        # compare features exactly
        vision = EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320,
                                    drop_connect_rate=0.0)
        vision.hidden_size = 320
        text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
        config = FastVlmConfig(vision_config=vision, text_config=text, image_token_id=63, image_seq_length=4,
                               projector_hidden_act="gelu", vision_feature_select_strategy="full",
                               vision_feature_layer=-1)
        model = FastVlmForConditionalGeneration(config)
        # transformers draws conv weights and BatchNorm scales at std 0.02: through 7 blocks a tiny random tower's map
        # vanishes (~1e-38) and every feature is ~0. He-initialised convs and unit scales keep its activations at
        # their input's scale, a function of the image, as a trained tower's map is.
        for module in model.model.vision_tower.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
        return model
    return build


@pytest.fixture(scope="session")
def chatty_home(quick_home, tmp_path_factory) -> Path:
    """quick_home + 40 seq steps on the base mixture (version 'chatty'), so answers are words, not nothing."""
    from llaca.train.tuner import StageConfig, run_stage
    from llaca.versions import Registry

    home = tmp_path_factory.getbasetemp() / "chatty_home"
    shutil.copytree(quick_home, home)
    run_stage(StageConfig(data=str(home / "datasets" / "base-mixture-seed0" / "base" / "train"), method="seq",
                          parent="base", name="chatty", max_steps=40, lr=3e-3, checkpoint_every=0,
                          evaluate_after=False), Registry(home))
    return home


@contextlib.contextmanager
def served_app(home: Path, start_worker: bool = True):
    """The real app (Blocks + queue + worker supervisor) serving `home` on a free loopback port, closed after.

    `start_worker=False`: no background training (screenshot scripts that only show what `home` holds)."""
    from app import Studio
    from app.main import QUEUE, build_app, launch_options
    from llaca.bench.load import free_port

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLACA_HOME", str(home))
        studio = Studio(home, start_worker=start_worker)
        demo = build_app(studio)
        port = free_port()
        demo.queue(**QUEUE).launch(**launch_options(studio, server_name="127.0.0.1", server_port=port,
                                                    prevent_thread_lock=True, quiet=True))
        try:
            yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}/", studio=studio, home=home, demo=demo)
        finally:
            demo.close()
            studio.close()
