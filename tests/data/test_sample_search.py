import hashlib

from PIL import Image

from deepeyes.agent.protocol import TextHit
from deepeyes.data.sample_search import SampleImageSearch, SampleTextSearch


def doc(title, snippet, text=""):
    return {"title": title, "link": f"https://x.example/{title}", "snippet": snippet, "date": "2020-01-01", "text": text}


def test_text_search_ranks_by_query_terms_then_corpus_order():
    search = SampleTextSearch(
        [
            doc("History of Veldoria", "Veldoria was settled in 1200."),
            doc("Orsk", "The capital of Orsk is Tamber."),
            doc("Veldoria", "The capital of Veldoria is Marrow Bay."),
            doc("Cooking", "Bread and salt."),
        ]
    )
    hits = search.search("What is the capital of Veldoria?", k=5)
    assert [hit.title for hit in hits] == ["Veldoria", "History of Veldoria", "Orsk"]
    assert hits[0] == TextHit("Veldoria", "https://x.example/Veldoria", "The capital of Veldoria is Marrow Bay.", "2020-01-01")
    assert search.search("capital of Veldoria", k=1) == hits[:1]
    assert search.search("the of", k=5) == []


def test_image_search_matches_file_bytes(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "b.png")
    digest = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    search = SampleImageSearch([{"image_sha256": digest, "results": [{"title": "A", "image": "a.png"}, {"title": "B", "image": "b.png"}]}], tmp_path)
    assert search.search(tmp_path / "a.png", k=10) == [("A", tmp_path / "a.png"), ("B", tmp_path / "b.png")]
    assert search.search(tmp_path / "a.png", k=1) == [("A", tmp_path / "a.png")]
    assert search.search(tmp_path / "b.png", k=10) == []
