"""What each GPU holds when a stage trains with LLaCA: DDP vs FSDP2, as a model, checked on CPU.

    python -m llaca.bench.memory               # table + CPU check (~2 min on 2 busy cores) -> bench_results/memory/
    python -m llaca.bench.memory --model-only  # the table alone (instant)

The model (bytes per GPU, mixed precision as configs/accelerate/*_gpu.yaml sets it up):

    trainable parameter: fp32 weight 4 + fp32 gradient 4 + AdamW moments 8 + LLaCA's EMA 4 + previous gradient 4 = 24 B
    frozen parameter:    bf16 weight 2 (QLoRA: the LM's Linear weights in NF4, 0.5 B + ~0.016 B of quant. constants)
    DDP:   every GPU holds all of it.
    FSDP2: every GPU holds 1/N of all of it, plus the bf16 weights of the block it is computing and the next one
           (gathered, then freed: 2 x the largest block x 2 B).

Activations, the CUDA context and allocator slack are not in the model: they depend on batch and sequence length,
not on the sharding. The CPU check measures, per process, the persistent part the model predicts: resident memory
after the last optimizer step minus at the end of setup (model loaded and sharded), i.e. the AdamW moments (8 B per
trainable parameter the process holds) and, for `llaca`, its EMA and previous gradient (8 B more). On the tiny base
(fp32 throughout) DDP holds all of it in each process, FSDP2 half; the gradients (4 B) live only from backward to
zero_grad and the fp32 weights are the model itself, so neither is in the difference.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..paths import REPO_DIR

OUT = REPO_DIR / "bench_results" / "memory"
GB = 1e9

TRAINABLE_BYTES = {"weight": 4, "grad": 4, "adamw": 8, "llaca": 8}   # llaca = EMA (fp32) + previous gradient (fp32)
FROZEN_BF16, FROZEN_NF4 = 2.0, 0.5 + 0.0159  # NF4: 4 bits + double-quantized absmax (8 bits / 64 + 32 bits / 16,384)
LORA_R = 128  # the paper's adapters: r 128 on q, k, v, o, gate, up, down of the LM; projector trained in full


@dataclasses.dataclass(frozen=True)
class Arch:
    """A LLaVA: a Llama LM, a frozen vision tower, a 2-layer projector (tower width -> LM width -> LM width)."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int          # k / v projection width (heads x head dim; GQA makes it smaller than hidden)
    vocab: int
    tied: bool           # lm_head shares the embedding matrix
    vision: int          # vision tower parameters (frozen)
    vision_width: int    # the tower's feature width (projector input)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the LoRA-targeted Linears of one decoder layer: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def layer(self) -> int:
        return sum(a * b for a, b in self.linears()) + 2 * self.hidden    # + 2 RMSNorm weights

    def lm(self) -> int:
        return self.layers * self.layer() + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def lm_linear(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears())

    def projector(self) -> int:
        return self.vision_width * self.hidden + self.hidden + self.hidden * self.hidden + self.hidden

    def lora(self, r: int = LORA_R) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.linears())

    def total(self) -> int:
        return self.lm() + self.vision + self.projector()


ARCHS = [
    # the `small` base: SmolLM2-135M (30 x 576, 9 / 3 heads of 64, vocab 49,152, tied) + EfficientNet-Lite2 (1280 ch.)
    Arch("135M (small)", 576, 1536, 30, 192, 49152, True, 4_800_000, 1280),
    # llava-1.5-7b: Vicuna-7B + CLIP ViT-L/14-336 (303.5M, 1024 wide)
    Arch("7B (llava-1.5-7b)", 4096, 11008, 32, 4096, 32000, False, 303_500_000, 1024),
    # llava-1.5-13b: Vicuna-13B + the same tower
    Arch("13B (llava-1.5-13b)", 5120, 13824, 40, 5120, 32000, False, 303_500_000, 1024),
]
REGIMES = ("full", "lora", "qlora")
NS = (1, 2, 4, 8)


