"""Converters on files in the released DeepEyesV2 formats, made here, broken rows included."""

import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deepeyes.data import RecordError, read_records, read_sft_records
from deepeyes.data.converters import convert_image_search_cache, convert_sharegpt, convert_verl_parquet
from deepeyes.data.converters.verl import family_of
from deepeyes.tools import LocalImageSearch
from deepeyes.tools.search import sha256_file


def png_bytes(color):
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "sft_images"
    (root / "part0").mkdir(parents=True)
    for name, color in (("q.jpg", "red"), ("crop.jpg", "blue")):
        Image.new("RGB", (8, 8), color).save(root / "part0" / name)
    return root


def sft_sample(**changes):
    sample = {
        "messages": [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "<image>\nWhat color is the box?"},
            {"role": "assistant", "content": "<think>crop</think><code>\n```python\nimage_1.crop((0,0,4,4))\n```\n</code>"},
            {"role": "user", "content": "Code execution result:\nstdout:\n```\n\n```\n\nImages:\n<image>"},
            {"role": "assistant", "content": "<think>blue</think><answer>blue</answer>"},
        ],
        "images": ["part0/q.jpg", "part0/crop.jpg"],
    }
    return {**sample, **changes}


def test_sharegpt_converts_to_sft_records_with_hashes(tmp_path, image_folder):
    source = tmp_path / "sft_part_0.json"
    source.write_text(json.dumps([sft_sample(), sft_sample(images=[str(image_folder / "part0/q.jpg"),
                                                                    str(image_folder / "part0/crop.jpg")])]))
    out = tmp_path / "out" / "sft.jsonl"
    conversion = convert_sharegpt([source], image_folder, out)
    records = read_sft_records(out)
    assert [r.id for r in records] == ["sft_part_0-1", "sft_part_0-2"]
    assert records[0].images == (out.parent / "../sft_images/part0/q.jpg", out.parent / "../sft_images/part0/crop.jpg")
    assert records[0].data_source == "sft_part_0" and records[0].messages[-1].content.endswith("</answer>")
    assert records[1].images[0].resolve() == (image_folder / "part0/q.jpg").resolve()  # absolute paths kept
    manifest = json.loads(out.with_name("sft.jsonl.sha256.json").read_text())
    assert manifest["../sft_images/part0/q.jpg"] == sha256_file(image_folder / "part0/q.jpg")
    assert conversion.total_written == 2 and conversion.total_skipped == 0


@pytest.mark.parametrize(
    "sample, problem",
    [
        (sft_sample(images=["part0/q.jpg"]), r"2 <image> placeholder\(s\) but 1 image\(s\)"),
        (sft_sample(images=["part0/q.jpg", "part0/nope.jpg"]), "entry 1: no image file"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "'conversations' with from/value"),
        (sft_sample(messages=[{"role": "user", "content": "<image>q"}, {"role": "user", "content": "<image>"}]),
         "out of order"),
        ("not an object", "expected a JSON object"),
    ],
)
def test_sharegpt_bad_row_names_file_and_row(tmp_path, image_folder, sample, problem):
    source = tmp_path / "sft_part_3.json"
    source.write_text(json.dumps([sft_sample(), sample]))
    with pytest.raises(RecordError, match=problem) as err:
        convert_sharegpt([source], image_folder, tmp_path / "sft.jsonl")
    assert (err.value.source, err.value.row) == (str(source), 2)


def test_sharegpt_skip_counts_bad_rows_and_system_column(tmp_path, image_folder, caplog):
    source = tmp_path / "a.json"
    good = sft_sample()
    good["messages"] = good["messages"][1:]
    source.write_text(json.dumps([{**good, "system": "sys prompt"}, sft_sample(images=[]), sft_sample()]))
    with caplog.at_level(logging.WARNING):
        conversion = convert_sharegpt([source], image_folder, tmp_path / "sft.jsonl", on_error="skip")
    assert conversion.written == {str(source): 2} and conversion.skipped == {str(source): 1}
    assert f"{source}:2" in caplog.text
    first = read_sft_records(tmp_path / "sft.jsonl")[0]
    assert first.messages[0].role == "system" and first.messages[0].content == "sys prompt"


