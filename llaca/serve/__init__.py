"""Serving: answering people. Reads versions, never writes weights.

- `chat`: one answer, streamed, through the processor's chat template.
- `batching`: concurrent questions share one forward pass.
- `serving`: a pool of loaded models (LoRA versions as adapters on one loaded base).
- `votes`, `convlog`: blind side-by-side votes and the conversation log people teach from.
"""
