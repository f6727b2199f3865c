import json

import pytest

from lightning_qlora.tasks.data import get_task, read_rows


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


def test_every_bad_jsonl_line_is_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine", "label": 0})
    path.write_bytes(
        "\n".join([good, '{"text": "cut', good, "[1, 2]", good, '{"text": oops}']).encode() + b"\n\xff\xfe broken\n"
    )
    with pytest.raises(ValueError) as err:
        read_rows(path)
    message = str(err.value)
    assert "4 bad lines of 7" in message and "\n" not in message
    assert "2 malformed (lines 2, 6)" in message and "1 not an object (lines 4)" in message
    assert "1 not UTF-8 (lines 7)" in message and "re-save as UTF-8" in message


def test_undecodable_csv_names_the_byte(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(ValueError, match=r"not UTF-8 text at byte 14; re-save the file as UTF-8"):
        read_rows(path)


def _news(n: int, empty: set[int] = frozenset()) -> list[dict]:
    return [{"text": "" if i in empty else f"item {i}", "label": i % 4} for i in range(n)]


def test_a_few_empty_texts_are_dropped_and_counted(caplog):
    kept = get_task("ag_news").validate(_news(20, empty={3, 7}), "train")
    assert len(kept) == 18 and all(r["text"] for r in kept)
    assert "dropped 2 of 20 rows with an empty required field (rows 3, 7)" in caplog.text


def test_mostly_empty_texts_are_an_error_not_a_silent_drop():
    with pytest.raises(ValueError, match=r"train: 5 of 20 rows have an empty required field.*nothing was dropped"):
        get_task("ag_news").validate(_news(20, empty={0, 1, 2, 3, 4}), "train")


def test_duplicated_ids_are_counted(caplog):
    row = {"question": "q?", "context": {"contexts": ["c"]}, "long_answer": "a", "final_decision": "yes"}
    rows = [{**row, "pubid": i % 3} for i in range(5)]
    assert get_task("pubmedqa").validate(rows, "train") == rows
    assert "train: 2 rows repeat an earlier pubid (e.g. 0)" in caplog.text


def test_label_column_of_the_wrong_type():
    rows = [{"text": "a", "label": "Sports"}]
    with pytest.raises(ValueError, match=r"train row 0: label='Sports' is a str; the label column must hold integer"):
        get_task("ag_news").validate(rows, "train")
    with pytest.raises(ValueError, match=r"label=1.0 is a float"):
        get_task("ag_news").validate([{"text": "a", "label": 1.0}], "train")
