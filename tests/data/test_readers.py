import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepeyes.data import Message, Record, RecordError, SFTRecord, read_records, read_sft_records
from deepeyes.data import write_records, write_sft_records


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / name)
    return tmp_path


def good_record(**changes):
    row = {"id": "t-1", "question": "What is 2 + 2?", "images": ["images/a.png"], "answer": "4", "family": "arithmetic"}
    return {**row, **changes}


def good_sft(**changes):
    row = {
        "id": "s-1",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "<image>\nq"},
            {"role": "assistant", "content": "<think> t </think>\n<code>\n```python\nx\n```\n</code>"},
            {"role": "user", "content": "Images:\n<image>"},
            {"role": "assistant", "content": "<answer>4</answer>"},
        ],
        "images": ["images/a.png", "images/b.png"],
    }
    return {**row, **changes}


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def without(row, key):
    return {k: v for k, v in row.items() if k != key}


def test_reads_records_and_resolves_images_against_the_file(image_dir):
    path = write_lines(image_dir / "tasks.jsonl", [good_record(metadata={"op": "+"})])
    [record] = read_records(path)
    assert record == Record("t-1", "What is 2 + 2?", (image_dir / "images" / "a.png",), "4", "arithmetic",
                            metadata={"op": "+"})


@pytest.mark.parametrize(
    "row, key, problem",
    [
        (without(good_record(), "answer"), "answer", "missing"),
        (good_record(answer=4), "answer", "expected str, got int"),
        (good_record(images="images/a.png"), "images", "expected list"),
        (good_record(images=["images/missing.png"]), "images", "no image file"),
        (good_record(images=[3]), "images", "not a path"),
        (good_record(anwser="4"), "anwser", "unknown key"),
        (good_record(metadata=[1]), "metadata", "expected dict"),
        (good_record(images=["images/a.png", "images/b.png"]), "question", "1 <image> placeholder(s) but 2 image(s)"),
        (good_record(question="<image> and <image>"), "question", "3 <image> placeholder(s) but 1 image(s)"),
    ],
)
def test_bad_record_names_file_row_and_key(image_dir, row, key, problem):
    path = write_lines(image_dir / "tasks.jsonl", [good_record(id="ok"), row])
    with pytest.raises(RecordError) as caught:
        read_records(path)
    assert str(caught.value).startswith(f"{path}:2: key {key!r}")
    assert problem in str(caught.value)
    assert (caught.value.row, caught.value.source) == (2, str(path))


@pytest.mark.parametrize(
    "line, problem",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")],
)
def test_unparsable_row_names_file_and_row(image_dir, line, problem):
    path = write_lines(image_dir / "tasks.jsonl", [good_record(), line])
    with pytest.raises(RecordError, match=f"^{path}:2: {problem}"):
        read_records(path)


def test_duplicate_id_is_an_error(image_dir):
    path = write_lines(image_dir / "tasks.jsonl", [good_record(), good_record()])
    with pytest.raises(RecordError, match=f"^{path}:2: key 'id': duplicate id 't-1'"):
        read_records(path)


def test_rows_are_line_numbers_and_blank_lines_are_not_rows(image_dir):
    path = write_lines(image_dir / "tasks.jsonl", [good_record(id="a"), "", good_record(id="b", answer=None)])
    with pytest.raises(RecordError, match=f"^{path}:3: key 'answer'"):
        read_records(path)


def test_skip_mode_counts_and_logs_every_bad_row(image_dir, caplog):
    rows = [good_record(id="a"), good_record(id="b", answer=1), "{", good_record(id="c"), good_record(id="a")]
    path = write_lines(image_dir / "tasks.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="deepeyes.data.readers"):
        records, skipped = read_records(path, on_error="skip")
    assert [record.id for record in records] == ["a", "c"]
    assert skipped == 3
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if m.startswith("skipping")] == [
        f"skipping bad row: {path}:2: key 'answer': expected str, got int",
        f"skipping bad row: {path}:3: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        f"skipping bad row: {path}:5: key 'id': duplicate id 'a'",
    ]
    assert messages[-1] == f"{path}: skipped 3 of 5 rows"


def test_skip_mode_on_a_clean_file_returns_zero(image_dir):
    path = write_lines(image_dir / "tasks.jsonl", [good_record()])
    records, skipped = read_records(path, on_error="skip")
    assert (len(records), skipped) == (1, 0)


