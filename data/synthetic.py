"""Random batches of the right shapes and dtypes (throughput benchmarks with the input pipeline off).

The global batch depends only on the seed; each process takes its own rows of it, so runs on one or
several processes see the same data. Images are uint8 like the loader's (normalised in the step).
"""
from __future__ import annotations

from typing import Any

import numpy as np


class SyntheticBatches:
    """The same batch every step, with the loader's interface (``state``, ``stats``, ``close``)."""

    def __init__(self, tokenizer: Any, *, image_size: int, local_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, state: dict | None = None):
        rng = np.random.default_rng(seed)
        n = local_batch * process_count
        rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
        images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
        texts = [f"synthetic caption {i % 97} {i // 97}" for i in range(n)]
        self._batch = {"image": images[rows], "text": tokenizer(texts[rows])}
        self._count = int((state or {}).get("batches", 0))

    def __iter__(self) -> "SyntheticBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._count += 1
        return self._batch

    def state(self) -> dict:
        return {"batches": self._count}

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
