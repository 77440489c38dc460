"""Training: a stage turns a version and an instruction set into a new version.

- `tuner`: the stage loop (one process, DDP or FSDP2 through accelerate), checkpoints, the saved version.
- `rules/`: the update rules, LLaCA's adaptive EMA and its baselines (`seq`, fixed EMA, replay).
- `recipes`: the defaults per base; `corrections`: learning a handful of chat corrections;
  `grouping`: several lineages for unrelated instruction groups, with a router.
"""
