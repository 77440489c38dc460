"""Bases: how the embedded bases are built and installed (they train through `llaca.train`, hence above it).

- `install`: the base a fresh machine starts from (`ensure_base`): registered, else installed, else built.
- `tiny` (base v2, the tiny default of the tests) and `tiny_v1`: built from nothing; `publish` registers them.
- `small` installs base v3 on first launch; `small_build` trains what it ships (projector + LoRA).
- `splits`: a base's own test data and the fingerprint that proves it is the one it was scored on.
"""
