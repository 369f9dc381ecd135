import hashlib
import json

import pytest
from PIL import Image

from deepeyes.agent.protocol import TextHit
from deepeyes.data.schema import RecordError
from deepeyes.tools import LocalImageSearch, LocalTextSearch, sha256_file


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def doc(title, snippet, text=""):
    return {"title": title, "link": f"https://x.example/{title}", "snippet": snippet, "date": "2020-01-01", "text": text}


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            doc("Cooking", "Bread, salt and water."),
            doc("History of Veldoria", "Veldoria was settled in 1200.", "Kings and wars of the old kingdom."),
            doc("Veldoria", "The capital of Veldoria is Marrow Bay.", "Marrow Bay is a port city."),
            doc("Orsk", "The capital of Orsk is Tamber."),
            {"title": "No date", "link": "https://x.example/nodate", "snippet": "Penguins of the south."},
        ],
    )


def test_text_search_puts_the_relevant_document_first_and_respects_k(corpus):
    search = LocalTextSearch.from_jsonl(corpus)
    assert len(search) == 5
    hits = search.search("What is the capital of Veldoria?", k=5)
    assert hits[0] == TextHit("Veldoria", "https://x.example/Veldoria", "The capital of Veldoria is Marrow Bay.", "2020-01-01")
    assert {hit.title for hit in hits} == {"Veldoria", "History of Veldoria", "Orsk", "No date"}  # share a word
    assert search.search("capital of Veldoria", k=1) == hits[:1]
    assert search.search("penguins", k=5) == [TextHit("No date", "https://x.example/nodate", "Penguins of the south.", "")]
    assert search.search("zebra unicorn", k=5) == []


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"title": "T", "link": "L"}), "'snippet' must be a string"),
        (json.dumps({"title": "T", "link": "L", "snippet": "S", "date": 2020}), "'date' must be a string"),
    ],
)
def test_bad_corpus_row_names_file_and_row(tmp_path, bad_row, problem):
    path = write_jsonl(tmp_path / "corpus.jsonl", [doc("A", "a"), "", bad_row])
    with pytest.raises(RecordError, match=problem) as caught:
        LocalTextSearch.from_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: ")


@pytest.fixture
def images(tmp_path):
    (tmp_path / "results").mkdir()
    paths = {}
    for name, color in (("query", (1, 2, 3)), ("a", (9, 9, 9)), ("b", (5, 5, 5)), ("other", (7, 0, 0))):
        paths[name] = tmp_path / "results" / f"{name}.png"
        Image.new("RGB", (4, 4), color).save(paths[name])
    return paths


def test_image_search_finds_the_exact_file_and_resolves_paths(tmp_path, images):
    digest = hashlib.sha256(images["query"].read_bytes()).hexdigest()
    index = write_jsonl(
        tmp_path / "image_index.jsonl",
        [{"image_sha256": digest, "results": [{"title": "A", "image": "results/a.png"}, {"title": "B", "image": str(images["b"])}]}],
    )
    search = LocalImageSearch.from_jsonl(index)
    assert search.search(images["query"], k=5) == [("A", images["a"]), ("B", images["b"])]
    assert search.search(images["query"], k=1) == [("A", images["a"])]
    assert search.search(images["other"], k=5) == []


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"image_sha256": "abc", "results": []}, "64 lowercase hex"),
        ({"image_sha256": "0" * 64, "results": "a.png"}, "'results' must be a list"),
        ({"image_sha256": "0" * 64, "results": [{"title": "A"}]}, "'image' must be a string"),
        ({"image_sha256": "0" * 64, "results": [{"title": "A", "image": "missing.png"}]}, "missing.png does not exist"),
        ({"image_sha256": "1" * 64, "results": []}, "already indexed at row 1"),
    ],
)
def test_bad_image_index_row_names_file_and_row(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "image_index.jsonl", [{"image_sha256": "1" * 64, "results": []}, row])
    with pytest.raises(RecordError, match=problem) as caught:
        LocalImageSearch.from_jsonl(path)
    assert str(caught.value).startswith(f"{path}:2: ")


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 10_000)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
