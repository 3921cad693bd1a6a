"""Batches already on the devices: a background thread pulls host batches and places them ahead.

``DevicePrefetcher(loader, put, depth=2)`` runs ``put(next(loader))`` (e.g. ``dist.global_batch``:
``jax.make_array_from_process_local_data`` onto the batch sharding) in a thread, keeping up to
``depth`` placed batches ready, each with the loader's ``state()`` taken right after that batch, so a
checkpoint saved after a step records the position of the batch that step consumed (not of the
batches fetched ahead). Errors of the loader (or of ``put``) are raised by ``next()`` in the
caller's thread, in order: batches fetched before the error are delivered first.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class DevicePrefetcher:
    """Iterator of ``(placed_batch, loader_state)``; ``wait_seconds`` is the time ``next()`` blocked."""

    def __init__(self, loader: Any, put: Callable[[Any], Any], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._loader, self._put = loader, put
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="hetclip-device-prefetch", daemon=True)
        self._thread.start()

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                local = next(self._loader)
                state = self._loader.state()
                item: Any = (self._put(local), state)
            except StopIteration:
                self._offer(_END)
                return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self._offer(_Failure(e))
                return
            if not self._offer(item):
                return

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._done:
            raise StopIteration
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (it finishes the batch it is fetching); the loader itself stays open."""
        self._stop.set()
        self._done = True
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout)
