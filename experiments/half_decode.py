"""`python experiments/half_decode.py`: does `small` decode faster with half-precision LM weights, unchanged?

Issue 24 asks >= 15 tokens/s for one user; `small` decodes at ~9-13 tokens/s fp32 on the 2-core AMD EPYC (AVX2, no
native bf16). A decode step multiplies one row by every LM weight, so it reads the 135M fp32 weights (540 MB) once
per token: memory-bound. Half-precision weights halve those bytes; int8 did too but changed 6 of 8 answers
(experiments/int8_decode.py). This probe converts the LM (decoder + head) to bf16 or fp16, tower and projector
stay fp32, and measures per-token decode time and prefill time against fp32 on the same 8 greedy questions,
alternating, and whether each answer is unchanged. Output: bench_results/small/half_decode.txt.
"""
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

QUESTIONS = [("chelsea", "What animal is in this photo?"), ("coffee", "What is in the picture?"),
             ("astronaut", "Describe the image briefly."), ("rocket", "What is this?"),
             (None, "What is the capital of France?"), (None, "Name three primary colours."),
             (None, "How many legs does a spider have?"), ("camera", "What is the man holding?")]


def inputs(processor):
    import skimage.data
    from PIL import Image

    from llaca.serve.chat import _prepare

    return [_prepare(processor, Image.fromarray(getattr(skimage.data, name)()).convert("RGB") if name else None, [], q)
            for name, q in QUESTIONS]


@torch.inference_mode()
def answers(model, processor, batch, new_tokens=24):
    """Greedy answers, and (prefill ms, decode ms/token) summed over the questions."""
    out, prefill, decode, n = [], 0.0, 0.0, 0
    for inp in batch:
        t = time.perf_counter()
        model.generate(**inp, max_new_tokens=1, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        t1 = time.perf_counter()
        o = model.generate(**inp, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id)
        t2 = time.perf_counter()
        k = o.shape[1] - inp["input_ids"].shape[1]
        prefill += t1 - t
        decode += max(0.0, (t2 - t1) - (t1 - t))
        n += max(0, k - 1)
        out.append(processor.tokenizer.decode(o[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out, 1000 * prefill / len(batch), 1000 * decode / max(1, n)


def half(model, dtype):
    """The LM and its head in `dtype`; tower and projector (run once per image) stay fp32."""
    m = copy.deepcopy(model)
    m.model.language_model.to(dtype)
    m.lm_head.to(dtype)
    m.config.text_config.dtype = dtype
    return m


def main():
    from llaca.versions import Registry, load_version

    torch.set_num_threads(2)
    home = os.environ.get("LLACA_HOME", "bench_results/small/work/home")
    model, processor = load_version(Registry(home), "small")
    model.eval()
    batch = inputs(processor)
    variants = {"fp32": model, "bf16": half(model, torch.bfloat16), "fp16": half(model, torch.float16)}
    results = {k: [] for k in variants}
    for rnd in range(2):  # alternating: the machine's load moves every figure, the ratios are the result
        for name, m in variants.items():
            results[name].append(answers(m, processor, batch))
            _, p, d = results[name][-1]
            print(f"round {rnd} {name}: prefill {p:.0f} ms, decode {d:.1f} ms/token ({1000 / d:.1f} tokens/s)",
                  flush=True)
    ref = results["fp32"][0][0]
    for name in ("bf16", "fp16"):
        got = results[name][0][0]
        same = sum(a == b for a, b in zip(ref, got))
        dec = [r[2] for r in results[name]]
        base = [r[2] for r in results["fp32"]]
        print(f"{name}: {same} of {len(ref)} answers unchanged; decode {sum(base) / sum(dec):.2f}x fp32's speed; "
              f"prefill {sum(r[1] for r in results[name]) / sum(r[1] for r in results['fp32']):.2f}x fp32's time")
        for (_, q), a, b in zip(QUESTIONS, ref, got):
            if a != b:
                print(f"   != {q!r}\n      fp32: {a!r}\n      {name}: {b!r}")
    print("load average at the end:", os.getloadavg())


if __name__ == "__main__":
    main()
