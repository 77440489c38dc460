"""One continual-learning stage as a recipe: parent version + instruction set + update rule -> new version.

Like a torchtune recipe, `StageRecipe` wires small components explicitly (`setup`, `train`, `save`):
the model comes from the registry, data from `data.py`, the update rule from `rules/`, the loop is a plain
PyTorch loop on `accelerate` (so `accelerate launch -m llaca learn ...` runs it unchanged under DDP).

Per optimizer step: forward/backward over the micro-batches of one global batch, `optimizer.step()`, then
`rule.after_step(params)` (LLaCA's adaptive EMA, or fixed EMA), then `zero_grad()`. At the end,
`rule.end_stage(params)` writes the EMA weights into the model, and those are saved as the new version.
Checkpoints (trainable weights, AdamW moments, rule state, schedule, log) go to a run dir keyed by the
stage's inputs, so re-running an interrupted command resumes it.

Several processes (DDP: `accelerate launch --multi_gpu --num_processes N -m llaca learn ...`, gloo on CPU): every
rank takes its share of each global batch, the loss is normalised by the label tokens of the whole global batch
(so N ranks compute the same gradient as one process would), DDP all-reduces the gradients, and the rule then sees
identical gradients and weights on every rank, so alpha and the EMA agree without any extra communication. Only
rank 0 writes checkpoints and the version.

Sharded (FSDP2 through accelerate's FSDP plugin, `fsdp_version: 2`; `accelerate launch --config_file
configs/accelerate/fsdp_cpu.yaml -m llaca learn ...`; docs/sharded-training.md): the same data split and loss, but
every parameter, gradient, AdamW moment and the rule's own state (EMA, previous gradient) is a 1/N shard per rank.
The rule reads each rank's shards; LLaCA's per-tensor L1 norms a, b, c are shard sums made whole by ONE all-reduce per
step for all tensors (rules/llaca.py), so alpha is the same number on every rank, and the EMA update, elementwise,
needs no communication. The rule still runs after `optimizer.step()` and before `zero_grad()`, on the gradients the
step used (FSDP2 leaves reduce-scattered gradient shards in `p.grad`; nothing zeroes them before `zero_grad`).
Checkpoints are sharded (each rank writes its own shards); the version is gathered into one safetensors model.
DeepSpeed is refused (`make_accelerator` says why).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import data as D
from ..data.augment import jitter_framing
from ..paths import atomic_dir
from ..versions import Registry, Version, base_of, load_base
from .loss import answer_loss
from .rules import make_rule
from .rules.base import local
from .tower_memo import memoized_frozen_tower

PROJECTOR = "multi_modal_projector"
MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # StageConfig.mixed_precision
MIXED_PRECISIONS = ("auto", "no", *MIXED_DTYPES)


def native_bf16(device_type: str | None = None) -> bool:
    """Whether this machine runs bf16 matmuls natively: a CUDA GPU that supports bf16, or a CPU with AVX512-BF16/AMX
    (oneDNN's check). An AVX2-only CPU emulates bf16: a 512x576 @ 576x1536 matmul took 770 ms against 13 ms in fp32
    on a 2-core AMD EPYC runner (`bench_results/small/stage.json`), so autocasting there makes a step ~30x slower, not 2x faster."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_mixed_precision(value: str | None, device_type: str | None = None) -> str | None:
    """'auto' -> 'bf16' where it is native (`native_bf16`), else None (fp32); 'no' -> None; others as given."""
    if value not in (None, *MIXED_PRECISIONS):
        raise ValueError(f"mixed_precision: {value!r}, expected one of {', '.join(MIXED_PRECISIONS)}")
    if value == "auto":
        return "bf16" if native_bf16(device_type) else None
    return None if value == "no" else value


# A Llama's Linear layers (attention + MLP); inside a LLaVA they are the language model's.
LM_LINEARS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
LM_LINEAR_LAYERS = rf".*language_model.*\.({LM_LINEARS})"


VISION_LINEAR_LAYERS = r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
# EfficientNet's 1x1 convolutions (a Linear per pixel): LoRA's targets in its blocks. The depthwise 3x3/5x5 convs and
# the squeeze-excite convs (pinned open in Lite, llaca.models.vision) are left alone.
EFFICIENTNET_POINTWISE = r"\.(expansion\.expand_conv|projection\.project_conv)"


def vision_block_pattern(model, n: int, lora: bool = False) -> str:
    """Regex (`re.match` from the start of a module or parameter name) of the tower's last `n` blocks whose output
    LLaVA reads; with `lora`, of the layers in them that get LoRA adapters.

    A ViT (LLaVA): LLaVA reads hidden state `vision_feature_layer` (-1 here, -2 in llava-1.5), so blocks after it
    never reach the LM and "the last n" counts back from that one. An EfficientNet (FastVLM, `small`): the LM reads
    the last hidden state, the head 1x1 conv (`top_conv`) over the last MBConv block, so the last n blocks plus that
    head conv.
    """
    vision = model.config.vision_config
    efficientnet = vision.model_type == "efficientnet"
    if efficientnet:
        used = len(model.model.vision_tower.encoder.blocks)
    else:
        cfg = model.config
        feature = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else max(cfg.vision_feature_layer)
        used = vision.num_hidden_layers + 1 + feature if feature < 0 else feature  # hidden_states[0]: the embeddings
    if not 0 < n <= used:
        raise ValueError(f"vision_blocks={n}: the tower has {used} blocks that feed the language model (1..{used})")
    index = "|".join(str(i) for i in range(used - n, used))
    if efficientnet:
        parts = [rf"blocks\.({index}){EFFICIENTNET_POINTWISE}", r"top_conv"] if lora else \
            [rf"blocks\.({index})\.", r"top_conv\.", r"top_bn\."]
    else:
        parts = [rf"layers\.({index}){VISION_LINEAR_LAYERS}" if lora else rf"layers\.({index})\."]
    return r".*vision_tower\..*encoder\.(" + "|".join(parts) + ")"


class StageCancelled(RuntimeError):
    pass


# What `learn` and the Learn tab start from (docs/method.md "The default recipe"; `python -m llaca.bench quality` and
# `demo`): the paper's adaptive EMA over a stage that also replays 20% of earlier records, at lr 3e-4. On this model
# the rule alone forgets about as much as `seq` (quality bench from base v2: 78.4 vs 86.9 at 1e-3); with the replay
# at 3e-4 it forgets 3.7 (3 seeds). StageConfig's own defaults stay the faithful rule alone, which the benchmarks
# measure under the name `llaca`.
# Five passes, not the faithful rule's three: at 3e-4 a stage on images of a new kind was still learning after three
# (held-out digits 83.0 -> 91.7%, Tux Paint 46.0 -> 49.4%, 3 seeds, base skills kept the same).
DEFAULT_RECIPE = {"method": "llaca", "lr": 3e-4, "replay_fraction": 0.2, "epochs": 5.0}


@dataclasses.dataclass
class StageConfig:
    data: str
    method: str = "llaca"
    parent: str | None = None  # None: the newest version
    name: str | None = None
    epochs: float = 3.0  # CoIN-mini stages need ~250 steps (1500 records, batch 16) to plateau
    max_steps: int | None = None  # overrides epochs
    # A small set gets more passes: the stage trains on at least this many of its records in all (`small`'s recipe:
    # 2,000, so a 493-record set takes 4.06 epochs and a larger one `epochs`). 0: off.
    min_records: int = 0
    lr: float = 1e-3
    projector_lr: float | None = None  # LLaVA's mm_projector_lr: the projector's own lr (None: `lr`)
    # LP-FT (Kumar et al., 2022, "Fine-tuning can distort pretrained features"): the first fraction of the steps trains
    # only the projector, like a probe between the frozen tower and the frozen LM; the rest trains everything, with
    # its own warm-up and cosine. 0: everything from the first step.
    projector_first: float = 0.0
    batch_size: int = 16  # global batch per optimizer step
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    load_in_4bit: bool = False  # QLoRA: the frozen base in NF4 (bitsandbytes); a QLoRA parent's setting is inherited
    load_in_8bit: bool = False
    # "bf16": the forward under torch.autocast (weights, gradients, AdamW state and the rule stay fp32), as
    # `accelerate launch --mixed_precision bf16` does; ~2x a step of `small` on CPU. Per stage, not per process:
    # accelerate fixes its own setting once per process. None: as launched (fp32 unless accelerate says otherwise).
    # "auto" (the recipes of `small`): bf16 only where the hardware runs it natively (`native_bf16`), resolved when
    # the config is made, so the run key and the version's hparams say what actually ran.
    mixed_precision: str | None = None
    train_vision: bool = False
    vision_blocks: int = 0  # the tower's last N blocks that feed LLaVA's features learn (full weights or, --lora, LoRA)
    rule_hparams: dict = dataclasses.field(default_factory=dict)
    replay_fraction: float = 0.0  # any rule but `replay`: mix in this fraction of earlier records (as ReplayRule does)
    # Frame each training image a little differently on every pass: zoom by up to this fraction of its sides and
    # shift (llaca.data.augment). 0: the images as they are.
    image_jitter: float = 0.0
    checkpoint_every: int = 50
    evaluate_after: bool = True
    eval_limit: int | None = None
    trace_dir: str | None = None  # every rank appends its per-tensor alpha per step to <dir>/rank<k>.jsonl

    def __post_init__(self):
        self.mixed_precision = resolve_mixed_precision(self.mixed_precision)
        if not 0 <= self.projector_first < 1:
            raise ValueError(f"projector_first={self.projector_first}: a fraction of the stage's steps, from 0 (off) to "
                             "under 1")
        if not 0 <= self.image_jitter < 1:
            raise ValueError(f"image_jitter={self.image_jitter}: a fraction of the image's sides, from 0 (off) to under 1")

    def hparams(self) -> dict:
        keep = ("epochs", "max_steps", "lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
                "max_grad_norm", "seed", "lora", "train_vision")
        out = {k: getattr(self, k) for k in keep}
        if self.projector_lr is not None:  # only when set: run keys of existing stages are unchanged
            out["projector_lr"] = self.projector_lr
        if self.projector_first:  # only when set, like projector_lr
            out["projector_first"] = self.projector_first
        if self.min_records:  # only when set, like replay_fraction
            out["min_records"] = self.min_records
        if self.vision_blocks:  # only when set, like replay_fraction
            out["vision_blocks"] = self.vision_blocks
        if self.replay_fraction:  # only when set: run keys of existing stages are unchanged
            out["replay_fraction"] = self.replay_fraction
        if self.image_jitter:  # only when set, like replay_fraction
            out["image_jitter"] = self.image_jitter
        if self.lora:
            out.update(lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)
        if self.load_in_4bit or self.load_in_8bit:
            out.update(load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit)
        if self.mixed_precision:
            out["mixed_precision"] = self.mixed_precision
        return out


def test_split_for(data_path: str | Path) -> Path | None:
    """CoIN-style layout: `<task>/train` is tested on its sibling `<task>/test`."""
    p = Path(data_path)
    if p.name == "train" and (p.parent / "test").is_dir():
        return p.parent / "test"
    return None


class StageRecipe:
    def __init__(self, config: StageConfig, registry: Registry | None = None, on_event=None, should_stop=None):
        self.cfg = config
        self.registry = registry or Registry()
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.accelerator = make_accelerator()
        set_seed(cfg.seed)
        self.parent = self.registry.get(cfg.parent)
        model, self.processor = self._load_parent()
        self.rule = make_rule(cfg.method, **cfg.rule_hparams)
        self.dataset = D.load_instruction_set(cfg.data, processor=self.processor)  # incl. the token limit
        records = self.dataset.records
        if cfg.method == "replay":
            records = self.rule.mix(records, self._replay_pool(), seed=cfg.seed)
        elif cfg.replay_fraction:  # e.g. llaca over a stage that also replays what the registry holds
            from .rules import ReplayRule

            records = ReplayRule(cfg.replay_fraction).mix(records, self._replay_pool(), seed=cfg.seed)
        self.train_records = records
        self.model = self._make_trainable(model)
        self.params = self._trainable(self.model.named_parameters())
        self.encoder = D.RecordEncoder(self.processor, max_tokens=None)
        world = self.accelerator.num_processes
        if cfg.batch_size % (cfg.grad_accum * world):
            raise ValueError(f"batch size {cfg.batch_size} must divide by grad_accum*processes = {cfg.grad_accum * world}")
        self.total_steps = cfg.max_steps or max(1, math.ceil(self._epochs() * self._steps_per_epoch()))
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = self._schedule()
        self.sharded = is_sharded(self.accelerator)
        if self.sharded:
            self._shard()
        else:
            self.model = self.accelerator.prepare(self.model)
        self._check_rule_sees_model_params()
        self.input_dtype = getattr(self.accelerator.unwrap_model(self.model), "dtype", torch.float32)
        self.run_dir = self.registry.home / "runs" / self._run_key()
        self.step, self.log = 0, []
        self.rule.start_stage(self.params)
        self._maybe_resume()

    def _load_parent(self):
        """The parent's weights, ready to train: base (quantized for QLoRA, then prepared) + the parent's adapter."""
        from ..models.llava import quant_bits

        cfg, parent = self.cfg, self.parent
        bits = quant_bits(cfg.load_in_4bit, cfg.load_in_8bit) or parent.meta.get("quant_bits")
        if bits and not (cfg.lora or parent.weights == "lora"):
            raise ValueError(f"{bits}-bit weights cannot be trained directly: add --lora (QLoRA trains adapters on them)")
        self.bits = bits
        model, processor = load_base(base_of(self.registry, parent), bits=bits)
        if bits:
            from peft import prepare_model_for_kbit_training

            # Freezes the base, upcasts the non-quantized weights to fp32, and checkpoints activations (QLoRA's recipe).
            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        if parent.weights == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, parent.path / "adapter", is_trainable=True)
        return model, processor

    def _trainable(self, named) -> dict:
        """Trainable parameters by name; with its own group (projector_lr, projector_first) the projector's come last,
        so that the optimizer's state indices (one param group after the other) follow this dict's order in
        checkpoints."""
        params = {n: p for n, p in named if p.requires_grad}
        if not self._own_projector_group():
            return params
        return {**{n: p for n, p in params.items() if PROJECTOR not in n},
                **{n: p for n, p in params.items() if PROJECTOR in n}}

    def _own_projector_group(self) -> bool:
        return self.cfg.projector_lr is not None or self.cfg.projector_first > 0

    def _param_groups(self) -> list:
        """AdamW's groups: everything at `lr`, and the projector at `projector_lr` when set (LLaVA's LoRA scripts
        train the projector at 2e-5 beside LoRA at 2e-4) or on its own schedule (`projector_first`). The cosine
        schedule scales each group's own lr."""
        if not self._own_projector_group():
            return list(self.params.values())
        groups = [{"params": [p for n, p in self.params.items() if PROJECTOR not in n]},
                  {"params": [p for n, p in self.params.items() if PROJECTOR in n],
                   "lr": self.cfg.lr if self.cfg.projector_lr is None else self.cfg.projector_lr}]
        return [g for g in groups if g["params"]]

    def _schedule(self):
        """Cosine with warm-up over the stage; with `projector_first`, the non-projector group waits at lr 0 for that
        share of the steps and then runs its own warm-up and cosine over the rest."""
        from transformers import get_cosine_schedule_with_warmup

        cfg, total = self.cfg, self.total_steps
        whole = get_cosine_schedule_with_warmup(self.optimizer, math.ceil(cfg.warmup_ratio * total), total)
        if not cfg.projector_first or len(self.optimizer.param_groups) < 2:
            return whole
        wait = min(total - 1, math.ceil(cfg.projector_first * total))
        rest = total - wait
        warm = max(1, math.ceil(cfg.warmup_ratio * rest))

        def after_the_wait(step: int) -> float:
            if step < wait:
                return 0.0
            if step - wait < warm:
                return (step - wait + 1) / (warm + 1)
            progress = (step - wait - warm) / max(1, rest - warm)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, [after_the_wait, whole.lr_lambdas[0]])

    def _shard(self) -> None:
        """FSDP2 via accelerate: shard the model (each parameter becomes a DTensor) and hand the rule the new params.

        FSDP2 replaces the Parameter objects, so `self.params` is rebuilt from the sharded model (same names; accelerate
        re-points the optimizer at them, which is why it must get the model and the optimizer together). LLaCA's L1
        shard sums are then summed across ranks by one all-reduce per step (`rule.all_reduce`).
        """
        if self.bits:
            raise ValueError(f"{self.bits}-bit QLoRA is not supported with FSDP here: the frozen quantized base is "
                             "small (a 7B base is ~4 GB in 4-bit), so launch it with DDP (configs/accelerate/ddp_gpu.yaml)")
        narrow_wrap_policy(self.accelerator.state.fsdp_plugin, self.model)
        acc = self.accelerator
        self.model, _ = acc.prepare(self.model, self.optimizer)  # the raw optimizer's params are swapped
        pin_fsdp(acc)
        self.params = self._trainable(acc.unwrap_model(self.model).named_parameters())
        if hasattr(self.rule, "all_reduce"):
            self.rule.all_reduce = all_reduce_sum

    def _check_rule_sees_model_params(self) -> None:
        """The rule updates the Parameter objects it was given: they must be the ones the wrapped model trains."""
        live = {id(p) for p in self.accelerator.unwrap_model(self.model).parameters()}
        if any(id(p) not in live for p in self.params.values()):
            raise RuntimeError("the distributed wrapper replaced the trainable parameters; the update rule would track "
                               "stale copies")

    def _make_trainable(self, model):
        cfg = self.cfg
        if cfg.train_vision and cfg.vision_blocks:
            raise ValueError("train_vision trains the whole tower; vision_blocks its last blocks only: choose one")
        if cfg.lora or getattr(model, "peft_config", None):
            return self._make_lora(model)
        last = re.compile(vision_block_pattern(model, cfg.vision_blocks)) if cfg.vision_blocks else None
        for name, p in model.named_parameters():
            p.requires_grad = cfg.train_vision or "vision_tower" not in name or bool(last and last.match(name))
        return model

    def _make_lora(self, model):
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):  # continue the parent's adapter (one adapter across stages, as LLaCA)
            for name, p in model.named_parameters():
                p.requires_grad = "lora_" in name or "modules_to_save" in name
            return model
        for p in model.parameters():
            p.requires_grad = False
        targets = LM_LINEAR_LAYERS
        if self.cfg.vision_blocks:  # LoRA also on the tower's last blocks (as LLaVA variants that adapt the tower)
            targets += "|" + vision_block_pattern(model, self.cfg.vision_blocks, lora=True)
        config = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                            target_modules=targets, modules_to_save=["multi_modal_projector"])
        return get_peft_model(model, config)

    def _replay_pool(self) -> list[D.Record]:
        pool = []
        for v in self.registry.lineage(self.parent.id):
            if (v.path / "replay" / "data.json").is_file():
                pool += D.load_instruction_set(v.path / "replay").records
        return pool

    def _run_key(self) -> str:
        key = json.dumps({"parent": self.parent.id, "data": self.dataset.sha256, "method": self.cfg.method,
                          "rule": self.rule.hparams(), "hp": self.cfg.hparams(),
                          "world": self.accelerator.num_processes}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ data order
    def _epochs(self) -> float:
        return passes_over(len(self.dataset.records), self.cfg.epochs, self.cfg.min_records)

    def _steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train_records), self.cfg.batch_size, self.accelerator.num_processes)

    def _batches_for_step(self, step: int) -> list[list[int]]:
        """This rank's micro-batches for optimizer step `step` (a pure function of seed and step -> resumable).

        The global batch is the same for any number of processes; rank r takes records r, r+N, ... of it (a partial
        last batch is trimmed to a multiple of N so that every rank runs the same number of micro-batches: DDP
        all-reduces once per backward and would hang otherwise), then splits its share into grad_accum pieces.
        """
        n, bs = len(self.train_records), self.cfg.batch_size
        epoch, k = divmod(step, self._steps_per_epoch())
        order = list(range(n))
        random.Random(self.cfg.seed * 100_003 + epoch).shuffle(order)
        global_batch = order[k * bs:(k + 1) * bs]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        share = global_batch[:len(global_batch) - len(global_batch) % world][rank::world]
        micro = math.ceil(len(share) / self.cfg.grad_accum)
        return [share[i:i + micro] for i in range(0, len(share), micro)]

    def _encode(self, idx: list[int]) -> dict:
        batch = D.collate([self._encode_record(j) for j in idx], self.processor.tokenizer.pad_token_id)
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.input_dtype)
        return batch

    def _encode_record(self, j: int) -> dict:
        """Record j of the stage, its image framed afresh for this step when `image_jitter` is set (a pure function
        of seed, step and record: a resumed stage sees the same images)."""
        record = self.train_records[j]
        if not self.cfg.image_jitter:
            return self.encoder.encode(record)
        rng = random.Random(f"{self.cfg.seed}:{self.step}:{j}")
        image = jitter_framing(D.load_image(record.image), rng, self.cfg.image_jitter)
        return self.encoder.encode(record, image=image)

    def _global_label_tokens(self, batches: list[dict]) -> torch.Tensor:
        """Label tokens (after the causal shift) of the whole global batch, summed over all processes."""
        mine = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = self.accelerator.reduce(torch.tensor(float(mine), device=self.accelerator.device), reduction="sum")
        return total.clamp(min=1.0)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        keep_frozen_in_eval(self.model)
        self.on_event({"type": "start", "total_steps": self.total_steps, "step": self.step,
                       "n_records": len(self.train_records), "resumed": self.step > 0})
        model = acc.unwrap_model(self.model)
        dtype = MIXED_DTYPES.get(cfg.mixed_precision)
        single = acc.num_processes == 1
        with training_attention(model, acc.device.type, cfg.mixed_precision), \
                frozen_linears_cast(model, dtype, single_process=single), \
                memoized_frozen_tower(model, enabled=single and acc.device.type == "cpu" and not cfg.image_jitter):
            self._train_steps()
        self.rule.end_stage(self.params)
        if self.cfg.trace_dir:  # (full() gathers the shards: every rank takes part)
            self._trace({"final_sums": {n: full(p.detach()).double().sum().item() for n, p in self.params.items()}})

    def _train_steps(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        start, start_step = time.time(), self.step
        while self.step < self.total_steps:
            if self.should_stop():
                self.save_checkpoint()
                raise StageCancelled(f"stage cancelled at step {self.step}/{self.total_steps}")
            batches = [self._encode(idx) for idx in self._batches_for_step(self.step)]
            n_tokens = self._global_label_tokens(batches)
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                with ctx:
                    # Summed token losses / tokens of the GLOBAL batch: a token-mean over the global batch, however it
                    # is split into micro-batches and ranks. Times N because DDP (and FSDP's reduce-scatter) averages
                    # the N ranks' gradients.
                    with self._autocast():
                        loss = answer_loss(self.model, batch, n_tokens) * acc.num_processes
                    acc.backward(loss)
                loss_sum += loss.item()
            grads = [local(p.grad) for p in self.params.values() if p.grad is not None]
            clip = 1.0
            if cfg.max_grad_norm:
                norm = float(full(acc.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)))
                clip = min(1.0, cfg.max_grad_norm / (norm + 1e-6))  # the factor clip_grad_norm_ applied
            self.optimizer.step()
            if clip < 1.0:  # LLaCA's alpha is defined on the unclipped gradient (docs/llaca.md)
                torch._foreach_div_(grads, clip)
            stats = self.rule.after_step(self.params) or {}
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss_avg = acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="mean").item()
            entry = {"step": self.step, "loss": round(loss_avg, 5), "lr": self.scheduler.get_last_lr()[0], **stats}
            self.log.append(entry)
            self._trace({"step": self.step, "loss": loss_avg, "alpha": getattr(self.rule, "last_alpha", None),
                         "dist": getattr(self.rule, "last_dist", None)})
            elapsed = time.time() - start
            rate = (self.step - start_step) / max(elapsed, 1e-9)
            self.on_event({"type": "step", **entry, "total_steps": self.total_steps,
                           "elapsed": elapsed, "eta": (self.total_steps - self.step) / max(rate, 1e-9)})
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()

    def _autocast(self):
        """bf16 autocast for this stage's forward when asked (`mixed_precision`), else nothing."""
        if self.cfg.mixed_precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=MIXED_DTYPES[self.cfg.mixed_precision])

    def _trace(self, entry: dict) -> None:
        """Per-rank record (debugging distributed runs: every rank must compute the same alpha and weights)."""
        if not self.cfg.trace_dir:
            return
        path = Path(self.cfg.trace_dir) / f"rank{self.accelerator.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Trainable weights, AdamW moments, rule state, schedule and log, atomically.

        Unsharded: rank 0 writes them (every rank holds the same). Sharded: every rank writes its own shards
        (`shard-<rank>.*.safetensors`) into one temp folder, and rank 0 renames it into place once all have written,
        so a killed run leaves either the previous checkpoint or this one, whole.
        """
        acc = self.accelerator
        if not (self.sharded or acc.is_main_process):
            return
        final = self.run_dir / "checkpoint"
        if not self.sharded:
            with atomic_dir(final) as tmp:
                self._write_shard(tmp, prefix="")
                self._write_state_json(tmp)
        else:
            tmp = self.run_dir / f".checkpoint.tmp-{self.step}"
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            self._write_shard(tmp, prefix=f"shard-{acc.process_index}.")
            acc.wait_for_everyone()
            if acc.is_main_process:
                self._write_state_json(tmp)
                with atomic_dir(final) as swap:  # rename the complete folder into place, replacing the old one
                    swap.rmdir()
                    os.replace(tmp, swap)
            acc.wait_for_everyone()
        self.on_event({"type": "checkpoint", "step": self.step})

    def _write_shard(self, folder: Path, prefix: str) -> None:
        """This rank's trainable weights, optimizer state and rule state (its local shards when sharded)."""
        opt_state = {}
        names = list(self.params)
        for idx, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                opt_state[f"{names[idx]}::{key}"] = local(torch.as_tensor(value)).clone()
        save_file({n: local(p.detach()).clone() for n, p in self.params.items()},
                  str(folder / f"{prefix}trainable.safetensors"))
        save_file(opt_state, str(folder / f"{prefix}optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in self.rule.state_dict().items()} or {"_": torch.zeros(0)},
                  str(folder / f"{prefix}rule.safetensors"))

    def _write_state_json(self, folder: Path) -> None:
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        (folder / "state.json").write_text(json.dumps({"step": self.step, "scheduler": sched, "log": self.log,
                                                       "processes": self.accelerator.num_processes,
                                                       "sharded": self.sharded}))

    def _maybe_resume(self) -> None:
        ckpt = self.run_dir / "checkpoint"
        if not (ckpt / "state.json").is_file():
            return
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("sharded", False) != self.sharded:  # (the run key holds the number of processes, not the kind)
            raise RuntimeError(f"{ckpt} was written by a {'sharded' if state.get('sharded') else 'DDP'} run; resume it "
                               f"with the same launch configuration, or delete it to start the stage again")
        prefix = f"shard-{self.accelerator.process_index}." if self.sharded else ""
        trainable = load_file(str(ckpt / f"{prefix}trainable.safetensors"))
        with torch.no_grad():
            for n, p in self.params.items():
                local(p).copy_(trainable[n])
        opt_flat = load_file(str(ckpt / f"{prefix}optimizer.safetensors"))
        names = list(self.params)
        opt_state = {}
        for key, value in opt_flat.items():
            name, field = key.split("::")
            opt_state.setdefault(names.index(name), {})[field] = like_param(value, self.params[name])
        sd = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": sd["param_groups"]})
        rule_state = {k: v for k, v in load_file(str(ckpt / f"{prefix}rule.safetensors")).items() if k != "_"}
        self.rule.load_state_dict(rule_state)
        # LambdaLR state needs its lambda slots back (functions are not saved).
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.step, self.log = state["step"], state["log"]

    # ------------------------------------------------------------------ save + evaluate
    def _unshard(self) -> None:
        """Sharded: gather the stage's weights into an ordinary (unsharded) model on rank 0, which then saves and
        evaluates it exactly as an unsharded run does: one consolidated safetensors model (or adapter) per version.

        Every rank takes part in the gather (torch's full state dict, as accelerate's `get_state_dict` makes it under
        FSDP2: received by rank 0, on CPU); rank 0 rebuilds the parent's model (+ the same LoRA wrapping) and loads
        it, strictly. A sharded model could not serve rank 0 alone anyway: each forward gathers from every rank.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.accelerator.is_main_process:
            return
        model, _ = self._load_parent()
        model = self._make_trainable(model)
        model.load_state_dict(full_state, strict=True)
        self.model = model.to(self.accelerator.device)

    def save(self) -> Version | None:
        """Write the new version (main process only); returns it, or None on other ranks."""
        acc = self.accelerator
        if self.sharded:
            self._unshard()
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        cfg = self.cfg
        model = acc.unwrap_model(self.model)
        is_lora = bool(getattr(model, "peft_config", None))
        test_path = test_split_for(cfg.data)
        meta = {
            "name": cfg.name,
            "parent": self.parent.id,
            "weights": "lora" if is_lora else "full",
            "base_version": (self.parent.meta.get("base_version") or self.parent.id) if is_lora else None,
            "stage": {"name": self.dataset.name, "sha256": self.dataset.sha256, "path": str(Path(cfg.data).resolve()),
                      "n_records": len(self.dataset), "test_path": str(test_path.resolve()) if test_path else None},
            "method": cfg.method,
            "rule": self.rule.hparams(),
            "hparams": cfg.hparams(),
            "steps": self.total_steps,
            "processes": acc.num_processes,
            "quant_bits": self.bits,
            "metrics": {},
        }
        replay_n = getattr(self.rule, "buffer_per_stage", 200)

        def write(tmp: Path):
            model.eval()
            if is_lora:
                model.save_pretrained(tmp / "adapter")
            else:
                from ..models.llava import save_pretrained

                save_pretrained(model, self.processor, tmp / "model")
            sample = random.Random(cfg.seed).sample(self.dataset.records, min(replay_n, len(self.dataset)))
            D.write_instruction_set(tmp / "replay", sample)
            (tmp / "train_log.json").write_text(json.dumps(self.log))

        version = self.registry.create(meta, write)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.on_event({"type": "saved", "version": version.id})
        return version

    def evaluate_lineage(self, version: Version) -> dict:
        """Accuracy of the new version on its own test split and every earlier stage's (a row of A)."""
        from ..evaluation.evaluate import evaluate

        tests = []
        for v in self.registry.lineage(version.id):
            tp = v.meta.get("stage", {}).get("test_path")
            if tp and Path(tp).is_dir() and tp not in [t for _, t in tests]:
                tests.append((v.meta["stage"]["name"], tp))
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        results = {}
        for name, tp in tests:
            ts = D.load_instruction_set(tp)
            r = evaluate(model, self.processor, ts, limit=self.cfg.eval_limit)
            results[ts.name] = {"accuracy": round(r.accuracy, 2), "n": r.n}
            self.on_event({"type": "eval", "dataset": ts.name, "accuracy": r.accuracy})
        if results:
            self.registry.record_metrics(version.id, {"test": results})
        return results


DEEPSPEED_REFUSAL = (
    "DeepSpeed is not supported by the stage loop: its engine steps the optimizer and zeroes the gradients inside "
    "`accelerator.backward`, before LLaCA can read them (the authors' released pipeline ran a fixed beta = 0.99 "
    "for that reason, docs/llaca.md), and ZeRO keeps gradients in flat partitions whose per-tensor L1 sums it does not "
    "expose. Shard with FSDP2 instead: accelerate launch --config_file configs/accelerate/fsdp_gpu.yaml (or "
    "fsdp_offload_gpu.yaml) -m llaca learn ... (docs/sharded-training.md)")


def passes_over(n_records: int, epochs: float, min_records: int = 0) -> float:
    """`epochs`, or more passes where the set is smaller than `min_records` (its own records, before replay)."""
    return max(epochs, min_records / max(1, n_records))


def steps_per_epoch(n_train_records: int, batch_size: int, processes: int = 1) -> int:
    """Full batches of the stage's records (with replay), plus the last partial one if every process gets at least
    one record of it."""
    full, rest = divmod(n_train_records, batch_size)
    return full + (rest >= processes)


def keep_frozen_in_eval(model) -> None:
    """Keep what does not learn in eval mode while the rest trains.

    `model.train()` puts frozen modules in training mode too:
    - a frozen vision tower would run its dropout. `small`'s EfficientNet drops whole residual branches (drop-connect,
      up to 0.2 in its last blocks): the LM would learn from features it never sees when it answers (and never saw
      while the base was built: the build caches the tower's eval features), and each step would pay for the masks;
    - a tower that learns its last blocks would still run the drop-connect of every block (its dropout modules hold
      no parameters), so every part of a tower with nothing to learn stays in eval mode;
    - BatchNorm layers would re-estimate their running mean and variance from every stage's batches of 2-16 images:
      the frozen base would drift, and with several processes each on its own share of the batch (FSDP does not
      synchronise buffers; rank 0's would be saved). All BatchNorms stay in eval mode, as a CNN fine-tuned at small
      batches keeps its statistics; the affine weights of a learning block still learn.
    """
    for name, module in model.named_modules():
        batch_norm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        # only the tower's modules are asked whether they learn: the LM's hundreds are never put in eval here
        if batch_norm or ("vision_tower" in name.split(".") and not any(p.requires_grad for p in module.parameters())):
            module.eval()


@contextlib.contextmanager
def training_attention(model, device_type: str, mixed_precision: str | None):
    """Train the language model with transformers' eager attention where that is faster: bf16 on CPU.

    PyTorch's CPU flash-attention backward is slow in bf16 for short sequences; eager attention's matmuls and fp32
    soft-max are not: a step of `small`'s stage (batches of 2, ~90 tokens) 0.730 -> 0.675 s, its backward 0.357 ->
    0.302 s (2 threads, side by side; `experiments/stage_step_profile.py`). In fp32 sdpa is the faster one and stays.
    The same attention either way (one batch's loss 4.865 vs 4.841 in bf16); the model's own setting (sdpa, for
    serving) is put back afterwards.
    """
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    if device_type != "cpu" or mixed_precision != "bf16" or text is None or text._attn_implementation != "sdpa":
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        base.set_attn_implementation({"text_config": "sdpa"})


@contextlib.contextmanager
def frozen_linears_cast(model, dtype: torch.dtype | None, single_process: bool = True):
    """Hold every frozen fp32 Linear weight (the LoRA base layers, the LM head) as a `dtype` copy while the stage runs.

    Autocast casts each fp32 weight to bf16 on every forward (frozen weights are not in its cache): 134M values of
    `small` read, converted and written per step. Casting them once gives the same products bit for bit (autocast
    would cast them the same way; one batch's loss identical) and a step of `small` 0.675 -> 0.631 s (2 threads, side
    by side; `experiments/stage_step_profile.py`). The fp32 weights are kept and put back afterwards (a tied head is
    tied again): the saved adapter, the evaluation and serving see the model as it was. Off for quantized layers (not
    fp32) and under several processes (FSDP's parameters are DTensors; DDP untested with it).
    """
    if dtype is None or not single_process:
        yield
        return
    originals = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and not weight.requires_grad \
                and weight.dtype == torch.float32:
            originals.append((module, weight))
            module.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for module, weight in originals:
            module.weight = weight


def make_accelerator():
    """An Accelerator that matches how the process was launched, or a clear error.

    Several processes on a machine without CUDA: accelerate only picks gloo DDP when told `cpu=True`; without it
    every rank would train alone and each would write its own version. With `cpu=True` it also drops an FSDP plugin
    (it sets FSDP up for accelerators only) and DeepSpeed, silently: FSDP2 itself runs on CPU over gloo, so an FSDP
    launch is switched back to FSDP (`_fsdp_on_cpu`), and DeepSpeed is refused before anything is set up.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError(DEEPSPEED_REFUSAL)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = world > 1 and not torch.cuda.is_available()
    acc = Accelerator(cpu=on_cpu)
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(acc)
    if acc.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate set up {acc.num_processes}")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(DEEPSPEED_REFUSAL)
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ValueError("FSDP version 1 is not supported by the stage loop (its flat parameters hide the per-tensor "
                         "shards the update rule reads): set `fsdp_version: 2` in the accelerate config "
                         "(configs/accelerate/fsdp_gpu.yaml)")
    if acc.distributed_type == DistributedType.MEGATRON_LM:
        raise ValueError("Megatron-LM is not supported by the stage loop; use DDP or FSDP2 (docs/sharded-training.md)")
    return acc


def _fsdp_on_cpu(acc) -> None:
    """Turn the gloo DDP state accelerate made on CPU into the FSDP2 state the launch asked for.

    accelerate builds the FSDP plugin from the `FSDP_*` variables `accelerate launch` exports but keeps it only on
    accelerators; on CPU it sets up MULTI_CPU. The process group (gloo) is what FSDP2 needs on CPU, so setting the
    distributed type and the plugin is all that differs: `prepare` then shards with `fully_shard` as on GPUs.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment, as Accelerator() would on a GPU
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU needs `fsdp_version: 2` in the accelerate config "
                         "(configs/accelerate/fsdp_cpu.yaml)")
    acc.state.fsdp_plugin = plugin
    pin_fsdp(acc)


