"""The instruction-set loader, validator and training encoding."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from llaca import data as D
from llaca.models.llava import build_processor, train_tokenizer


@pytest.fixture(scope="module")
def processor():
    tok = train_tokenizer(["What color is the object? red green blue. Describe the image briefly."] * 20, 512)
    return build_processor(tok)


def make_set(root: Path, records: list, fmt: str = "json", images=("a.png",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (200, 30, 30)).save(root / name)
    if fmt == "json":
        (root / "data.json").write_text(json.dumps(records))
    else:
        (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root


def rec(i, image="a.png", q="<image>\nWhat color?", a="red"):
    return {"id": str(i), "image": image, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def test_valid_json_and_jsonl_and_zip(tmp_path):
    good = [rec(1), rec(2)]
    for fmt in ("json", "jsonl"):
        s = D.load_instruction_set(make_set(tmp_path / fmt, good, fmt))
        assert [r.id for r in s.records] == ["1", "2"]
        assert s.records[0].turns == [("What color?", "red")]
        assert len(s.sha256) == 64
    folder = make_set(tmp_path / "z", good)
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in folder.rglob("*"):
            zf.write(f, f"myset/{f.relative_to(folder)}")
    s = D.load_instruction_set(zpath)
    assert len(s) == 2


def test_every_problem_is_reported_with_record_and_field(tmp_path):
    bad = [
        rec(1),
        rec(1),  # duplicate id
        {"id": "3", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "4", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},
        {"id": "5", "image": "../a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "6", "image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"image": "a.png", "conversations": []},
    ]
    report = D.validate(make_set(tmp_path / "bad", bad))
    assert not report.ok
    text = "\n".join(str(p) for p in report.problems)
    assert "record 1 (id '1'), field 'id': duplicate id" in text
    assert "record 2 (id '3'), field 'image': file 'missing.png' not found" in text
    assert "record 3 (id '4')" in text and "no assistant answer" in text
    assert "record 4 (id '5'), field 'image'" in text and "escapes" in text
    assert "record 5 (id '6'), field 'conversations[0].value'" in text and "<image>" in text
    assert "record 6, field 'id': missing" in text
    assert "record 6, field 'conversations': missing or empty" in text
    with pytest.raises(D.InvalidDataset) as err:
        D.load_instruction_set(tmp_path / "bad")
    assert "data.json" in str(err.value)


def test_malformed_json_reports_line(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "data.jsonl").write_text(json.dumps(rec(1)) + "\n{not json\n")
    Image.new("RGB", (8, 8)).save(root / "a.png")
    report = D.validate(root)
    assert [str(p) for p in report.problems] == ["data.jsonl, line 2: malformed JSON: Expecting property name enclosed in double quotes (column 2)"]
    (root / "data.jsonl").unlink()
    (root / "data.json").write_text('{"id": 1}')
    assert "top level must be a list" in str(D.validate(root).problems[0])


def test_zip_traversal_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLACA_HOME", str(tmp_path / "home"))
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    report = D.validate(zpath)
    assert "points outside the archive" in str(report.problems[0])
    assert not (tmp_path / "evil.txt").exists()


def test_encoding_masks_everything_but_answers(tmp_path, processor):
    make_set(tmp_path, [])
    record = D.Record("x", tmp_path / "a.png", [("What color?", "red"), ("Describe the image briefly.", "a red square")])
    enc = D.RecordEncoder(processor).encode(record)
    ids, labels = enc["input_ids"], enc["labels"]
    # Training ids are exactly what the processor builds for the same rendered conversation.
    text, _ = D.RecordEncoder(processor).text_and_spans(record.turns)
    expected = processor(text=text, images=Image.open(tmp_path / "a.png"))["input_ids"][0]
    assert ids.tolist() == list(expected)
    trained = processor.tokenizer.decode(labels[labels != -100])
    assert trained == " red</s> a red square</s>"
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (labels[ids == image_id] == -100).all()
    assert enc["pixel_values"].shape == (3, 64, 64)


def test_token_limit_is_checked_with_processor(tmp_path, processor):
    long_q = "<image>\n" + "What color is the object? " * 40
    report = D.validate(make_set(tmp_path, [rec(1, q=long_q)]), D.Limits(max_tokens=64), processor=processor)
    assert "over the limit of 64" in str(report.problems[0]) and "field 'conversations'" in str(report.problems[0])


def test_collate_right_pads_and_rounds_the_length_up_to_a_multiple():
    import torch

    rows = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
            {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([-100, 9])}]
    plain = D.collate(rows, pad_token_id=0)
    assert plain["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    bucketed = D.collate(rows, pad_token_id=0, pad_to_multiple_of=4)
    assert bucketed["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert bucketed["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100]]
    assert bucketed["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert D.collate(rows, 0, pad_to_multiple_of=3)["input_ids"].shape == (2, 3)  # already a multiple
