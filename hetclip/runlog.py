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


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrite the JSONL file at ``path`` without its rows for steps after ``step`` (atomically)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write
            continue
    if len(keep) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsWriter:
    """``write(step, scalars)`` to ``metrics.jsonl`` and TensorBoard under ``workdir``.

    ``resume_step``: the run resumes after this step, so the rows of later steps (written before a kill
    or a fallback to an older checkpoint) are dropped from both: each step keeps the rows of the run that
    reached it last."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_rows_after(path, 0 if resume_step is None else resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=(resume_step or 0) + 1)

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
