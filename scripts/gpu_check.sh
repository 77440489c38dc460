#!/usr/bin/env bash
# GPU check for a lent GPU machine (< 5 min on one GPU): the stage loop on CUDA, the sharded loop on one GPU, QLoRA,
# and chat speed, on the `tiny` base. Prints ONE table (and writes it to bench_results/gpu_check/<host>-<time>.md).
#
#   bash scripts/gpu_check.sh                # PYTHON=... to use another interpreter (default .venv/bin/python)
#
# Rows: (1) bf16 stage, 1 process (accelerate mixed_precision bf16: autocast, fp32 state), llaca rule;
#       (2) FSDP2 stage on 1 GPU through configs/accelerate/fsdp_gpu.yaml (the sharded code path: DTensor params,
#           LLaCA's all-reduce, sharded checkpoint, gathered version) - the same loop `--num_processes 8` runs;
#       (3) QLoRA: NF4 base (bitsandbytes on CUDA) + LoRA, llaca rule;  (4) greedy chat, 64 new tokens, bf16.
# Never part of CI. Ran once on a lent H100 (2026-12-05; torch 2.11.0+cu130 of the device image, the pinned
# transformers/peft/bitsandbytes carried as wheels, see scripts/gpu_check_cli.sh): all four rows passed,
# bench_results/gpu_check/h100-20261205-1938.md. Its companion scripts/gpu_check_cli.sh checks the CLI path on a LLaVA
# folder (LoRA, 4-bit, 8-bit, ask, eval) and runs the model tests with the GPU visible.
#   GPU_CHECK_KEEP=DIR keeps each row's log; ROW_LIMIT=S is each stage row's time limit (120 s).
# Needs a CUDA build of torch in $PYTHON's environment (requirements.txt pins the CPU wheel: on a GPU machine install
# e.g. `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128` first).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-30}
WORK=$(mktemp -d)
KEEP=${GPU_CHECK_KEEP:-}   # a folder to keep each row's log in (e.g. the device tool's $OUT)
trap '[ -n "$KEEP" ] && mkdir -p "$KEEP" && cp "$WORK"/*.log "$KEEP"/ 2>/dev/null; rm -rf "$WORK"' EXIT
ROW_LIMIT=${ROW_LIMIT:-120}
export LLACA_HOME="$WORK/home" HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONPATH="$PWD"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
    echo "gpu_check: torch in $PY sees no CUDA device (CPU-only wheel, or no GPU); nothing to check." >&2
    echo "           (GPU_CHECK_ON_CPU=1 STEPS=3 runs the same rows on CPU: a test of this script's plumbing only)" >&2
    exit 2
  fi
  echo "gpu_check: NO CUDA - running on CPU to test the script itself; the figures say nothing about GPUs" >&2
fi

# One helper for every row: run a stage (under accelerate launch when asked) or a chat, print one JSON line.
cat > "$WORK/probe.py" <<'EOF'
import json, os, sys, time
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"   # CPU only under GPU_CHECK_ON_CPU (plumbing test)

def peak_gb():
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if CUDA else ""

def setup(data_root):
    from llaca.bases.install import install_shipped_base
    from llaca.data.coin_mini import write_coin_mini
    from llaca.versions import Registry
    reg = Registry()
    if not reg.exists("base"):
        install_shipped_base(reg)
    write_coin_mini(data_root, seed=0, n_train=256, n_test=32)

def stage(data, steps, name, **kw):
    from llaca.train.tuner import StageConfig, run_stage
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    v = run_stage(StageConfig(data=data, parent="base", name=name, max_steps=int(steps), batch_size=16,
                              checkpoint_every=10, evaluate_after=True, **kw))
    secs = time.time() - t
    if v is None:  # not rank 0
        return
    acc = v.meta["metrics"].get("test", {})
    print(json.dumps({"row": name, "seconds": round(secs, 1), "steps/s": round(int(steps) / secs, 2),
                      "peak_gpu_GB": peak_gb(),
                      "result": f"{v.id}, test acc " + ", ".join(f"{k} {r['accuracy']}" for k, r in acc.items())}))

