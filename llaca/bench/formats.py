"""`python -m llaca.bench formats`: every accepted data format, what it is detected as, and its cost at 100k rows.

For each format an example set is written (the same records each time: `--rows` questions over `--images`
distinct images, as files or embedded as bytes), then validated in a fresh child process (a fresh
$LLACA_HOME too, so embedded images are decoded and written as on a first upload). Reported: what the loader
detected, how many records it accepted, wall time, the child's peak RSS and how much it grew during
validation. Results go to `bench_results/formats/` (JSON + Markdown). The writers are also what the tests use
to build valid sets of every format (`write_example`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
RGB = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
       "purple": (140, 30, 160), "orange": (240, 140, 20), "white": (250, 250, 250), "black": (5, 5, 5)}
QUESTION = "What color is the square?"

# name -> (how it is written, the README/bench label)
FORMATS = {
    "llava-json": "LLaVA, a JSON list",
    "llava-jsonl": "LLaVA, JSON Lines",
    "sharegpt-json": "ShareGPT (LLaMA-Factory), JSON",
    "messages-jsonl": "OpenAI / TRL messages, JSON Lines",
    "csv": "CSV image,question,answer",
    "tsv": "TSV image,question,answer",
    "parquet": "Parquet, embedded Image column (Hub VQA style)",
    "parquet-messages": "Parquet, messages + embedded images list (TRL style)",
    "hf-disk": "datasets save_to_disk folder, embedded images",
    "zip-csv": "a .zip of a CSV set",
}


def _image(k: int) -> tuple[str, Image.Image]:
    color = COLORS[k % len(COLORS)]
    im = Image.new("RGB", (32, 32), RGB[color])
    im.putpixel((k % 32, (k // 32) % 32), (k % 251, (k * 7) % 253, (k * 13) % 255))  # distinct content per k
    return color, im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, n_images: int):
    for i in range(n):
        k = i % n_images
        yield i, k, COLORS[k % len(COLORS)]


def _write_images(folder: Path, n_images: int) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        _image(k)[1].save(folder / "images" / f"img {k}.png")  # a space in every path, on purpose


def _features(kind: str):
    from datasets import Features
    from datasets import Image as HFImage
    from datasets import List, Value

    if kind == "parquet-messages":
        return Features({"id": Value("string"), "messages": List({"role": Value("string"), "content": Value("string")}),
                         "images": List(HFImage())})
    return Features({"id": Value("string"), "image": HFImage(), "question": Value("string"), "answer": Value("string")})


def _arrow_batches(kind: str, n: int, n_images: int, batch: int = 5_000):
    import pyarrow as pa

    schema = _features(kind).arrow_schema
    blobs = [_png(_image(k)[1]) for k in range(n_images)]
    ids, images, questions, answers, messages = [], [], [], [], []
    for i, k, color in _rows(n, n_images):
        ids.append(str(i))
        if kind == "parquet-messages":
            messages.append([{"role": "user", "content": "<image>" + QUESTION}, {"role": "assistant", "content": color}])
            images.append([{"bytes": blobs[k], "path": None}])
        else:
            images.append({"bytes": blobs[k], "path": None})
            questions.append(QUESTION)
            answers.append(color)
        if len(ids) == batch or i == n - 1:
            cols = ({"id": ids, "messages": messages, "images": images} if kind == "parquet-messages"
                    else {"id": ids, "image": images, "question": questions, "answer": answers})
            yield pa.Table.from_pydict(cols, schema=schema)
            ids, images, questions, answers, messages = [], [], [], [], []


def write_example(kind: str, folder: Path, n: int = 4, n_images: int = 2) -> Path:
    """Write `n` records of format `kind` under `folder`; return what to pass to `validate`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("parquet", "parquet-messages"):
        import pyarrow.parquet as pq

        path = folder / "train-00000-of-00001.parquet"
        with pq.ParquetWriter(path, _features(kind).arrow_schema) as writer:
            for table in _arrow_batches(kind, n, n_images):
                writer.write_table(table)
        return folder
    if kind == "hf-disk":
        import pyarrow as pa
        from datasets import Dataset
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        table = pa.concat_tables(list(_arrow_batches("parquet", n, n_images)))
        Dataset(table).cast(_features("parquet")).save_to_disk(str(folder / "saved"))
        return folder / "saved"
    if kind == "zip-csv":
        inner = write_example("csv", folder / "set", n, n_images)
        path = folder / "upload.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(inner.rglob("*")):
                zf.write(f, f"myset/{f.relative_to(inner).as_posix()}")
        shutil.rmtree(inner)
        return path
    _write_images(folder, n_images)
    image = lambda k: f"images/img {k}.png"  # noqa: E731
    if kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        with open(folder / f"data.{kind}", "w", encoding="utf-8", newline="") as f:
            f.write(sep.join(["image", "question", "answer"]) + "\n")
            f.writelines(sep.join([image(k), QUESTION, color]) + "\n" for _, k, color in _rows(n, n_images))
        return folder

    def record(i, k, color):
        if kind.startswith("llava"):
            return {"id": str(i), "image": image(k), "conversations": [
                {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": color}]}
        if kind == "sharegpt-json":
            return {"conversations": [{"from": "human", "value": "<image>" + QUESTION},
                                      {"from": "gpt", "value": color}], "images": [image(k)]}
        return {"messages": [{"role": "user", "content": "<image>" + QUESTION},
                             {"role": "assistant", "content": color}], "images": [image(k)]}

    if kind.endswith("jsonl"):
        with open(folder / "data.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record(*r)) + "\n" for r in _rows(n, n_images))
    else:
        with open(folder / "data.json", "w", encoding="utf-8") as f:
            f.write("[" + ",\n".join(json.dumps(record(*r)) for r in _rows(n, n_images)) + "]")
    return folder


TABLE_EXAMPLES = {
    "parquet": "columns id: string, image: Image (PNG/JPEG bytes), question: string, answer: string",
    "parquet-messages": "columns id: string, messages: list of {role, content}, images: list of Image",
    "hf-disk": "folder with state.json, dataset_info.json, data-00000-of-00001.arrow (columns as Parquet)",
    "zip-csv": "upload.zip → myset/data.csv + myset/images/",
}


def example_text(kind: str) -> str:
    """One record of the format, as its file holds it (for the table)."""
    if kind in TABLE_EXAMPLES:
        return TABLE_EXAMPLES[kind]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_example(kind, Path(tmp), n=1, n_images=1)
        data = next(p for p in sorted(path.iterdir()) if p.is_file())
        return " ⏎ ".join(data.read_text(encoding="utf-8").strip().strip("[]").splitlines())


# ------------------------------------------------------------------------------------------ measuring

CHILD = r"""
import json, os, resource, sys, time
from llaca.data import validate
import llaca.data.formats  # noqa: F401
if sys.argv[2] in ("parquet", "parquet-messages", "hf-disk"):
    import datasets  # noqa: F401  (its import is not part of the validation's cost)
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
trace = len(sys.argv) > 3
if trace:
    import tracemalloc
    tracemalloc.start()
start = rss_mb()
t0 = time.perf_counter()
report = validate(sys.argv[1])
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"detected": report.format, "records": len(report.records), "ok": report.ok,
       "problems": [str(p) for p in report.problems[:3]], "seconds": seconds, "rss_start_mb": start,
       "peak_rss_mb": peak}
if trace:  # Python heap: what validation kept (the records) vs its peak; the difference is what reading held
    kept, top = tracemalloc.get_traced_memory()
    out.update(py_kept_mb=kept / 2**20, py_peak_mb=top / 2**20)
print(json.dumps(out))
"""


def measure(kind: str, rows: int, images: int, work: Path, trace: bool = False) -> dict:
    folder = work / kind
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    path = write_example(kind, folder, rows, images)
    written = time.perf_counter() - t0
    home = work / f"home-{kind}"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "LLACA_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), kind] + (["trace"] if trace else []),
                          capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"{kind}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return {"format": kind, "label": FORMATS[kind], "rows": rows, "images": images, "bytes_on_disk": size,
            "write_seconds": written, **result}


def table(results: list[dict]) -> str:
    rows = f"{results[0]['rows']:,}" if results else "N"
    lines = [f"| format | example (one record) | detected as | records accepted | validate {rows} rows | "
             "peak RSS (growth) |", "|---|---|---|---|---|---|"]
    for r in results:
        example = r["example"].replace("|", "\\|")
        if len(example) > 160:
            example = example[:157] + "…"
        lines.append(f"| {r['label']} | `{example}` | {r['detected']} | {r['records']:,} of {r['rows']:,} | "
                     f"{r['seconds']:.1f} s | {r['peak_rss_mb']:.0f} MiB (+{r['peak_rss_mb'] - r['rss_start_mb']:.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llaca.bench formats", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--images", type=int, default=1_000, help="distinct images the rows cycle over")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ", ".join(FORMATS))
    p.add_argument("--out", default="bench_results/formats")
    p.add_argument("--streaming", default="llava-json,llava-jsonl,parquet",
                   help="formats re-validated under tracemalloc: Python heap kept (the records) vs peak")
    p.add_argument("--streaming-only", action="store_true", help="keep the table in OUT/formats.json, redo the "
                                                                  "streaming check only")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    previous = json.loads((out / "formats.json").read_text()) if args.streaming_only else None
    with tempfile.TemporaryDirectory(prefix="llaca-formats-") as tmp:
        for kind in [] if previous else args.formats.split(","):
            r = measure(kind, args.rows, args.images, Path(tmp))
            r["example"] = example_text(kind)
            print(f"{kind:18s} {r['detected']:70s} {r['records']:>7,} ok={r['ok']} {r['seconds']:6.1f} s "
                  f"peak {r['peak_rss_mb']:.0f} MiB (+{r['peak_rss_mb'] - r['rss_start_mb']:.0f})", flush=True)
            results.append(r)
        streaming = []
        for kind in filter(None, args.streaming.split(",")):
            r = measure(kind, args.rows, args.images, Path(tmp), trace=True)
            print(f"streaming {kind}: Python heap peak {r['py_peak_mb']:.0f} MiB, kept {r['py_kept_mb']:.0f} MiB",
                  flush=True)
            streaming.append(r)
    if previous:
        results = previous["results"]
        meta = previous["meta"]
    else:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": args.rows, "images": args.images,
                "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    (out / "formats.json").write_text(json.dumps({"meta": meta, "results": results, "streaming": streaming}, indent=1))
    head = (f"{args.rows:,} rows over {args.images:,} distinct 32x32 PNGs per format; measured {meta['date']} on "
            f"{meta['cpus']} CPUs (load avg {meta['load_avg'][0]:.1f}, shared machine); each validation in a fresh "
            "process and $LLACA_HOME; peak RSS of that process (growth over its RSS after imports).\n\n")
    lines = [f"- {r['label']}: Python heap peak {r['py_peak_mb']:.0f} MiB during validation, of which "
             f"{r['py_kept_mb']:.0f} MiB are the {r['records']:,} records kept for training; reading held "
             f"{r['py_peak_mb'] - r['py_kept_mb']:.0f} MiB at most (tracemalloc, {r['seconds']:.1f} s under it)"
             for r in streaming]
    tail = ("\n\nStreaming check (JSON Lines and Parquet are read in batches, so what grows with the set is the record list; a JSON list is parsed whole, hence its 256 MiB cap):\n\n"
            + "\n".join(lines)) if lines else ""
    (out / "formats.md").write_text(head + table(results) + tail + "\n")
    print(f"wrote {out / 'formats.md'}")
    return 0 if all(r["ok"] and r["records"] == r["rows"] for r in results + streaming) else 1


if __name__ == "__main__":
    raise SystemExit(main())