def state_bytes(arch: Arch, regime: str) -> tuple[float, float]:
    """(trainable parameters, bytes of the whole training state): everything one DDP GPU holds, before activations."""
    per_trainable = sum(TRAINABLE_BYTES.values())
    if regime == "full":                                   # LM + projector trained, tower frozen
        trainable = arch.lm() + arch.projector()
        frozen = arch.vision * FROZEN_BF16
    else:                                                  # LoRA on the LM's Linears + projector; base frozen
        trainable = arch.lora() + arch.projector()
        linear = arch.lm_linear() * (FROZEN_NF4 if regime == "qlora" else FROZEN_BF16)
        frozen = linear + (arch.lm() - arch.lm_linear() + arch.vision) * FROZEN_BF16
    return trainable, trainable * per_trainable + frozen


def per_gpu_bytes(arch: Arch, regime: str, strategy: str, n: int) -> float:
    """Bytes one GPU holds (no activations): DDP all of the state; FSDP2 1/N of it + two gathered bf16 blocks."""
    _, total = state_bytes(arch, regime)
    if strategy == "ddp":
        return total
    return total / n + 2 * arch.layer() * FROZEN_BF16


def model_table() -> tuple[str, list[dict]]:
    """Markdown table (GB per GPU and bytes per model parameter per GPU) + the same rows as dicts."""
    rows, lines = [], []
    head = "| model | regime | trainable | DDP (any N) | " + " | ".join(f"FSDP2 N={n}" for n in NS) + " |"
    lines += [head, "|" + "---|" * (4 + len(NS))]
    for arch in ARCHS:
        for regime in REGIMES:
            trainable, _ = state_bytes(arch, regime)
            cells = {"ddp": per_gpu_bytes(arch, regime, "ddp", 1)}
            cells.update({f"fsdp{n}": per_gpu_bytes(arch, regime, "fsdp", n) for n in NS})
            fmt = lambda b: f"{b / GB:.1f} GB ({b / arch.total():.1f} B/p)" if b >= GB else \
                f"{b / GB:.2f} GB ({b / arch.total():.1f} B/p)"
            lines.append(f"| {arch.name} | {regime} | {trainable / 1e6:,.0f}M of {arch.total() / 1e6:,.0f}M | "
                         + " | ".join(fmt(cells[k]) for k in ["ddp"] + [f"fsdp{n}" for n in NS]) + " |")
            rows.append({"model": arch.name, "regime": regime, "parameters": arch.total(), "trainable": trainable,
                         "bytes_per_gpu": cells})
    return "\n".join(lines), rows


# ---------------------------------------------------------------------------------------------------------------- check

