"""Benchmark adapters: each published layout → `Record`s the agent loop runs on.

Every adapter returns records whose `family` is the category scores are broken down by, whose
`data_source` is the benchmark, and whose metadata keeps what the report needs (`category`,
RealX-Bench `capabilities`, MMSearch `alternative_answers`). Images embedded as base64 or bytes are
written once into a content-addressed `ImageStore`; image paths are kept otherwise. A bad row
raises `RecordError(file, row, ...)`, or with on_error="skip" is logged and counted.

Layouts (rows numbered from 1; TSV rows after the header line):

- `records`: our own schema (`deepeyes.data.schema`), e.g. the bundled sample test split.
- `vstar`, `hrbench`, `mme_realworld` (.tsv): the VLMEvalKit TSVs DeepEyesV2 evaluates with:
  `index, image (base64, or the index of a row holding it), question, A, B, C, D[, E], answer,
  category[, hint, l2-category, cycle_category]`. V*: category direct_attributes / relative_position;
  HRBench: FSP / FCP; MME-RealWorld: category (+ l2-category).
- `mme_realworld` (.json): the published annotation list `{"Question_id", "Image", "Text",
  "Answer choices": ["(A) ..", ...], "Ground truth", "Category", "Subtask", "Task"}`; category
  is `Task/Subtask`.
- `mathverse` (.json): `testmini.json` rows `{"sample_index", "problem_version", "question",
  "image", "answer", "question_type", "query_wo", ...}`; category is the problem version.
- `mmsearch` (.parquet): the end-to-end split `{"sample_id", "query", "query_image": {"bytes"},
  "area", "subfield", "gt_answer", "alternative_gt_answers"}`; category is the area. Our prompt
  always shows an image, so questions without one are bad rows (counted with on_error="skip").
- `realx` (.json / .jsonl): rows `{"id"|"index", "question", "answer", "image": path | [paths],
  "capabilities": ["perception", "reasoning", "search"] | "perception,search"}`. RealX-Bench's
  release layout was not available to check against; this is the paper's description.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepeyes.data.image_store import ImageStore
from deepeyes.data.converters.rows import Conversion, OnError, RowProblem, parquet_rows, parse_rows
from deepeyes.data.readers import _jsonl_rows, _parse_record, read_records
from deepeyes.data.schema import IMAGE_PLACEHOLDER, Record, RecordError

CAPABILITIES = ("perception", "reasoning", "search")
OPTION_LETTERS = "ABCDEFGH"
FORMATS = ("records", "realx", "vstar", "hrbench", "mme_realworld", "mathverse", "mmsearch")


@dataclass
class Benchmark:
    name: str
    records: list[Record]
    skipped: int = 0  # bad rows left out with on_error="skip"


def load_benchmark(
    name: str, layout: str, path: Path, image_root: Path | None, cache_dir: Path, on_error: OnError = "raise"
) -> Benchmark:
    """The benchmark at `path` in `layout` (one of FORMATS); relative image paths resolve against
    `image_root` (default: the file's directory); embedded images go to `cache_dir`."""
    path = Path(path)
    if layout not in FORMATS:
        raise ValueError(f"benchmark format {layout!r}: expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {name}: no file at {path} (benchmark.path)")
    if layout == "records":
        if on_error == "skip":
            records, skipped = read_records(path, on_error="skip")
            return Benchmark(name, records, skipped)
        return Benchmark(name, read_records(path))
    context = _Context(name, Path(image_root or path.parent), ImageStore(cache_dir))
    if layout == "mme_realworld" and path.suffix == ".json":
        rows, parse = _json_rows(path), context.mme_realworld_json
    elif layout in ("vstar", "hrbench", "mme_realworld"):
        rows, parse = _tsv_rows(path), context.vlmeval_mcq
    elif layout == "mathverse":
        rows, parse = _json_rows(path), context.mathverse
    elif layout == "mmsearch":
        rows, parse = parquet_rows(path), context.mmsearch
    else:
        rows, parse = _json_rows(path), context.realx
    conversion = Conversion(path)
    seen: set[str] = set()

    def unique(row: int, value: Any) -> Record:
        record = parse(row, value)
        if record.id in seen:
            raise RowProblem(f"duplicate question id {record.id!r}")
        seen.add(record.id)
        return record

    records = list(parse_rows(path, rows, unique, on_error, conversion))
    return Benchmark(name, records, conversion.total_skipped)


def multiple_choice(question: str, options: dict[str, str], hint: str = "") -> str:
    """The question with its lettered options, as VLMEvalKit's MCQ prompt lays them out."""
    lines = [f"Hint: {hint.strip()}"] if hint.strip() else []
    lines += [question.strip(), "Options:"] + [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines) + "\nPlease select the correct answer from the options above."


class _Context:
    def __init__(self, name: str, image_root: Path, store: ImageStore):
        self.name, self.image_root, self.store = name, image_root, store
        self._tsv_images: dict[str, str] = {}

    def record(self, key: Any, question: str, images: list[Path], answer: Any, category: str, **metadata) -> Record:
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise RowProblem("no answer")
        # Some layouts mark the image inline; our prompt shows it first, once.
        question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        fields = {
            "id": f"{self.name}-{key}",
            "question": question,
            "images": [str(image) for image in images],
            "answer": str(answer).strip(),
            "family": category or "all",
            "data_source": self.name,
            "metadata": {"category": category or "all", **metadata},
        }
        return _parse_record(fields, Path("/"))

    def path(self, value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise RowProblem(f"key {what!r}: expected an image path, got {value!r:.40}")
        resolved = self.image_root / value
        if not resolved.is_file():
            raise RowProblem(f"key {what!r}: no image file at {resolved}")
        return resolved.resolve()

    def image_bytes(self, data: bytes, what: str) -> Path:
        try:
            return self.store.put(data)
        except ValueError as err:
            raise RowProblem(f"key {what!r}: {err}") from None

    def vlmeval_mcq(self, row: int, value: dict[str, str]) -> Record:
        index = value.get("index") or str(row)
        image = value.get("image") or ""
        if image:
            # VLMEvalKit stores an image once; later rows may name the row that holds it.
            if len(image) <= 64 and image in self._tsv_images:
                image = self._tsv_images[image]
            self._tsv_images[index] = image
            try:
                images = [self.image_bytes(base64.b64decode(image, validate=True), "image")]
            except binascii.Error:
                raise RowProblem("key 'image': neither base64 image data nor the index of an earlier row") from None
        elif value.get("image_path"):
            images = [self.path(value["image_path"], "image_path")]
        else:
            raise RowProblem("key 'image': missing (and no image_path)")
        options = {letter: value[letter] for letter in OPTION_LETTERS if (value.get(letter) or "").strip()}
        if len(options) < 2:
            raise RowProblem("fewer than two options in columns A, B, ...")
        answer = (value.get("answer") or "").strip().strip("()")
        if answer not in options:
            raise RowProblem(f"key 'answer': {value.get('answer')!r} is not one of the options {', '.join(options)}")
        extra = {key: value[key] for key in ("l2-category", "cycle_category") if value.get(key)}
        question = multiple_choice(value.get("question") or "", options, value.get("hint") or "")
        return self.record(index, question, images, answer,
                           value.get("category", ""), **extra)

    def mme_realworld_json(self, row: int, value: Any) -> Record:
        value = _object(value)
        choices = value.get("Answer choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise RowProblem("key 'Answer choices': expected a list of '(A) ...' options")
        options = {}
        for position, choice in enumerate(choices):
            letter = OPTION_LETTERS[position]
            text = str(choice).strip()
            options[letter] = text[3:].strip() if text.startswith(f"({letter})") else text
        answer = str(value.get("Ground truth", "")).strip().strip("()")
        if answer not in options:
            raise RowProblem(f"key 'Ground truth': {value.get('Ground truth')!r} is not one of the options")
        category = "/".join(str(value[k]) for k in ("Task", "Subtask") if value.get(k))
        return self.record(value.get("Question_id", row), multiple_choice(str(value.get("Text", "")), options),
                           [self.path(value.get("Image"), "Image")], answer, category,
                           subcategory=str(value.get("Category", "")))

    def mathverse(self, row: int, value: Any) -> Record:
        value = _object(value)
        question = value.get("question") or value.get("query_wo") or ""
        if not isinstance(question, str) or not question.strip():
            raise RowProblem("keys 'question' / 'query_wo': no question text")
        return self.record(value.get("sample_index", row), question, [self.path(value.get("image"), "image")],
                           value.get("answer"), str(value.get("problem_version", "")),
                           question_type=str(value.get("question_type", "")))

    def mmsearch(self, row: int, value: Any) -> Record:
        image = value.get("query_image")
        if not isinstance(image, dict) or not image.get("bytes"):
            raise RowProblem("key 'query_image': no image (text-only questions cannot be asked with our prompt)")
        alternatives = value.get("alternative_gt_answers") or []
        if not isinstance(alternatives, list) or not all(isinstance(a, str) for a in alternatives):
            raise RowProblem("key 'alternative_gt_answers': expected a list of strings")
        return self.record(value.get("sample_id", row), str(value.get("query") or ""),
                           [self.image_bytes(image["bytes"], "query_image")], value.get("gt_answer"),
                           str(value.get("area", "")), alternative_answers=alternatives,
                           subfield=str(value.get("subfield", "")))

    def realx(self, row: int, value: Any) -> Record:
        value = _object(value)
        raw = value.get("capabilities", value.get("category"))
        tags = raw.replace("+", ",").split(",") if isinstance(raw, str) else raw
        if not isinstance(tags, list) or not tags:
            raise RowProblem("key 'capabilities': expected a list of perception / reasoning / search")
        tags = sorted({str(tag).strip().lower() for tag in tags})
        unknown = [tag for tag in tags if tag not in CAPABILITIES]
        if unknown:
            raise RowProblem(f"key 'capabilities': unknown tag(s) {unknown} (known: {', '.join(CAPABILITIES)})")
        images = value.get("image", value.get("images"))
        images = images if isinstance(images, list) else [images]
        return self.record(value.get("id", value.get("index", row)), str(value.get("question") or ""),
                           [self.path(image, "image") for image in images], value.get("answer"),
                           "+".join(tags), capabilities=tags)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RowProblem(f"expected a JSON object, got {type(value).__name__}")
    return value


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON array file, or of a JSON-lines file."""
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RecordError(path, 0, f"not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise RecordError(path, 0, f"expected a JSON array of questions, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _tsv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes per field
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        if not reader.fieldnames or "question" not in reader.fieldnames:
            raise RecordError(path, 1, f"header has no 'question' column: {reader.fieldnames}")
        for row, value in enumerate(reader, start=1):
            yield row, value

