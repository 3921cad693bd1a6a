"""DevicePrefetcher: order, the loader state paired with each batch, errors in order, shutdown."""
import threading
import time

import pytest

from hetclip.prefetch import DevicePrefetcher


class Counting:
    """A loader of ``n`` integer batches whose state is the number handed out; fails after ``fail_after``."""

    def __init__(self, n, fail_after=None):
        self.n, self.i, self.fail_after = n, 0, fail_after

    def __next__(self):
        if self.fail_after is not None and self.i == self.fail_after:
            raise RuntimeError(f"broken at {self.i}")
        if self.i == self.n:
            raise StopIteration
        self.i += 1
        time.sleep(0.001)
        return self.i

    def state(self):
        return {"batches": self.i}


def test_batches_arrive_in_order_with_their_own_state():
    feed = DevicePrefetcher(Counting(6), put=lambda b: ("placed", b), depth=2)
    got = list(feed)
    assert got == [(("placed", i), {"batches": i}) for i in range(1, 7)]
    with pytest.raises(StopIteration):
        next(feed)
    feed.close()


def test_the_fetch_runs_ahead_by_depth_only():
    loader = Counting(100)
    feed = DevicePrefetcher(loader, put=lambda b: b, depth=2)
    deadline = time.time() + 10
    while loader.i < 3 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert loader.i == 3  # two waiting in the queue, one fetched and waiting for room
    assert next(feed) == (1, {"batches": 1})
    feed.close()
    assert not any(t.name == "hetclip-device-prefetch" and t.is_alive() for t in threading.enumerate())


def test_an_error_comes_after_the_batches_fetched_before_it():
    feed = DevicePrefetcher(Counting(10, fail_after=2), put=lambda b: b)
    assert [next(feed)[0] for _ in range(2)] == [1, 2]
    with pytest.raises(RuntimeError, match="broken at 2"):
        next(feed)
    with pytest.raises(StopIteration):
        next(feed)
    feed.close()
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetcher(Counting(1), put=lambda b: b, depth=0)
