"""Where training numbers go: a live progress bar, TensorBoard scalars and a JSONL file.

Only the main process writes; the others get a writer that drops everything.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class MetricsWriter:
    """``write(step, scalars)`` to ``metrics.jsonl`` and TensorBoard under ``workdir``."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            val = _plain(v)
            row[k] = val
            if self._tb is not None and isinstance(val, (int, float)) and math.isfinite(val):
                self._tb.add_scalar(k, val, int(step))
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """tqdm bar over steps whose postfix shows loss, temperature, samples/s, data wait and ETA."""

    def __init__(self, total_steps: int, initial: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True,
                             mininterval=1.0, smoothing=0.1)

    def update(self, step: int, info: dict) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()},
                              refresh=False)
        self._bar.refresh()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