def test_sharegpt_file_that_is_not_an_array(tmp_path, image_folder):
    source = tmp_path / "bad.json"
    source.write_text('{"messages": []}')
    with pytest.raises(RecordError, match="expected a JSON array"):
        convert_sharegpt([source], image_folder, tmp_path / "sft.jsonl")


def verl_row(index, question="What color is the square?", image=None, **changes):
    row = {
        "data_source": "fvqa",
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"<image>\n{question}"}],
        "images": [{"bytes": image if image is not None else png_bytes("red"), "path": None}],
        "ability": "search",
        "env_name": "deepeyesv2",
        "reward_model": {"ground_truth": "red", "style": "model"},
        "extra_info": {"index": f"fvqa_train_{index}", "question": question, "answer": "red", "split": "train"},
    }
    return {**row, **changes}


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_concatenates_files_and_stores_images_by_hash(tmp_path):
    first = write_parquet(tmp_path / "perception_all_1.parquet", [verl_row(0), verl_row(1, image=png_bytes("blue"))])
    plain = verl_row(2, question="How many?")
    plain["extra_info"] = {"index": 7}
    plain["prompt"][1]["content"] = "<image>\nHow many dots?\n\nYou must put your answer inside <answer> </answer> " \
        "tags, i.e., <answer> answer here </answer>. Please reason step by step. Use Python code to process the " \
        "image if necessary. You can conduct search to seek the Internet. Format strictly as <think> </think> " \
        "<code> </code> (if code is neededs) or <think> </think> <tool_call> </tool_call> (if function call is " \
        "neededs) or <think> <think> <answer> </answer>."
    plain["reward_model"] = {"ground_truth": 3}
    second = write_parquet(tmp_path / "reason.parquet", [plain])
    out = tmp_path / "rl" / "train.jsonl"
    conversion = convert_verl_parquet([first, second], out)
    records = read_records(out)
    assert [r.id for r in records] == ["fvqa-fvqa_train_0", "fvqa-fvqa_train_1", "fvqa-7"]
    assert [r.family for r in records] == ["perception", "perception", "reason"]
    assert records[2].question == "How many dots?" and records[2].answer == "3"
    assert records[0].metadata["image_sha256"] == [sha256_file(records[0].images[0])]
    assert records[0].metadata["env_name"] == "deepeyesv2" and records[0].metadata["source_row"] == 1
    assert records[0].images[0].name == f"{records[0].metadata['image_sha256'][0]}.png"
    assert records[0].images[0] != records[1].images[0]
    assert conversion.total_written == 3


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"reward_model": {"style": "rule"}}, "ground_truth': missing"),
        ({"images": [{"bytes": b"not an image", "path": None}]}, "entry 0: image bytes do not decode"),
        ({"images": [{"bytes": None, "path": "missing.png"}]}, "entry 0: no image file"),
        ({"data_source": ""}, "'data_source'"),
        ({"images": []}, r"1 <image> placeholder\(s\) but 0 image\(s\)"),
    ],
)
def test_verl_bad_row_names_file_and_row(tmp_path, changes, problem):
    source = write_parquet(tmp_path / "search.parquet", [verl_row(0), verl_row(1, **changes)])
    with pytest.raises(RecordError, match=problem) as err:
        convert_verl_parquet([source], tmp_path / "train.jsonl")
    assert (err.value.source, err.value.row) == (str(source), 2)


def test_verl_duplicate_index_across_files_is_a_bad_row(tmp_path, caplog):
    a = write_parquet(tmp_path / "search_1.parquet", [verl_row(0)])
    b = write_parquet(tmp_path / "search_2.parquet", [verl_row(5), verl_row(0)])
    with pytest.raises(RecordError, match=r"duplicate id 'fvqa-fvqa_train_0' \(first at .*search_1.parquet:1\)"):
        convert_verl_parquet([a, b], tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING):
        conversion = convert_verl_parquet([a, b], tmp_path / "train.jsonl", on_error="skip")
    assert conversion.skipped == {str(a): 0, str(b): 1} and len(read_records(tmp_path / "train.jsonl")) == 2


def test_family_from_released_file_names():
    assert [family_of(name) for name in ("perception_all_3.parquet", "reason.parquet", "search.parquet")] == \
        ["perception", "reason", "search"]


