"""The stage's training loss: next-token cross-entropy on the answer tokens, with the LM head run only there.

A LLaVA step spends a large share of its compute in the LM head: on `small` the head (576 x 49,152, tied to the
embeddings) is a fifth of the LM's multiply-adds per token, and its fp32 logits for a batch of 16 x ~100 positions
are 300 MB to write, soft-max and back-propagate. Nine in ten positions (system prompt, image tokens, question) carry
no label, so their logits are computed only to be ignored. transformers' `logits_to_keep` takes a boolean
(batch, sequence) mask and applies the head to those positions alone; the loss below is then exactly the model's
own (`ForCausalLMLoss`: fp32 logits, labels shifted by one, summed and divided by `num_items_in_batch`).
The model is still called as a whole, so peft, DDP and FSDP wrappers see an ordinary forward.
"""
from __future__ import annotations

import torch

IGNORE = -100


def answer_loss(model, batch: dict, n_tokens: torch.Tensor | float) -> torch.Tensor:
    """Summed next-token loss over `batch`'s label tokens / `n_tokens` (the label tokens of the global batch)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE  # position t predicts token t + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits  # (label tokens, vocab), row-major like the mask
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[targets != IGNORE].to(logits.device),
                                             reduction="sum")
    return loss / n_tokens
