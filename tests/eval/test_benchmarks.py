"""Each benchmark adapter on a small file in its published layout, broken rows included."""

import json

import pytest

from deepeyes.agent.protocol import IMAGE_PLACEHOLDER
from deepeyes.data import RecordError
from deepeyes.eval.benchmarks import load_benchmark, multiple_choice
from deepeyes.tools.search import sha256_file
from tests.eval import formats


def load(tmp_path, layout, path, image_root=None, on_error="raise"):
    return load_benchmark(layout, layout, path, image_root, tmp_path / "cache", on_error)


def test_vstar_tsv_decodes_images_into_the_content_store(tmp_path):
    bench = load(tmp_path, "vstar", formats.vstar_tsv(tmp_path / "VStarBench.tsv"))
    first, second = bench.records
    assert first.id == "vstar-0" and first.answer == "A" and first.family == "direct_attributes"
    assert first.question == multiple_choice("What is the color of the cup?", {"A": "red", "B": "blue"})
    assert first.images[0].parent.parent == tmp_path / "cache"
    assert first.images[0].stem == sha256_file(first.images[0])
    assert second.metadata["category"] == "relative_position" and "C." not in second.question


def test_hrbench_row_may_name_an_earlier_rows_image(tmp_path):
    bench = load(tmp_path, "hrbench", formats.hrbench_tsv(tmp_path / "hr.tsv"))
    assert bench.records[0].images == bench.records[1].images
    assert [r.family for r in bench.records] == ["FSP", "FCP"]
    assert bench.records[1].metadata["cycle_category"] == "1"


def test_mme_realworld_json_categories_are_task_and_subtask(tmp_path):
    path = formats.mme_realworld_json(tmp_path / "mme.json", tmp_path / "imgs")
    bench = load(tmp_path, "mme_realworld", path, tmp_path / "imgs")
    assert [r.family for r in bench.records] == ["Perception/Remote Sensing", "Reasoning/Autonomous Driving"]
    assert bench.records[0].answer == "C" and "E. The image does not feature it." in bench.records[0].question
    assert bench.records[0].metadata["subcategory"] == "color"


def test_mathverse_uses_problem_version_and_falls_back_to_the_query(tmp_path):
    bench = load(tmp_path, "mathverse", formats.mathverse_json(tmp_path / "testmini.json", tmp_path), tmp_path)
    assert [r.family for r in bench.records] == ["Text Dominant", "Vision Only"]
    assert bench.records[1].question.startswith("According to the question shown in the image")
    assert bench.records[0].metadata["question_type"] == "free-form"


def test_mmsearch_keeps_alternatives_and_counts_text_only_questions(tmp_path):
    path = formats.mmsearch_parquet(tmp_path / "end2end.parquet")
    with pytest.raises(RecordError, match="query_image': no image") as err:
        load(tmp_path, "mmsearch", path)
    assert err.value.row == 3
    bench = load(tmp_path, "mmsearch", path, on_error="skip")
    assert bench.skipped == 1 and [r.family for r in bench.records] == ["news", "knowledge"]
    assert bench.records[0].metadata["alternative_answers"] == ["Lovelace"]


def test_realx_capability_tags(tmp_path):
    bench = load(tmp_path, "realx", formats.realx_json(tmp_path / "realx.json", tmp_path))
    assert [r.metadata["capabilities"] for r in bench.records] == [
        ["perception"], ["perception", "reasoning", "search"], ["perception", "search"]]
    assert bench.records[1].family == "perception+reasoning+search"


@pytest.mark.parametrize(
    "layout, make, problem",
    [
        ("vstar", lambda p: formats.write_tsv(p / "v.tsv", [{"index": 0, "image": "!!notbase64", "question": "q",
                                                             "A": "a", "B": "b", "answer": "A"}]), "neither base64"),
        ("vstar", lambda p: formats.write_tsv(p / "v.tsv", [{"index": 0, "image": formats.b64("red"), "question": "q",
                                                             "A": "a", "B": "b", "answer": "C"}]), "not one of the options"),
        ("hrbench", lambda p: formats.write_tsv(p / "h.tsv", [{"index": 0, "image": formats.b64("red"), "question": "q",
                                                               "A": "a", "answer": "A"}]), "fewer than two options"),
        ("realx", lambda p: (p / "r.json").write_text(json.dumps([{"id": "1", "question": "q", "answer": "a",
                                                                     "image": "x.png", "capabilities": ["vision"]}])),
         "unknown tag"),
        ("mathverse", lambda p: (p / "m.json").write_text(json.dumps([{"sample_index": "1", "question": "q",
                                                                        "answer": "1", "image": "gone.png"}])),
         "no image file"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, layout, make, problem):
    written = make(tmp_path)
    path = written if hasattr(written, "suffix") else next(tmp_path.glob("*.json"))
    with pytest.raises(RecordError, match=problem) as err:
        load(tmp_path, layout, path, tmp_path)
    assert (err.value.source, err.value.row) == (str(path), 1)


def test_inline_image_placeholder_is_moved_to_the_prompt_front(tmp_path):
    formats.write_tsv(tmp_path / "v.tsv", [{"index": 0, "image": formats.b64("red"), "question": "<image>\nWhat color?",
                                            "A": "red", "B": "blue", "answer": "A"}])
    [record] = load(tmp_path, "vstar", tmp_path / "v.tsv").records
    assert IMAGE_PLACEHOLDER not in record.question


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        load_benchmark("x", "coco", tmp_path / "x.tsv", None, tmp_path)
    with pytest.raises(FileNotFoundError, match="benchmark.path"):
        load_benchmark("x", "vstar", tmp_path / "x.tsv", None, tmp_path)


def test_vlmeval_hint_goes_before_the_question(tmp_path):
    formats.write_tsv(tmp_path / "v.tsv", [{"index": 0, "image": formats.b64("red"), "question": "Which?",
                                            "hint": "Look at the top left.", "A": "x", "B": "y", "answer": "B"}])
    [record] = load(tmp_path, "vstar", tmp_path / "v.tsv").records
    assert record.question.startswith("Hint: Look at the top left.\nWhich?\nOptions:\nA. x\nB. y")
