"""Search backends for one box without internet: BM25 over a jsonl corpus, image lookup by hash.

They stand in for Google search and Google Lens at the same call shape; a cluster backend comes
later. Both indexes are built once, in memory, when loaded.

    corpus.jsonl       {"title": str, "link": str, "snippet": str, "date": str?, "text": str?}
    image_index.jsonl  {"image_sha256": hex, "results": [{"title": str, "image": path}, ...]}

Image paths are relative to the index file's directory unless absolute.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deepeyes.agent.protocol import TextHit
from deepeyes.data.schema import RecordError

_WORD = re.compile(r"\w+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
STORED_NAME = re.compile(r"([0-9a-f]{64})\.[0-9a-z]+")  # an image store's file (deepeyes.data.image_store)


class LocalTextSearch:
    """Okapi BM25 over title + snippet + text. Ties keep corpus order; documents sharing no
    term with the query are never returned."""

    K1 = 1.5
    B = 0.75

    def __init__(self, hits: list[TextHit], texts: list[str]):
        self._hits = hits
        self._postings: dict[str, list[tuple[int, int]]] = {}  # term -> [(doc, count in doc)]
        lengths = []
        for doc, text in enumerate(texts):
            counts = Counter(_terms(text))
            lengths.append(sum(counts.values()))
            for term, count in counts.items():
                self._postings.setdefault(term, []).append((doc, count))
        self._lengths = np.asarray(lengths, dtype=np.float64)
        self._mean_length = max(float(self._lengths.mean()), 1.0) if hits else 1.0

    @classmethod
    def from_jsonl(cls, path: Path) -> LocalTextSearch:
        """Load and index a corpus; a malformed row raises RecordError naming file:row."""
        hits, texts = [], []
        for row, doc in _jsonl_objects(path):
            for key in ("title", "link", "snippet"):
                _require_str(doc, key, path, row)
            for key in ("date", "text"):
                if key in doc:
                    _require_str(doc, key, path, row)
            hits.append(TextHit(doc["title"], doc["link"], doc["snippet"], doc.get("date", "")))
            texts.append(" ".join((doc["title"], doc["snippet"], doc.get("text", ""))))
        return cls(hits, texts)

    def __len__(self) -> int:
        return len(self._hits)

    def search(self, query: str, k: int = 5) -> list[TextHit]:
        """The k best documents for the query, best first."""
        scores = np.zeros(len(self._hits))
        n_docs = len(self._hits)
        for term in set(_terms(query)):
            postings = self._postings.get(term)
            if not postings:
                continue
            idf = math.log(1 + (n_docs - len(postings) + 0.5) / (len(postings) + 0.5))
            docs, counts = np.asarray(postings, dtype=np.int64).T
            norm = self.K1 * (1 - self.B + self.B * self._lengths[docs] / self._mean_length)
            scores[docs] += idf * counts * (self.K1 + 1) / (counts + norm)
        matched = np.flatnonzero(scores)
        best = matched[np.argsort(-scores[matched], kind="stable")][:k]
        return [self._hits[doc] for doc in best]


class LocalImageSearch:
    """Exact lookup of an image file by the sha256 of its bytes: the query image must be the very
    file the index was built from (a re-encoded copy is a different image here)."""

    def __init__(self, results: dict[str, list[tuple[str, Path]]]):
        self._results = results

    @classmethod
    def from_jsonl(cls, path: Path) -> LocalImageSearch:
        """Load an index; a malformed row, a duplicate hash or a missing result image raises
        RecordError naming file:row."""
        path = Path(path)
        results: dict[str, list[tuple[str, Path]]] = {}
        first_row: dict[str, int] = {}
        for row, entry in _jsonl_objects(path):
            digest = entry.get("image_sha256")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise RecordError(path, row, "'image_sha256' must be 64 lowercase hex digits")
            if digest in first_row:
                raise RecordError(path, row, f"image_sha256 {digest} already indexed at row {first_row[digest]}")
            listed = entry.get("results")
            if not isinstance(listed, list):
                raise RecordError(path, row, "'results' must be a list of {'title', 'image'} objects")
            found = []
            for result in listed:
                if not isinstance(result, dict):
                    raise RecordError(path, row, f"a result must be an object, got {result!r}")
                _require_str(result, "title", path, row)
                _require_str(result, "image", path, row)
                image = path.parent / result["image"]  # an absolute "image" stays as it is
                if not image.is_file():
                    raise RecordError(path, row, f"result image {image} does not exist")
                found.append((result["title"], image))
            first_row[digest] = row
            results[digest] = found
        return cls(results)

    def __len__(self) -> int:
        return len(self._results)

    def search(self, image: Path, k: int = 5) -> list[tuple[str, Path]]:
        """(title, image path) of up to k results for this exact image file; [] when unknown."""
        return self._results.get(content_key(image), [])[:k]


def content_key(path: str | Path, max_bytes: int | None = None) -> str:
    """The sha256 of an image file: read off the name of a stored file, else hashed from its bytes."""
    stored = STORED_NAME.fullmatch(Path(path).name)
    return stored.group(1) if stored else sha256_file(Path(path), max_bytes)


def sha256_file(path: Path, max_bytes: int | None = None) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large images do not sit in memory twice.
    Past `max_bytes` it raises ValueError (a file that never ends, like /proc's, cannot stall it)."""
    digest = hashlib.sha256()
    read = 0
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            read += len(chunk)
            if max_bytes is not None and read > max_bytes:
                raise ValueError(f"{path} is larger than {max_bytes} bytes")
            digest.update(chunk)
    return digest.hexdigest()


def _terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; anything but a JSON object raises."""
    with open(path, encoding="utf-8") as file:
        for row, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as error:
                raise RecordError(path, row, f"not valid JSON ({error})") from None
            if not isinstance(value, dict):
                raise RecordError(path, row, f"expected a JSON object, got {type(value).__name__}")
            yield row, value


def _require_str(obj: dict, key: str, path: Path, row: int) -> None:
    if not isinstance(obj.get(key), str):
        raise RecordError(path, row, f"{key!r} must be a string, got {obj.get(key)!r}")
