"""Deterministic, resumable orders over datasets: a seeded shuffle per epoch, and weighted
mixtures of several datasets."""

from __future__ import annotations

import bisect
import itertools
import random
from collections import Counter
from typing import Any, Generic, Iterable, Sequence, TypeVar

T = TypeVar("T")


class EpochSampler(Generic[T]):
    def __init__(self, items: Sequence[T], seed: int):
        if not items:
            raise ValueError("cannot sample from an empty dataset")
        self._items = items
        self._seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self._items)))
        random.Random(f"{self._seed}/{self.epoch}").shuffle(order)
        return order

    def take(self, count: int) -> list[T]:
        batch = []
        while len(batch) < count:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            batch.append(self._items[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()


class MixtureSampler(Generic[T]):
    """Several sources mixed by weight: each draw picks a source with probability weight / total
    weight, then takes that source's next item in its own `EpochSampler` order (a small source
    repeats sooner than a large one). Draw i's source comes from a stream seeded by (seed, i), so
    the order is reproducible and resumes from `state_dict` alone. One source is exactly its
    EpochSampler. `last_sources` names the source of each item of the last `take`.
    """

    def __init__(self, sources: dict[str, Sequence[T]], weights: dict[str, float], seed: int):
        if set(weights) != set(sources) or not all(weight > 0 for weight in weights.values()):
            raise ValueError(f"mixture weights {weights} must be > 0 for exactly the sources {sorted(sources)}")
        self._seed = seed
        self._names = list(sources)
        total = sum(weights.values())
        self._cumulative = list(itertools.accumulate(weights[name] / total for name in self._names))
        self._samplers = {}
        for name, items in sources.items():
            if not items:
                raise ValueError(f"mixture source {name!r} has no items")
            self._samplers[name] = EpochSampler(items, seed)
        self.draws = 0
        self.last_sources: list[str] = []

    def take(self, count: int) -> list[T]:
        self.last_sources = [self._source(self.draws + i) for i in range(count)]
        self.draws += count
        return [self._samplers[name].take(1)[0] for name in self.last_sources]

    def _source(self, draw: int) -> str:
        point = random.Random(f"{self._seed}/mix/{draw}").random()
        index = bisect.bisect_right(self._cumulative, point)
        return self._names[min(index, len(self._names) - 1)]  # min: float rounding of the last bound

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "sources": {name: s.state_dict() for name, s in self._samplers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = state["draws"]
        for name, sampler in self._samplers.items():
            sampler.load_state_dict(state["sources"][name])


def realized_mix(sources: Iterable[str]) -> dict[str, float]:
    """The share of each source among these samples, as metrics `data/mix/<source>`."""
    counts = Counter(sources)
    total = sum(counts.values())
    return {f"data/mix/{name}": count / total for name, count in sorted(counts.items())}
