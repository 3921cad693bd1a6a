"""A run (work) directory: its lock, its saved config, and the files that keep it self-contained.

A run directory can be moved or copied and used from any working directory: what a checkpoint
refers to inside it (the tokenizer's files) is stored relative to it and resolved against it on load.

Layout::

    WORKDIR/.lock                 held (flock) by the one training process that writes here
    WORKDIR/config.json           the run config, written once validated
    WORKDIR/tokenizer/            a copy of the tokenizer's files
    WORKDIR/checkpoints/STEP/     orbax steps (hetclip.checkpoint)
    WORKDIR/damaged_checkpoints/  steps that failed verification on resume, set aside
    WORKDIR/metrics.jsonl, summary.json, eval_step*.json, export_*/
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
_PATH_KEYS = ("path", "directory")


class WorkdirBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory (``WORKDIR/.lock``), released when the holder exits.

    ``flock`` locks die with their process, so a lock left by a killed run is taken over at once
    (and said so). The file names the holder (host, pid, start time) for the error message."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), ".lock")
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusy(f"the run directory {os.path.dirname(self.path)} is in use by "
                              f"{_describe(holder)}; wait for it to finish, stop it, or use another --workdir") \
                from None
        previous = _read_holder(fd)
        if previous:
            log.info("took over the lock of %s, left by %s (no longer running)", self.path, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"


# --------------------------------------------------------------------------------------------
# The saved config


def save_or_check_config(config: dict, workdir: str, allow_change: bool, *, write: bool = True) -> None:
    """Write ``WORKDIR/config.json``, or check that a resumed run's config is the saved one."""
    from hetclip import config as config_lib
    from hetclip.files import write_json_atomic

    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = config_lib.upgrade_stored(json.load(f))
        except ValueError as e:
            raise config_lib.ConfigError(f"{path} is not valid JSON ({e}); restore it or use another --workdir") \
                from None
        changes = [c for c in config_lib.diff(saved, config) if not _disabled_head_setting(c, saved, config)]
        if changes and not allow_change:
            raise config_lib.ConfigError(
                f"the work directory {workdir!r} holds a run with a different config ({path}):\n  "
                + "\n  ".join(changes[:20])
                + "\nuse another --workdir, or pass --allow-config-change to resume with the new values")
        if changes:
            log.warning("resuming with config changes: %s", "; ".join(changes))
    if write:
        write_json_atomic(path, config)


def _disabled_head_setting(change: str, saved: dict, new: dict) -> bool:
    """Whether ``change`` is a setting of the HET-XL head while the head is off in both configs
    (it then has no parameters and no effect on the run)."""
    def off(cfg: dict) -> bool:
        return not ((cfg.get("model") or {}).get("het") or {}).get("enabled", False)

    return change.startswith("model.het.") and not change.startswith("model.het.enabled:") \
        and off(saved) and off(new)


# --------------------------------------------------------------------------------------------
# Tokenizer files


def persist_tokenizer(spec: dict, workdir: str, *, copy: bool = True) -> tuple[dict, dict]:
    """Copy the tokenizer's files into ``WORKDIR/tokenizer`` (once; ``copy=False``: another process does).

    Returns ``(spec to load now, with absolute paths; spec to store, relative to the run directory)``.
    A spec without files (a built-in tokenizer) is returned unchanged twice."""
    key = next((k for k in _PATH_KEYS if spec.get(k)), None)
    if key is None or not os.path.exists(spec[key]):
        return dict(spec), dict(spec)
    src = os.path.abspath(spec[key])
    dst = os.path.join(os.path.abspath(workdir), TOKENIZER_DIR)
    if copy and not os.path.exists(dst):
        tmp = dst + f".tmp-{os.getpid()}"
        if os.path.isdir(src):
            shutil.copytree(src, tmp)
        else:
            os.makedirs(tmp)
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    relative = TOKENIZER_DIR if os.path.isdir(src) else os.path.join(TOKENIZER_DIR, os.path.basename(src))
    return dict(spec, **{key: os.path.join(os.path.abspath(workdir), relative)}), dict(spec, **{key: relative})


def resolve_tokenizer_spec(spec: dict, run_dir: str) -> dict:
    """The stored spec with its file path made absolute inside ``run_dir``.

    Relative paths are relative to the run directory. Absolute paths are kept when they exist;
    otherwise, and for paths that were stored relative to another working directory, the part from
    the ``tokenizer`` component on is looked up inside ``run_dir``."""
    key = next((k for k in _PATH_KEYS if spec.get(k)), None)
    if key is None:
        return dict(spec)
    path = spec[key]
    if os.path.isabs(path) and os.path.exists(path):
        return dict(spec)
    candidates = [] if os.path.isabs(path) else [os.path.join(run_dir, path)]
    parts = os.path.normpath(path).split(os.sep)
    if TOKENIZER_DIR in parts:
        tail = parts[len(parts) - 1 - parts[::-1].index(TOKENIZER_DIR):]
        candidates.append(os.path.join(run_dir, *tail))
    found = next((c for c in candidates if os.path.exists(c)), None)
    if found is None:
        raise FileNotFoundError(f"the run's tokenizer ({path}) is not in the run directory {run_dir}; "
                                f"looked for {', '.join(candidates) or path}")
    return dict(spec, **{key: found})


# --------------------------------------------------------------------------------------------
# Export targets


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or (
        os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "metrics.jsonl")))


def check_output_dir(out: str, run_directory: str) -> None:
    """Refuse an output directory whose replacement would delete part of a run.

    Refused: the run directory itself, a directory that contains it, anything inside its
    ``checkpoints/``, and any other directory that holds a run. A fresh subdirectory of the run
    directory (``WORKDIR/export_hf``, where ``hetclip-train`` exports) is allowed."""
    out = os.path.realpath(out)
    run = os.path.realpath(run_directory)
    ckpts = os.path.join(run, "checkpoints")
    if out == run or run.startswith(out + os.sep):
        raise ValueError(f"--out {out} is (or contains) the run directory {run}; "
                         "replacing it would delete the run: choose another --out")
    if out == ckpts or out.startswith(ckpts + os.sep):
        raise ValueError(f"--out {out} lies inside the run's checkpoints ({ckpts}): choose another --out")
    if os.path.isdir(out) and is_run_dir(out):
        raise ValueError(f"--out {out} holds a training run (checkpoints/ or config.json + metrics.jsonl): "
                         "choose another --out")
