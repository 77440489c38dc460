#!/usr/bin/env bash
# The CLI half of the GPU check (scripts/gpu_check.sh is the library half: stage, FSDP2, QLoRA and chat rows), for a
# lent device machine (the `device` tool; CI never has a GPU): the real-checkpoint path on CUDA with tiny configs -- a
# LLaVA folder learned with LoRA in bf16, QLoRA 4-bit and 8-bit under the LLaCA rule, asked and evaluated through the
# CLI -- then the model/training/serving tests with the GPU visible. Ran once on an H100, 2026-12-05:
# bench_results/gpu_h100/, docs/real-checkpoints.md.
#
# The device image has its own CUDA torch (2.11) and older transformers; the pinned pure-Python packages travel as
# wheels in the git-ignored .gpu/whl (transformers, peft, and bitsandbytes cut to its CUDA 13 libraries):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#       -d .gpu/whl transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2
#   zip -d .gpu/whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/*rocm*' 'bitsandbytes/*xpu*'
# Run (device tool): command "bash scripts/gpu_check_cli.sh", carry [".gpu"]. Everything lands in $OUT.
# The tracked tree (~88 MB) is over the 64 MiB that travels: for the call, take what the check does not read out of the
# index and put it back after (nothing is committed meanwhile):
#   git ls-files assets/small assets/base_v1 assets/screenshots bench_results > /tmp/hidden.txt
#   tar -cf /tmp/hidden.tar -T /tmp/hidden.txt && git rm --cached -q --pathspec-from-file=/tmp/hidden.txt \
#       && xargs -d '\n' rm -f < /tmp/hidden.txt
#   ... the call ...;  tar -xf /tmp/hidden.tar && git reset -q --pathspec-from-file=/tmp/hidden.txt
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
# Into the interpreter's own site-packages, not a PYTHONPATH: the tests' subprocesses set their own PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .gpu/whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LLACA_BASE=tiny
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.is_bf16_supported()); print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/env.txt"

export LLACA_HOME=/tmp/gpu_home
CKPT=$PWD/assets/base/model     # a LlavaForConditionalGeneration folder in the standard layout (the tiny base)
DATA=/tmp/coin
step() {  # step NAME CMD...: time one CLI call, keep its output
  local name=$1; shift
  local t0=$(date +%s%N)
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%-14s rc=%s %6d ms  %s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" \
      "$(tail -n 1 "$OUT/$name.log" | tr '\r' '\n' | tail -n 1)" | tee -a "$OUT/smoke.txt"
}
step coin python3 -m llaca coin-mini "$DATA" --n-train 96 --n-test 24
IMAGE=$(ls "$DATA"/gqa/test/images/* | head -n 1)
COMMON=(--lora --method llaca --max-steps 40 --batch-size 8)
step lora_bf16 python3 -m llaca learn "$DATA/gqa/train" --model "$CKPT" "${COMMON[@]}" --name gpu_lora
step qlora_4bit python3 -m llaca learn "$DATA/sciqa/train" "${COMMON[@]}" --load-in-4bit --from gpu_lora --name gpu_q4 --trace-dir "$OUT/trace_q4"
step lora_8bit python3 -m llaca learn "$DATA/gqa/train" "${COMMON[@]}" --load-in-8bit --from gpu_lora --name gpu_q8
step ask_q4 python3 -m llaca ask gpu_q4 "$IMAGE" "What shape is in the image?"
step eval_q4 python3 -m llaca eval gpu_q4 "$DATA/sciqa/test" --limit 24
step full_tiny python3 -m llaca learn "$DATA/gqa/train" --method llaca --max-steps 40 --batch-size 8 --from base --name gpu_full
python3 -m llaca versions > "$OUT/versions.txt" 2>&1
for v in "$LLACA_HOME"/versions/*/meta.json; do echo "== $v"; cat "$v"; echo; done > "$OUT/metas.txt"

# The tests that load, train and serve models, with CUDA visible (their helpers were written for the CPU: a failure
# may be the helper's device, not the product's; the log says which).
timeout "${PYTEST_TIMEOUT:-240}" python3 -m pytest -p no:cacheprovider -n 8 -q -o addopts="" --dist worksteal \
    --junitxml="$OUT/junit.xml" tests/test_lora.py tests/test_tuner.py tests/test_rules.py tests/test_model.py \
    tests/test_half_decode.py tests/test_cli.py "$@" > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/smoke.txt"
# At most 8 files come back: the step logs travel as one archive.
(cd "$OUT" && tar -czf logs.tgz *.log trace_* metas.txt versions.txt && rm -rf -- *_*.log coin.log ask_q4.log trace_*)
grep -E "passed|failed|^(FAILED|ERROR)" "$OUT/pytest.log" | tail -n 30
