"""The training loop's policies, each one named piece: when and how to save (``Saver``), what one log line
covers (``LogWindow``) and what a signal does (``StopRequest``). The non-finite guard is in
``hetclip.step``."""
from __future__ import annotations

import math
import signal
import time

import jax

from hetclip import checkpoint as ckpt_lib
from hetclip.step import TrainingError, check_guard


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary. A second
    signal gives up at once (``KeyboardInterrupt``)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up at once
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Saver:
    """Checkpoints every ``every_steps`` steps (0: only at the end), never a non-finite state: the device-side
    guard is read and the temperature checked before each save. ``saved`` is the newest checkpoint's step
    (saved here or resumed from; None: none yet)."""

    def __init__(self, ckpt: ckpt_lib.Checkpointer, every_steps: int, meta: dict, logit_scale, start_step: int):
        self.ckpt, self.every_steps, self.meta = ckpt, int(every_steps), meta
        self._logit_scale = logit_scale
        self.saved = start_step or None

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def save(self, step: int, state: dict, guard: dict, rng, data_pos: dict) -> None:
        check_guard(jax.device_get(guard))
        scale = float(jax.device_get(self._logit_scale(state["params"])))
        if not (math.isfinite(scale) and scale > 0):  # the metrics saw the parameters before this step's update
            raise TrainingError(f"refusing to save step {step}: the temperature is not finite (logit scale {scale}); "
                                "the last good checkpoint is untouched; lower the learning rate")
        self.ckpt.save(step, params=state["params"], opt_state=state["opt_state"], rng=rng, data_state=data_pos,
                       meta=self.meta)
        self.saved = step


class LogWindow:
    """The steps since the last log line: their wall time and how much of it waited for data."""

    def __init__(self, every: int, batch_size: int):
        self.every, self.batch_size = int(every), int(batch_size)
        self._reset()

    def _reset(self):
        self.t0, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def step_done(self, waited_seconds: float) -> None:
        self.wait += waited_seconds
        self.steps += 1

    def due(self, step: int, end_step: int) -> bool:
        return step % self.every == 0 or step == end_step

    def close(self) -> dict:
        """``samples_per_sec``, ``data_wait_frac`` and ``seconds_per_step`` of the window; starts the next."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"samples_per_sec": self.steps * self.batch_size / dt, "data_wait_frac": self.wait / dt,
               "seconds_per_step": dt / max(self.steps, 1)}
        self._reset()
        return out