def test_unknown_on_error_is_rejected(image_dir):
    path = write_lines(image_dir / "tasks.jsonl", [good_record()])
    with pytest.raises(ValueError, match="on_error"):
        read_records(path, on_error="ignore")


def test_parquet_records(image_dir):
    rows = [good_record(id="a"), good_record(id="b", images=["images/missing.png"])]
    path = image_dir / "tasks.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(RecordError, match=f"^{path}:2: key 'images'"):
        read_records(path)
    records, skipped = read_records(path, on_error="skip")
    assert [record.images for record in records] == [(image_dir / "images" / "a.png",)]
    assert skipped == 1


def test_write_then_read_round_trips(image_dir):
    record = Record("t", "q", (image_dir / "images" / "a.png",), "x", "perception", metadata={"k": [1]})
    sft = SFTRecord("s", (Message("user", "<image>"), Message("assistant", "a")), record.images, "perception")
    write_records(image_dir / "r.jsonl", [record])
    write_sft_records(image_dir / "s.jsonl", [sft])
    assert json.loads((image_dir / "r.jsonl").read_text())["images"] == ["images/a.png"]
    assert read_records(image_dir / "r.jsonl") == [record]
    assert read_sft_records(image_dir / "s.jsonl") == [sft]


def test_reads_sft_records(image_dir):
    [record] = read_sft_records(write_lines(image_dir / "sft.jsonl", [good_sft()]))
    assert [m.role for m in record.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert record.images == (image_dir / "images" / "a.png", image_dir / "images" / "b.png")
    assert (record.family, record.data_source) == ("unknown", "sample")


def messages_with(index, **changes):
    messages = [dict(m) for m in good_sft()["messages"]]
    messages[index].update(changes)
    return messages


@pytest.mark.parametrize(
    "row, problem",
    [
        (without(good_sft(), "messages"), "key 'messages': missing"),
        (good_sft(images=["images/a.png"]), "key 'messages': 2 <image> placeholder(s) but 1 image(s)"),
        (good_sft(messages=messages_with(2, role="user")), "key 'messages': message 2: role 'user' out of order, expected 'assistant'"),
        (good_sft(messages=messages_with(0, role="assistant")), "key 'messages': message 0: role 'assistant' out of order, expected 'user'"),
        (good_sft(messages=messages_with(1, role="tool")), "key 'messages': message 1: role 'tool' is not one of"),
        (good_sft(messages=messages_with(1, content=["x"])), "key 'messages': message 1: content is list, not str"),
        (good_sft(messages=good_sft()["messages"][:4]), "key 'messages': must end with an assistant message"),
        (good_sft(messages=[{"role": "user"}]), "key 'messages': message 0: expected an object with exactly"),
        (good_sft(images=["images/a.png", "images/c.png"]), "key 'images': entry 1: no image file"),
        (good_sft(family=3), "key 'family': expected str, got int"),
    ],
)
def test_bad_sft_record_names_file_row_and_key(image_dir, row, problem):
    path = write_lines(image_dir / "sft.jsonl", [good_sft(id="ok"), row])
    with pytest.raises(RecordError) as caught:
        read_sft_records(path)
    assert str(caught.value).startswith(f"{path}:2: {problem}")


def test_sft_skip_mode(image_dir):
    path = write_lines(image_dir / "sft.jsonl", [good_sft(id="a"), good_sft(id="b", images=[])])
    records, skipped = read_sft_records(path, on_error="skip")
    assert ([r.id for r in records], skipped) == (["a"], 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.sampled_from(["images/a.png", "<image>", "user", "assistant", "system", "x"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["role", "content", "k"]), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    row=st.dictionaries(
        st.sampled_from(["id", "question", "images", "answer", "family", "metadata", "messages", "data_source", "extra"]),
        json_values,
    ),
    patch=st.sampled_from([good_record(), good_sft(), {}]),
)
def test_any_json_row_is_either_read_or_a_record_error(image_dir, row, patch):
    path = write_lines(image_dir / "fuzz.jsonl", [{**patch, **row}])
    for reader in (read_records, read_sft_records):
        try:
            reader(path)
        except RecordError as error:
            assert str(error).startswith(f"{path}:1: ")
