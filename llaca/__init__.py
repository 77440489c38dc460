"""LLaCA Studio's library: a tiny real LLaVA, CoIN-mini, the LLaCA update and its baselines, a stage tuner,
a version registry, evaluation and a CLI (`python -m llaca`). Usable without the UI."""
import os

# Never reach for a model hub: everything loads from local folders (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