def rss() -> int:
    """This process's resident memory now (bytes)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(jobs_file: str) -> None:
    """Run each job's stage (setup, train; no save) and record, per process, the resident memory the training state
    added: RSS after the last optimizer step (AdamW moments + the rule's EMA / previous gradient; the gradients are
    freed by zero_grad and the activations after backward) minus RSS at the end of setup. The first job only warms
    up (lazy initialisation, thread pools, allocator) and is not kept."""
    import torch

    from ..train.rules.base import local
    from ..train.tuner import StageConfig, StageRecipe
    from ..versions import Registry

    jobs = json.loads(Path(jobs_file).read_text())
    results = []
    for i, job in enumerate([jobs[0]] + jobs):
        gc.collect()
        after_step = []
        recipe = StageRecipe(StageConfig(**job["config"]), Registry(job["home"]),
                             on_event=lambda e: after_step.append(rss()) if e["type"] == "step" else None)
        recipe.setup()
        gc.collect()
        start = rss()
        recipe.train()
        acc = recipe.accelerator
        if i:
            results.append({**job["tags"], "rank": acc.process_index, "processes": acc.num_processes,
                            "trainable_here": sum(local(p).numel() for p in recipe.params.values()),
                            "state": after_step[-1] - start})
        acc.wait_for_everyone()
        del recipe
    out = Path(jobs_file).with_suffix(f".rank{results[0]['rank']}.json")
    out.write_text(json.dumps(results))


def measure(steps: int, workdir: Path) -> list[dict]:
    """The tiny base, 2 processes DDP and FSDP2 and 1 process, full and LoRA, seq and llaca: the state training adds."""
    from ..bases.install import install_shipped_base
    from ..data.coin_mini import write_coin_mini
    from ..versions import Registry

    home = workdir / "home"
    install_shipped_base(Registry(home))
    write_coin_mini(workdir / "coin", seed=0, n_train=64, n_test=8)
    data = workdir / "coin" / "vizwiz" / "train"
    env = {**os.environ, "LLACA_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR),
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}   # freed tensors leave the RSS at once
    launches = {"single": [sys.executable, "-m", "llaca.bench.memory", "--worker"]}
    for name in ("ddp", "fsdp"):
        launches[name] = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO_DIR / "configs" / "accelerate" / f"{name}_cpu.yaml"), "--num_processes", "2",
                          "-m", "llaca.bench.memory", "--worker"]
    rows = []
    for launch, cmd in launches.items():
        jobs = [{"home": str(home), "tags": {"launch": launch, "regime": regime, "method": method},
                 "config": {"data": str(data), "parent": "base", "method": method, "max_steps": steps, "batch_size": 8,
                            "lora": regime == "lora", "checkpoint_every": 0, "evaluate_after": False}}
                for regime in ("full", "lora") for method in ("seq", "llaca")]
        jobs_file = workdir / f"{launch}.json"
        jobs_file.write_text(json.dumps(jobs))
        proc = subprocess.run(cmd + [str(jobs_file)], env=env, cwd=REPO_DIR, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{launch} failed:\n{proc.stderr[-3000:]}")
        for f in sorted(workdir.glob(f"{launch}.rank*.json")):
            rows += json.loads(f.read_text())
    return rows


def check_table(rows: list[dict]) -> str:
    """Measured vs predicted persistent training state, per launch x regime (rank 0; the ranks agree to ~1 MB)."""
    by = {(r["launch"], r["regime"], r["method"], r["rank"]): r for r in rows}
    lines = ["| launch | regime | trainable held by rank 0 | seq: measured / predicted 8 B x held (AdamW) | "
             "llaca: measured / predicted 16 B x held (+ EMA + prev. grad) | llaca - seq / predicted 8 B x held |",
             "|" + "---|" * 6]
    mb = lambda b: f"{b / 1e6:.1f}"
    for launch in ("single", "ddp", "fsdp"):
        for regime in ("full", "lora"):
            seq, lla = by.get((launch, regime, "seq", 0)), by.get((launch, regime, "llaca", 0))
            if not (seq and lla):
                continue
            held = lla["trainable_here"]
            lines.append(f"| {launch} (N={lla['processes']}) | {regime} | {held / 1e6:.2f}M | "
                         f"{mb(seq['state'])} / {mb(8 * held)} MB | {mb(lla['state'])} / {mb(16 * held)} MB | "
                         f"{mb(lla['state'] - seq['state'])} / {mb(8 * held)} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-only", action="store_true", help="write the model table only (no CPU runs)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, rows = model_table()
    (out / "model.json").write_text(json.dumps(rows, indent=1))
    report = ["# Memory per GPU: DDP vs FSDP2 (model)", "", "`python -m llaca.bench.memory` (llaca/bench/memory.py has "
              "the model). Training state only: no activations, CUDA context or allocator slack.", "", table, ""]
    if not args.model_only:
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure(args.steps, Path(tmp))
        (out / "measured.json").write_text(json.dumps(measured, indent=1))
        report += ["## Check on CPU: the tiny base (2.96M parameters), 1 process and 2 gloo processes", "",
                   f"{args.steps} steps, batch 8: resident memory after the last step minus at the end of setup, "
                   "rank 0 (MB = 1e6 bytes).", "", check_table(measured), ""]
    (out / "README.md").write_text("\n".join(report))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