def pin_fsdp(acc) -> None:
    """Set (again) accelerate's distributed type to FSDP.

    Each `AcceleratorState()` made after the Accelerator (accelerate makes one per prepared optimizer) copies the
    process-level type (MULTI_CPU on CPU, MULTI_GPU on GPUs) over it, and accelerate's FSDP2 paths (`no_sync`,
    `clip_grad_norm_`) are chosen by it. The stage loop keeps its own `sharded` flag and gathers the weights with torch.
    """
    from accelerate.utils import DistributedType

    acc.state.distributed_type = DistributedType.FSDP


def narrow_wrap_policy(plugin, model) -> None:
    """Wrap only the `_no_split_modules` classes the model holds (unless the config names its own).

    accelerate's TRANSFORMER_BASED_WRAP shards each listed block as its own unit, and stops if a listed class is not
    in the model: LLaVA inherits CLIP's list, text-side classes (CLIPTextEmbeddings) included, while it holds the
    vision tower only. That would stop every LLaVA, llava-1.5-7b as well as the tiny base.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        names = getattr(model, "_no_split_modules", None) or []
        plugin.transformer_cls_names_to_wrap = [n for n in names if get_module_class_from_name(model, n) is not None]


def is_sharded(acc) -> bool:
    """True under FSDP2: parameters, gradients and optimizer state are per-rank shards (DTensors)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place (LLaCA's shard sums: one call per step for all tensors)."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def full(t):
    """The whole tensor: a DTensor's shards gathered from every rank (a collective), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved local optimizer-state shard back as the DTensor AdamW expects for a sharded param (moments are sharded
    like the param; the step counter is a plain scalar)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor) and value.dim() > 0:
        return DTensor.from_local(value.to(param.to_local().device), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride(), run_check=False)
    return value


def run_stage(config: StageConfig, registry: Registry | None = None, on_event=None, should_stop=None) -> Version | None:
    """Train one stage end to end; returns the new version (None on non-main ranks)."""
    recipe = StageRecipe(config, registry, on_event, should_stop)
    recipe.setup()
    recipe.train()
    version = recipe.save()
    if version is not None and config.evaluate_after:
        recipe.evaluate_lineage(version)
        version = recipe.registry.get(version.id)
    return version