def chat(version, image):
    from PIL import Image
    from llaca.serve.chat import _prepare
    from llaca.versions import Registry, load_version
    model, processor = load_version(Registry(), version, dtype=torch.bfloat16)
    model.to(DEVICE).eval()
    inputs = _prepare(processor, Image.open(image), [], "What is in the image?").to(DEVICE)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(**inputs, **kw)                      # warm-up (kernels, cache)
        CUDA and torch.cuda.synchronize(); t = time.time()
        out = model.generate(**inputs, **kw)
        CUDA and torch.cuda.synchronize(); secs = time.time() - t
    n = out.shape[1] - inputs["input_ids"].shape[1]
    print(json.dumps({"row": "chat bf16 (greedy, b=1)", "seconds": round(secs, 2), "steps/s": "",
                      "peak_gpu_GB": peak_gb(),
                      "result": f"{n / secs:.0f} tokens/s over {n} tokens"}))

if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "setup":
        setup(*args)
    elif what == "stage":
        data, steps, name, *flags = args
        stage(data, steps, name, lora="lora" in flags, load_in_4bit="4bit" in flags)
    else:
        chat(*args)
EOF

DATA="$WORK/coin/vizwiz/train"
RESULTS="$WORK/results.jsonl"
row() {  # row NAME TIMEOUT COMMAND...: run it, keep its JSON line, or record the failure
  local name=$1 limit=$2; shift 2
  local log="$WORK/$(echo "$name" | tr -c 'a-zA-Z0-9' _).log"
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    grep '^{"row"' "$log" >>"$RESULTS" || echo "{\"row\": \"$name\", \"result\": \"no result line\"}" >>"$RESULTS"
  else
    local why; why=$(grep -v '^\s*$' "$log" | grep -v '%|' | tail -1 | tr -d '"\\' | cut -c1-120)
    echo "{\"row\": \"$name\", \"result\": \"FAILED (exit $rc${rc/124/: timeout}): $why\"}" >>"$RESULTS"
  fi
}

T0=$(date +%s)
"$PY" "$WORK/probe.py" setup "$WORK/coin" || { echo "gpu_check: setup failed" >&2; exit 1; }
LAUNCH=("$PY" -m accelerate.commands.launch)
row "bf16 stage (1 GPU)" "$ROW_LIMIT" env ACCELERATE_MIXED_PRECISION=bf16 "$PY" "$WORK/probe.py" stage "$DATA" "$STEPS" bf16-stage
row "FSDP2 stage (1 GPU)" "$ROW_LIMIT" "${LAUNCH[@]}" --config_file configs/accelerate/fsdp_gpu.yaml --num_processes 1 \
    "$WORK/probe.py" stage "$DATA" "$STEPS" fsdp-stage
row "QLoRA NF4 stage (1 GPU)" "$ROW_LIMIT" "$PY" "$WORK/probe.py" stage "$DATA" "$STEPS" qlora-stage lora 4bit
IMAGE=$(ls "$WORK"/coin/vizwiz/test/images/* | head -1)
row "chat" 60 "$PY" "$WORK/probe.py" chat bf16-stage "$IMAGE"

GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
TABLE=$("$PY" - "$RESULTS" "$GPU" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"gpu_check on {sys.argv[2] or 'unknown GPU'}, {sys.argv[3]} s in all\n")
print("| row | seconds | steps/s | peak GPU GB | result |\n|---|---|---|---|---|")
for r in rows:
    print(f"| {r['row']} | {r.get('seconds', '')} | {r.get('steps/s', '')} | {r.get('peak_gpu_GB', '')} | {r['result']} |")
EOF
)
echo "$TABLE"
mkdir -p bench_results/gpu_check
echo "$TABLE" > "bench_results/gpu_check/$(hostname)-$(date +%Y%m%d-%H%M).md"
