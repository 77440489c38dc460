"""Bring your own data: every accepted format gives the tuner the same records; unusual-but-valid input is
accepted (one test per case); every common image mode becomes the RGB a viewer shows; export round-trips.

The broken counterpart of each format lives in `broken_sets.py` (run through library, CLI and UI by
`test_hardening.py`).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from broken_sets import embedded, parquet_set, png
from PIL import Image

from llaca import cli
from llaca.bench.formats import FORMATS, write_example
from llaca.data import load_image, load_instruction_set, validate


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLACA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def pairs(records) -> list:
    return [(r.id, r.turns) for r in records]


REFERENCE = [(str(i), [("What color is the square?", c)]) for i, c in enumerate(["red", "green", "blue"] * 2)]
DETECTED = {"llava-json": "LLaVA conversations in JSON", "llava-jsonl": "LLaVA conversations in JSON Lines",
            "sharegpt-json": "ShareGPT (conversations + images) in JSON",
            "messages-jsonl": "messages (OpenAI / ShareGPT role-content) in JSON Lines",
            "csv": "image / question / answer columns in CSV", "tsv": "image / question / answer columns in TSV",
            "parquet": "image / question / answer columns in Parquet", "parquet-messages": "messages (OpenAI",
            "hf-disk": "Hugging Face save_to_disk folder, 3 embedded image(s)", "zip-csv": "columns in CSV"}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_every_format_is_detected_and_gives_the_same_records(kind, tmp_path, home):
    report = validate(write_example(kind, tmp_path / kind, n=6, n_images=3))
    assert report.ok, report.problems
    assert DETECTED[kind] in report.format, report.format
    assert pairs(report.records) == REFERENCE
    images = [load_image(r.image) for r in report.records[:3]]
    assert [im.getpixel((20, 20)) for im in images] == [(220, 30, 30), (30, 180, 30), (30, 30, 220)]
    if kind in ("parquet", "parquet-messages", "hf-disk"):  # decoded once per distinct image, then published
        assert len(list(home.glob("uploads/*-images/images/*.png"))) == 3
        assert not list(home.glob("uploads/*.tmp-*"))


# ------------------------------------------------------------------------------ valid but unusual input

def llava_rows(image="a.png", n=2, **extra):
    return [{"id": str(i), "image": image, **extra, "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]} for i in range(n)]


def _bom_json(d):
    (d / "data.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(llava_rows()).encode())


def _bom_jsonl(d):
    (d / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, llava_rows())).encode())


def _bom_csv(d):  # Excel's "CSV UTF-8"
    (d / "data.csv").write_bytes(b"\xef\xbb\xbfimage,question,answer\r\na.png,What color?,red\r\na.png,What color?,red\r\n")


def _crlf_json(d):
    (d / "data.json").write_bytes(json.dumps(llava_rows(), indent=1).replace("\n", "\r\n").encode())


def _crlf_jsonl(d):
    (d / "data.jsonl").write_bytes("\r\n".join(map(json.dumps, llava_rows())).encode() + b"\r\n")


def _crlf_tsv(d):
    (d / "data.tsv").write_bytes(b"image\tquestion\tanswer\r\na.png\tWhat color?\tred\r\na.png\tWhat color?\tred\r\n")


def _extra_keys(d):
    rows = llava_rows(source="coco", meta={"license": 4})
    rows[0]["conversations"][0]["weight"] = 1.0
    (d / "data.json").write_text(json.dumps(rows))


def _extra_columns(d):
    (d / "data.csv").write_text("id,image,split,question,answer,notes\nx,a.png,train,What color?,red,\n"
                                "y,a.png,train,What color?,red,double-checked\n")


def _non_ascii_and_spaces(d):
    name = "fotos del café/ñandú 1 图.png"
    png(d / "a.png").rename(d / "plain.png")
    (d / name).parent.mkdir()
    png(d / name)
    (d / "data.json").write_text(json.dumps(llava_rows(image=name)), encoding="utf-8")


def _jsonl_named_json(d):  # LLaMA-Factory and many exporters do this
    (d / "data.json").write_text("\n".join(map(json.dumps, llava_rows())))


def _openai_content_parts(d):  # TRL's convention
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": ["a.png"]}] * 2
    (d / "data.jsonl").write_text("\n".join(map(json.dumps, rows)))


def _llamafactory_folder(d):  # the registration file users hand-edit there is simply ignored here
    (d / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mllm.json", "formatting": "sharegpt"}}))
    rows = [{"messages": [{"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red"}],
             "images": ["a.png"]}] * 2
    (d / "mllm.json").write_text(json.dumps(rows))


def _hf_imagefolder_metadata(d):  # the Hub's imagefolder layout: metadata.csv with a file_name column
    (d / "metadata.csv").write_text("file_name,question,answer\na.png,What color?,red\na.png,What color?,red\n")


UNUSUAL = {"utf8-bom-json": _bom_json, "utf8-bom-jsonl": _bom_jsonl, "utf8-bom-csv": _bom_csv,
           "crlf-json": _crlf_json, "crlf-jsonl": _crlf_jsonl, "crlf-tsv": _crlf_tsv, "extra-keys": _extra_keys,
           "extra-columns": _extra_columns, "non-ascii-and-spaces-in-image-path": _non_ascii_and_spaces,
           "jsonl-named-json": _jsonl_named_json, "openai-content-parts": _openai_content_parts,
           "llamafactory-folder-with-dataset-info": _llamafactory_folder,
           "hf-imagefolder-metadata": _hf_imagefolder_metadata}


@pytest.mark.parametrize("case", list(UNUSUAL))
def test_valid_but_unusual_input_is_accepted(case, tmp_path):
    folder = tmp_path / case
    folder.mkdir()
    png(folder / "a.png")
    UNUSUAL[case](folder)
    report = validate(folder)
    assert report.ok, [str(p) for p in report.problems]
    assert [r.turns for r in report.records] == [[("What color?", "red")]] * 2
    assert all(r.image.is_file() for r in report.records)
    if case == "non-ascii-and-spaces-in-image-path":
        assert report.records[0].image.name == "ñandú 1 图.png"


def test_hub_layouts_pick_the_train_split(tmp_path):
    """Parquet shards train-0000x-of-N (+ a test split) and a DatasetDict.save_to_disk folder."""
    from datasets import Dataset, DatasetDict

    hub = tmp_path / "hub" / "data"
    rows = [{"id": str(i), "image": embedded(), "question": "What color?", "answer": "green"} for i in range(3)]
    parquet_set(hub, rows[:2], name="train-00000-of-00002.parquet")
    parquet_set(hub, rows[2:], name="train-00001-of-00002.parquet")
    parquet_set(hub, [rows[0]], name="test-00000-of-00001.parquet")
    report = validate(tmp_path / "hub")
    assert report.ok and len(report.records) == 3 and "2 shards" in report.format, report.format

    table = {"image": [embedded()] * 2, "question": ["What color?"] * 2, "answer": [3, 4]}  # counts as numbers
    ds = Dataset.from_dict(table)
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    report = validate(tmp_path / "dd")
    assert report.ok and "split 'train' of a DatasetDict" in report.format
    assert [r.answer for r in report.records] == ["3", "4"]


# ------------------------------------------------------------------------------------------ image modes

def _rgba():
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 0)  # transparent (red underneath): shown as the white background
    a[:, 4:] = (0, 0, 255, 255)
    return Image.fromarray(a, "RGBA"), {(0, 0): (255, 255, 255), (7, 0): (0, 0, 255)}


def _la():
    a = np.zeros((8, 8, 2), np.uint8)
    a[:, :4] = (0, 0)
    a[:, 4:] = (100, 255)
    return Image.fromarray(a, "LA"), {(0, 0): (255, 255, 255), (7, 0): (100, 100, 100)}


def _palette():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 30, 180, 30] + [0] * 762)
    im.paste(1, (4, 0, 8, 8))
    im.info["transparency"] = 0  # index 0 transparent
    return im, {(0, 0): (255, 255, 255), (7, 0): (30, 180, 30)}


def _gray16():
    a = np.zeros((8, 8), np.uint16)
    a[:, :3], a[:, 3:6], a[:, 6:] = 0, 32896, 65535  # 32896 = 128.5 * 256: mid-gray, not white
    return Image.fromarray(a, "I;16"), {(0, 0): (0, 0, 0), (4, 0): (128, 128, 128), (7, 0): (255, 255, 255)}


def _cmyk():
    return Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK"), {(8, 8): (200, 30, 30)}


def _exif_rotated():
    """Stored 32x16 (left half red, right half blue) with orientation 6: shown rotated 90° clockwise."""
    im = Image.new("RGB", (32, 16), (220, 30, 30))
    im.paste((30, 30, 220), (16, 0, 32, 16))
    return im, {(8, 4): (220, 30, 30), (8, 28): (30, 30, 220)}


def _animated_gif():
    frames = [Image.new("RGB", (8, 8), (220, 30, 30)), Image.new("RGB", (8, 8), (30, 30, 220))]
    return frames, {(4, 4): (220, 30, 30)}


def _webp():
    return Image.new("RGB", (8, 8), (30, 180, 30)), {(4, 4): (30, 180, 30)}


MODES = {"rgba": (_rgba, "PNG"), "la": (_la, "PNG"), "palette-transparent": (_palette, "PNG"),
         "gray-16bit": (_gray16, "PNG"), "cmyk-jpeg": (_cmyk, "JPEG"), "exif-rotated-jpeg": (_exif_rotated, "JPEG"),
         "webp": (_webp, "WEBP"), "gif-first-frame": (_animated_gif, "GIF")}


def image_bytes(case: str) -> tuple[bytes, dict]:
    make, fmt = MODES[case]
    im, expect = make()
    buf = io.BytesIO()
    if case == "gif-first-frame":
        im[0].save(buf, format="GIF", save_all=True, append_images=im[1:], duration=100, loop=0)
    elif case == "exif-rotated-jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(buf, format="JPEG", quality=95, exif=exif)
    elif fmt == "JPEG":
        im.save(buf, format="JPEG", quality=95)
    elif fmt == "WEBP":
        im.save(buf, format="WEBP", lossless=True)
    else:
        im.save(buf, format=fmt)
    return buf.getvalue(), expect


@pytest.mark.parametrize("container", ["file", "embedded"])
@pytest.mark.parametrize("case", list(MODES))
def test_every_common_image_mode_is_shown_as_a_viewer_would(case, container, tmp_path):
    blob, expect = image_bytes(case)
    if container == "file":
        name = f"img.{MODES[case][1].lower()}"
        (tmp_path / name).write_bytes(blob)
        (tmp_path / "data.csv").write_text(f"image,question,answer\n{name},What color?,red\n")
    else:
        parquet_set(tmp_path, [{"id": "1", "image": embedded(blob), "question": "What color?", "answer": "red"}])
    report = validate(tmp_path)
    assert report.ok, [str(p) for p in report.problems]
    rgb = load_image(report.records[0].image)
    assert rgb.mode == "RGB"
    if case == "exif-rotated-jpeg":
        assert rgb.size == (16, 32)  # portrait, as displayed
    tolerance = 12 if MODES[case][1] == "JPEG" else 1
    for (x, y), want in expect.items():
        got = rgb.getpixel((x, y))
        assert max(abs(g - w) for g, w in zip(got, want)) <= tolerance, (case, (x, y), got, want)


# ------------------------------------------------------------------------------------------------ export

def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("fmt", ["llava", "sharegpt", "parquet"])
def test_export_round_trips_through_the_loader(fmt, tmp_path):
    source = write_example("csv", tmp_path / "src", n=6, n_images=3)
    out = tmp_path / ("out.parquet" if fmt == "parquet" else "out")
    rc, stdout, err = run_cli("export-data", str(source), str(out), "--format", fmt)
    assert rc == 0, err
    assert "read 6 records (image / question / answer columns in CSV)" in stdout
    again = load_instruction_set(out)
    assert pairs(again.records) == REFERENCE
    assert [load_image(r.image).getpixel((20, 20)) for r in again.records[:3]] == [(220, 30, 30), (30, 180, 30),
                                                                                   (30, 30, 220)]
    if fmt != "parquet":
        assert len(list((out / "images").iterdir())) == 3  # each distinct image copied once
    else:
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(out), split="train")  # what other tools will do
        assert ds.features["images"].feature.__class__.__name__ == "Image"
        assert ds[0]["images"][0].size == (32, 32) and ds[0]["messages"][1]["content"] == "red"
    # an existing OUT is never overwritten; a broken set writes nothing
    rc, _, err = run_cli("export-data", str(source), str(out), "--format", fmt)
    assert rc == 2 and "already exists" in err
    (source / "data.csv").write_text("image,question,answer\nimages/img 0.png,What color?,\n")
    rc, _, err = run_cli("export-data", str(source), str(tmp_path / "never"), "--format", fmt)
    assert rc == 2 and err.startswith("error: data.csv, line 2, row 0") and "field 'answer'" in err
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


def test_flat_upload_of_a_csv_and_the_learn_tab_conversion(tmp_path):
    """The browser's flat file list (CSV + images) is staged and validated; the tab shows the detected format
    and its Convert button returns the set as a download."""
    from app.learn_tab import export_upload, report_markdown
    from llaca.jobs import stage_upload

    src = write_example("csv", tmp_path / "src", n=4, n_images=2)
    flat = [src / "data.csv", *sorted((src / "images").iterdir())]
    staged = stage_upload(flat, tmp_path / "staging", "train")
    report = validate(staged)
    assert report.ok and len(report.records) == 4
    assert "Detected: image / question / answer columns in CSV." in report_markdown(report, "training")
    studio = types.SimpleNamespace(home=tmp_path / "home")
    download = Path(export_upload(studio, str(staged), "sharegpt"))
    assert download.suffix == ".zip"
    shutil.unpack_archive(download, tmp_path / "unpacked")
    assert pairs(load_instruction_set(tmp_path / "unpacked").records) == pairs(report.records)


def test_a_stage_trains_on_a_parquet_set_with_embedded_images(llaca_home, tmp_path):
    """The tuner gets the same records from Parquet as from LLaVA JSON: a real 2-step stage becomes a version."""
    from llaca.train.tuner import StageConfig, run_stage
    from llaca.versions import Registry

    data = write_example("parquet", tmp_path / "pq", n=8, n_images=4)
    version = run_stage(StageConfig(data=str(data), method="llaca", parent="base", max_steps=2, batch_size=4,
                                    checkpoint_every=0, evaluate_after=False, name="from-parquet"), Registry())
    assert version.name == "from-parquet" and version.meta["stage"]["n_records"] == 8
    assert len(version.meta["stage"]["sha256"]) == 64


def test_formats_benchmark_smoke(tmp_path):
    """`python -m llaca.bench formats` end to end on a few rows: table, detection and the streaming check."""
    from llaca.bench import formats as bench

    out = tmp_path / "out"
    assert bench.main(["--rows", "12", "--images", "3", "--formats", "parquet", "--streaming", "csv",
                       "--out", str(out)]) == 0  # two child processes (each imports torch)
    saved = json.loads((out / "formats.json").read_text())
    assert saved["results"][0]["records"] == 12 and saved["streaming"][0]["py_peak_mb"] > 0
    md = (out / "formats.md").read_text()
    assert "| Parquet, embedded Image column" in md and "3 embedded image(s)" in md and "Streaming check" in md
