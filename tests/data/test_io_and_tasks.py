import json

import pytest

from lightning_qlora.data import get_task, read_rows


def test_jsonl_csv_and_parquet_read_the_same_rows(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.csv").write_text("text,label\na,0\nb,1\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_rows(tmp_path / "d.jsonl") == rows
    assert read_rows(tmp_path / "d.parquet") == rows
    assert read_rows(tmp_path / "d.csv") == [{"text": "a", "label": "0"}, {"text": "b", "label": "1"}]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl' does not exist; check data.path"):
        read_rows(tmp_path / "nope.jsonl")


def test_malformed_jsonl_line_is_named_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        read_rows(path)


def test_empty_file_and_unknown_format(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no rows"):
        read_rows(tmp_path / "e.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown format"):
        read_rows(tmp_path / "d.txt")


def test_pubmedqa_rows_are_checked_with_row_and_field():
    task = get_task("pubmedqa")
    good = {"question": "q?", "context": {"contexts": ["c"]}, "long_answer": "l", "final_decision": "yes"}
    task.validate([good], "train")
    assert task.to_pair(good) == (task.to_pair(good)[0], "Yes. l")
    with pytest.raises(ValueError, match=r"train row 1: missing field 'context.contexts'"):
        task.validate([good, {**good, "context": {}}], "train")
    with pytest.raises(ValueError, match=r"validation row 0: final_decision='perhaps' is not one of"):
        task.validate([{**good, "final_decision": "perhaps"}], "validation")


def test_unknown_task():
    with pytest.raises(ValueError, match="data.task='pubmed' is unknown"):
        get_task("pubmed")


@pytest.mark.parametrize("recipe", ["medical"])
def test_shipped_sample_fits_its_schema(recipe):
    task = get_task({"medical": "pubmedqa"}[recipe])
    for split, minimum in (("train", 200), ("validation", 50)):
        rows = read_rows(f"recipes/{recipe}/data/{split}.jsonl")
        assert len(rows) >= minimum
        task.validate(rows, split)