def test_image_search_cache_becomes_an_index_keyed_by_image_hash(tmp_path, caplog):
    rl = tmp_path / "rl" / "train.jsonl"
    convert_verl_parquet([write_parquet(tmp_path / "search.parquet", [verl_row(0), verl_row(1, image=png_bytes("blue"))])], rl)
    cached = tmp_path / "cached_images"
    cached.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4), "green").save(cached / name)
    cache = tmp_path / "fvqa_train_image_search_results_cache.json"
    cache.write_text(json.dumps({
        "fvqa_train_0": {"tool_returned_web_title": ["Red square", "Gone", "Null"],
                         "cached_images_path": ["a.jpg", "missing.jpg", None]},
        "fvqa_train_1": {"tool_returned_web_title": ["Blue"], "cached_images_path": ["b.jpg"]},
        "fvqa_train_9": {"tool_returned_web_title": [], "cached_images_path": []},
    }))
    out = tmp_path / "rl" / "image_index.jsonl"
    with pytest.raises(RecordError, match="'fvqa_train_9': no record") as err:
        convert_image_search_cache(cache, cached, rl, out)
    assert err.value.row == 3
    with caplog.at_level(logging.WARNING):
        conversion = convert_image_search_cache(cache, cached, rl, out, on_error="skip")
    assert conversion.skipped == {str(cache): 1, f"{cache}#results": 2}
    index = LocalImageSearch.from_jsonl(out)
    first = read_records(rl)[0]
    [(title, image)] = index.search(first.images[0])
    assert title == "Red square" and image.resolve() == (cached / "a.jpg").resolve()


def test_image_search_cache_keeps_every_pair_whose_image_exists_as_the_release_does(tmp_path, caplog):
    """search_utils.py:55-59 never checks a title: a null one is kept (and shows as "None"); a
    result without its image, or a title or path without its partner, is left out and counted."""
    rl = tmp_path / "rl" / "train.jsonl"
    convert_verl_parquet([write_parquet(tmp_path / "search.parquet", [verl_row(0)])], rl)
    cached = tmp_path / "cached_images"
    cached.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (4, 4), "green").save(cached / name)
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({"fvqa_train_0": {
        "tool_returned_web_title": [None, 3, "Gone", "Kept", "No path"],
        "cached_images_path": ["a.jpg", "b.jpg", "missing.jpg", "c.jpg"],
    }}))
    out = tmp_path / "rl" / "image_index.jsonl"
    with caplog.at_level(logging.WARNING):
        conversion = convert_image_search_cache(cache, cached, rl, out)
    assert conversion.skipped == {str(cache): 0, f"{cache}#results": 2} and "left out 2 results" in caplog.text
    hits = LocalImageSearch.from_jsonl(out).search(read_records(rl)[0].images[0], 10)
    assert [(title, image.name) for title, image in hits] == [("None", "a.jpg"), ("3", "b.jpg"), ("Kept", "c.jpg")]


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"tool_returned_web_title": "a"}, "must both be lists"),
        ({"cached_images_path": ["a.jpg"]}, "must both be lists"),
        (["a.jpg"], "expected an object, got list"),
    ],
)
def test_image_search_cache_bad_entries(tmp_path, entry, problem):
    rl = tmp_path / "train.jsonl"
    convert_verl_parquet([write_parquet(tmp_path / "search.parquet", [verl_row(0)])], rl)
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({"fvqa_train_0": entry}))
    with pytest.raises(RecordError, match=problem) as err:
        convert_image_search_cache(cache, tmp_path, rl, tmp_path / "index.jsonl")
    assert (err.value.source, err.value.row) == (str(cache), 1)


def test_verl_question_from_content_parts_when_extra_info_has_none(tmp_path):
    row = verl_row(0)
    row["extra_info"] = {"index": 3}
    row["prompt"] = [{"role": "user", "content": [{"type": "image", "text": None},
                                                  {"type": "text", "text": "\nWhich way is the arrow pointing?"}]}]
    [record] = read_records(convert_verl_parquet([write_parquet(tmp_path / "p.parquet", [row])], tmp_path / "o.jsonl").output)
    assert record.question == "Which way is the arrow pointing?"
