"""A growing numpy array: rows appended in amortised O(1) with no Python object per row (document offsets,
id ends, a cache held in memory). The one place qembed grows an array."""

from __future__ import annotations

import numpy as np

__all__ = ["GrowingArray"]


class GrowingArray:
    """Rows of `row_shape` appended to one array that doubles when full; `array` is the filled part (a view).

    `capacity` rows fit before the first regrowth (a caller that knows its count sizes it up front)."""

    def __init__(self, row_shape: tuple[int, ...] = (), dtype=np.int64, *, capacity: int = 1024) -> None:
        self.data = np.empty((max(int(capacity), 1), *row_shape), dtype=dtype)
        self.size = 0

    @classmethod
    def wrap(cls, array: np.ndarray) -> GrowingArray:
        """A full `GrowingArray` over an existing array (read back from a file); it grows by copying."""
        grown = cls.__new__(cls)
        grown.data, grown.size = array, len(array)
        return grown

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        return self.data[: self.size][index]

    @property
    def array(self) -> np.ndarray:
        return self.data[: self.size]

    def extend(self, rows) -> None:
        rows = np.asarray(rows, dtype=self.data.dtype)
        need = self.size + len(rows)
        if need > len(self.data):
            grown = np.empty((max(need, 2 * len(self.data)), *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : need] = rows
        self.size = need

    def append(self, row) -> None:
        if self.size == len(self.data):
            self.extend([row])
            return
        self.data[self.size] = row
        self.size += 1
