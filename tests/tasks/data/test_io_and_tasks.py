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
    two = {**good, "context": {"contexts": ["First part.", "Second part."]}, "question": "Does it work?"}
    prompt = (
        "Read the abstract and answer the question with yes, no or maybe, then explain.\n\n"
        "Abstract: First part. Second part.\n\nQuestion: Does it work?"
    )
    assert task.to_pair(two) == (prompt, "Yes. l")  # the contexts joined by a space, the question last
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
    rows = [{"text": "a", "label": "Sprots"}]
    with pytest.raises(ValueError, match=r"train row 0: label='Sprots' is a str that names no class; the label column"):
        get_task("ag_news").validate(rows, "train")
    with pytest.raises(ValueError, match=r"label=1.0 is a float"):
        get_task("ag_news").validate([{"text": "a", "label": 1.0}], "train")
    with pytest.raises(ValueError, match=r"label=4 is outside the label set \(0=World, 1=Sports"):
        get_task("ag_news").validate([{"text": "a", "label": 4}], "train")


def test_class_labels_are_ids_or_names_in_any_case():
    task = get_task("ag_news")
    assert [task.label({"label": v}) for v in (0, "3", " sports ", "SCI/TECH")] == [0, 3, 1, 3]


def test_financial_phrasebank_reads_sentence_and_takes_other_columns_from_the_config():
    from lightning_qlora.tasks.data.tasks import with_columns

    fpb = get_task("financial_phrasebank")
    assert fpb.text_field == "sentence" and fpb.label_names == ("negative", "neutral", "positive")
    with pytest.raises(ValueError, match="missing field 'sentence'"):
        fpb.validate([{"text": "Sales rose.", "label": 2}], "train")
    # An IMDB-style file: review text, named labels.
    imdb = with_columns(fpb, "review", "sentiment", ["neg", "pos"])
    rows = imdb.validate([{"review": "Dull.", "sentiment": "neg"}, {"review": "Great!", "sentiment": 1}], "train")
    assert [imdb.label(r) for r in rows] == [0, 1] and imdb.text_field == "review"
    with pytest.raises(ValueError, match="data.label_names=\\['x'\\] should name at least 2 classes"):
        with_columns(fpb, None, None, ["x"])
    with pytest.raises(ValueError, match="data.text_field applies to classification recipes"):
        with_columns(get_task("pubmedqa"), "body", None, None)


def test_majority_baseline_is_trains_majority_scored_on_the_evaluated_rows():
    fpb = get_task("financial_phrasebank")
    train = [{"label": label} for label in (1, 1, 1, 2, 0)]
    rows = [{"label": label} for label in (1, 2, 2, 0)]
    assert fpb.baseline_score(train, rows) == ("majority class", 0.25)  # 1 of 4 is neutral
    assert fpb.baseline_score([], rows) is None
