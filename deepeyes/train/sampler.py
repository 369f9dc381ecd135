"""Deterministic, resumable order over a dataset: a seeded shuffle per epoch."""

from __future__ import annotations

import random
from typing import Any, Generic, Sequence, TypeVar

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
