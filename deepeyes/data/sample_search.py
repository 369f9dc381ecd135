"""Search over the sample corpus and image index, used to compute the cold-start trajectories.

Same call shape as the search tools (`.from_jsonl(path)`, `.search(query_or_image, k)`), so a
trajectory shows exactly the results the search returns for its query.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from deepeyes.agent.protocol import TextHit

_STOPWORDS = frozenset("a an and for in is its of on the to what which who".split())


def _terms(text: str) -> list[str]:
    return [term for term in re.findall(r"[a-z0-9]+", text.lower()) if term not in _STOPWORDS]


@dataclass(frozen=True)
class _Doc:
    hit: TextHit
    title_terms: frozenset[str]
    terms: frozenset[str]


class SampleTextSearch:
    """Ranks documents by the summed IDF of the query terms they contain, title matches
    counting double; ties keep corpus order, so results are deterministic."""

    def __init__(self, docs: list[dict[str, str]]):
        self._docs = [
            _Doc(
                hit=TextHit(doc["title"], doc["link"], doc.get("snippet", ""), doc.get("date", "")),
                title_terms=frozenset(_terms(doc["title"])),
                terms=frozenset(_terms(" ".join((doc["title"], doc.get("snippet", ""), doc.get("text", ""))))),
            )
            for doc in docs
        ]
        document_frequency: dict[str, int] = {}
        for doc in self._docs:
            for term in doc.terms:
                document_frequency[term] = document_frequency.get(term, 0) + 1
        n = len(self._docs)
        self._idf = {term: math.log((n + 1) / (df + 1)) + 1 for term, df in document_frequency.items()}

    @classmethod
    def from_jsonl(cls, path: Path) -> SampleTextSearch:
        with open(path, encoding="utf-8") as lines:
            return cls([json.loads(line) for line in lines if line.strip()])

    def search(self, query: str, k: int = 5) -> list[TextHit]:
        terms = set(_terms(query))
        scored = []
        for index, doc in enumerate(self._docs):
            score = sum(self._idf[t] * (2 if t in doc.title_terms else 1) for t in terms & doc.terms)
            if score > 0:
                scored.append((-score, index, doc.hit))
        return [hit for _, _, hit in sorted(scored)[:k]]


class SampleImageSearch:
    """Looks an image up by the SHA-256 of its file bytes; unknown images have no results."""

    def __init__(self, rows: list[dict], root: Path):
        self._results = {
            row["image_sha256"]: [(result["title"], root / result["image"]) for result in row["results"]]
            for row in rows
        }

    @classmethod
    def from_jsonl(cls, path: Path) -> SampleImageSearch:
        with open(path, encoding="utf-8") as lines:
            return cls([json.loads(line) for line in lines if line.strip()], Path(path).parent)

    def search(self, image: Path, k: int = 10) -> list[tuple[str, Path]]:
        digest = hashlib.sha256(Path(image).read_bytes()).hexdigest()
        return self._results.get(digest, [])[:k]
