"""`python experiments/int8_decode.py`: does int8 dynamic quantization make `small` decode faster without changing it?

Tried 2026-12-03 for issue 24's >= 15 tokens/s (fp32 decodes at ~9-13 tokens/s on two cores; a decode step is
memory-bound: 135M fp32 weights read per token). torch's dynamic int8 quantization (per-channel, the LM's decoder
Linears; LM head and tower fp32) on 8 greedy questions: 1.9x the tokens/s (incl. prefill), but 6 of 8 answers change, among them
every image answer (one empty), so it is not used for serving. Output: bench_results/small/int8_decode.txt.
"""
import time, os, sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from llaca.versions import Registry, load_version
from llaca.serve.chat import _prepare
import skimage.data
from PIL import Image
from torch.ao.quantization import quantize_dynamic, per_channel_dynamic_qconfig
home = os.environ.get("LLACA_HOME", "bench_results/small/work/home")
model, processor = load_version(Registry(home), "small")
model.eval()
qs = [("chelsea", "What animal is in this photo?"), ("coffee", "What is in the picture?"), ("astronaut", "Describe the image briefly."),
      ("rocket", "What is this?"), (None, "What is the capital of France?"), (None, "Name three primary colours."),
      (None, "How many legs does a spider have?"), ("camera", "What is the man holding?")]
def run(m, label):
    outs, ts = [], []
    for name, q in qs:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB") if name else None
        inp = _prepare(processor, img, [], q)
        with torch.inference_mode():
            t = time.perf_counter()
            o = m.generate(**inp, max_new_tokens=24, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
            n = o.shape[1] - inp["input_ids"].shape[1]
            ts.append((time.perf_counter() - t, n))
        outs.append(processor.tokenizer.decode(o[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    tot = sum(t for t, _ in ts); ntok = sum(n for _, n in ts)
    print(f"{label}: {ntok/tot:.1f} tok/s overall (incl prefill)", flush=True)
    return outs
ref = run(model, "fp32")
lm = model.model.language_model
qcfg = {torch.nn.Linear: per_channel_dynamic_qconfig}
quantize_dynamic(lm, qcfg, dtype=torch.qint8, inplace=True)
outq = run(model, "int8 per-channel decoder, fp32 head")
for (n, q), a, b in zip(qs, ref, outq):
    print(f"{'==' if a==b else '!='} {q!r}\n   fp32: {a!r}\n   int8: {b!r}")
