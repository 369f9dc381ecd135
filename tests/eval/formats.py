"""Small benchmark files in each published layout, made here (no benchmark data is copied)."""

import base64
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(color, size=(16, 16)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def b64(color):
    return base64.b64encode(png(color)).decode()


def write_tsv(path, rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def vstar_tsv(path):
    """VLMEvalKit VStarBench.tsv: base64 images, options A-D, letter answers."""
    return write_tsv(path, [
        {"index": 0, "image": b64("red"), "question": "What is the color of the cup?", "A": "red", "B": "blue",
         "C": "", "D": "", "answer": "A", "category": "direct_attributes"},
        {"index": 1, "image": b64("blue"), "question": "Is the cup on the left or right of the dog?", "A": "left",
         "B": "right", "C": "", "D": "", "answer": "B", "category": "relative_position"},
    ])


def hrbench_tsv(path):
    """hr_bench_4k.tsv: the second row names the first row's image by its index."""
    return write_tsv(path, [
        {"index": 10, "question": "What is written on the sign?", "answer": "C", "category": "FSP",
         "cycle_category": "0", "A": "OPEN", "B": "SHUT", "C": "EXIT", "D": "STOP", "image": b64("green")},
        {"index": 11, "question": "How many boats are there?", "answer": "A", "category": "FCP",
         "cycle_category": "1", "A": "3", "B": "4", "C": "5", "D": "6", "image": "10"},
    ])


def mme_realworld_json(path, image_root):
    (image_root / "remote_sensing").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "gray").save(image_root / "remote_sensing" / "0001.png")
    path.write_text(json.dumps([
        {"Question_id": "perception/remote_sensing/color/0001", "Image": "remote_sensing/0001.png",
         "Text": "What color is the roof of the building?", "Question Type": "Multiple Choice",
         "Answer choices": ["(A) red", "(B) blue", "(C) gray", "(D) white", "(E) The image does not feature it."],
         "Ground truth": "C", "Category": "color", "Subtask": "Remote Sensing", "Task": "Perception"},
        {"Question_id": "reasoning/autonomous_driving/intention/0002", "Image": "remote_sensing/0001.png",
         "Text": "What will the car do next?", "Question Type": "Multiple Choice",
         "Answer choices": ["(A) stop", "(B) turn left", "(C) go straight", "(D) turn right", "(E) reverse"],
         "Ground truth": "A", "Category": "intention", "Subtask": "Autonomous Driving", "Task": "Reasoning"},
    ]))
    return path


def mathverse_json(path, image_root):
    (image_root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "white").save(image_root / "images" / "image_1.png")
    path.write_text(json.dumps([
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": "As shown in the figure, AB is 3 and BC is 4. Find AC.", "image": "images/image_1.png",
         "answer": "5", "question_type": "free-form", "metadata": {"subject": "plane geometry"},
         "query_wo": "...", "query_cot": "...", "question_for_eval": "..."},
        {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only", "question": "",
         "image": "images/image_1.png", "answer": "B", "question_type": "multi-choice", "metadata": {},
         "query_wo": "According to the question shown in the image, please directly answer the question.",
         "query_cot": "...", "question_for_eval": ""},
    ]))
    return path


def mmsearch_parquet(path):
    """End-to-end split; the third question has no image."""
    rows = [
        {"sample_id": "news_0", "query": "Who won the race shown in the image?", "query_image": {"bytes": png("red"), "path": None},
         "area": "news", "subfield": "sports", "gt_answer": "Ada Lovelace", "alternative_gt_answers": ["Lovelace"]},
        {"sample_id": "knowledge_0", "query": "In which year was this building finished?",
         "query_image": {"bytes": png("blue"), "path": None}, "area": "knowledge", "subfield": "architecture",
         "gt_answer": "1889", "alternative_gt_answers": []},
        {"sample_id": "news_1", "query": "When is the next solar eclipse?", "query_image": None,
         "area": "news", "subfield": "science", "gt_answer": "2027", "alternative_gt_answers": []},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def realx_json(path, image_root):
    (image_root / "realx").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "yellow").save(image_root / "realx" / "1.png")
    path.write_text(json.dumps([
        {"id": "1", "question": "What brand is the logo?", "answer": "Acme", "image": "realx/1.png",
         "capabilities": ["perception"]},
        {"id": "2", "question": "How much older is this tower than the bridge behind it?", "answer": "12",
         "image": "realx/1.png", "capabilities": "perception,reasoning,search"},
        {"id": "3", "question": "Who designed it?", "answer": "Eiffel", "image": ["realx/1.png"],
         "capabilities": ["search", "perception"]},
    ]))
    return path


def all_benchmarks(tmp_path):
    """(name, format, path, image_root) for one small file per adapter."""
    root = tmp_path / "bench"
    root.mkdir(exist_ok=True)
    return [
        ("vstar", "vstar", vstar_tsv(root / "VStarBench.tsv"), None),
        ("hrbench", "hrbench", hrbench_tsv(root / "hr_bench_4k.tsv"), None),
        ("mme_realworld", "mme_realworld", mme_realworld_json(root / "MME_RealWorld.json", root / "mme"), root / "mme"),
        ("mathverse", "mathverse", mathverse_json(root / "testmini.json", root / "mv"), root / "mv"),
        ("mmsearch", "mmsearch", mmsearch_parquet(root / "end2end.parquet"), None),
        ("realx", "realx", realx_json(root / "realx_bench.json", root), None),
    ]
