"""Batches for training and evaluation: spec handling, per-sample decoding, bad-input accounting.

Training: ``make_train_loader`` builds a ``hetclip.data.workers.TrainLoader``: worker processes own
the per-sample work (shard reading, shuffle buffer, decode, augment, tokenise) and fill uint8
batches in shared memory; batches depend on the number of workers; ``state()`` resumes exactly.
A sample's augmentation randomness is ``hash(seed, process, [worker], position in its stream)``.

Evaluation: ``make_eval_loader(items, ...)`` builds a ``Loader`` over work items from an evaluation
source (``hetclip.zero_shot.datasets``: class folders, ``.cls`` shards, retrieval shards): the main
process walks the items in a fixed order; ``num_workers`` processes (multiprocessing, ``spawn``) read
and decode chunks of them; results are re-ordered, so batches do not depend on the number of workers.
Evaluation loaders are read once (no ``state()``).

Bad input: a sample without image or caption, with an empty caption, an undecodable image, an
image over the pixel limit or in an unconvertible mode is skipped; so is the rest of a truncated or
unreadable shard, and a shard without samples. Each is counted by reason, named in a
``BadSampleWarning`` (shard URL and key; the first ``warn_limit`` of each reason) and listed in
``stats()`` (``Ledger``, in the main process; the training workers report what they skipped with
every sub-batch; failed shards by URL in ``bad_shards``). More than ``max_bad_fraction`` of skipped
samples (checked once ``bad_check_after`` samples were seen, and at the end of the data) raises
``TooManyBadSamples``; so do failed shards (distinct URLs) over ``max_bad_shard_fraction`` of the
shards a training process reads (checked at every batch). Local shards that do not exist are
refused before any reading (``shards.expand_pattern``).
"""

from __future__ import annotations

import collections
import json
import math
import multiprocessing
import os
import queue
import random
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from hetclip.suggest import did_you_mean

from . import decode
from .shards import (IMAGE_EXTS, ShardError, ShardFailure, SampleStream, epoch_size, hash_words, name_list,
                     parse_sources)

LOADER_STATE_VERSION = 1  # the single-stream state format (``workers.TrainLoader`` still reads it)

TRAIN_DEFAULTS: dict[str, Any] = {
    "shards": None,             # pattern(s), see hetclip.data.shards
    "weights": None,            # source upsampling factors (list or "1::2")
    "image_size": 224,
    "caption_key": "txt",       # member ext, or "json:field.sub"; alternatives joined by ","
    "epoch_size": None,         # samples per epoch (all processes); default: from sizes.json
    "shuffle_buffer": 1000,
    "shuffle_shards": True,
    "crop_scale": decode.DEFAULT_CROP_SCALE,
    "crop_ratio": decode.DEFAULT_CROP_RATIO,
    "max_pixels": decode.DEFAULT_MAX_PIXELS,
    "background": decode.WHITE,
    "max_bad_fraction": 0.01,
    "bad_check_after": 1000,
    "max_bad_shard_fraction": 0.01,  # of the process's shards: unreadable, truncated or empty
    "epochs": None,             # None: repeat forever
    "prefetch": 2,              # batches decoded ahead (shared-memory slots)
    "warn_limit": 20,
}
EVAL_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "resize_size": None,        # shortest side before the centre crop (default: image_size)
    "limit": None,              # stop after this many usable images
    "max_pixels": decode.DEFAULT_MAX_PIXELS,
    "background": decode.WHITE,
    "max_bad_fraction": 0.01,
    "bad_check_after": 1000,
    "chunk_size": 16,
    "prefetch": 2,
    "start_method": "spawn",
    "warn_limit": 20,
}


class BadSampleWarning(UserWarning):
    """A sample or shard was skipped (the message names the shard and key and why)."""


class TooManyBadSamples(RuntimeError):
    """Skipped samples exceed ``max_bad_fraction`` (or failed shards ``max_bad_shard_fraction``)."""


# ----------------------------------------------------------------------------- spec handling

def resolve_spec(spec: Any, defaults: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Merge a dict-like spec (dict or ml_collections ConfigDict) over ``defaults``; unknown keys fail."""
    if spec is None:
        given: dict[str, Any] = {}
    elif isinstance(spec, str):
        given = {"shards" if "shards" in defaults else "source": spec}
    else:
        given = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    given.update({k: v for k, v in overrides.items() if v is not None})
    out = dict(defaults)
    for k, v in given.items():
        if k not in defaults:
            raise KeyError(f"unknown data spec key {k!r}{did_you_mean(k, defaults)}; known keys: {sorted(defaults)}")
        out[k] = v
    for k in ("crop_scale", "crop_ratio", "background"):
        if k in out and out[k] is not None:
            out[k] = tuple(out[k])
    if "crop_scale" in out:
        lo, hi = out["crop_scale"]
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {out['crop_scale']}")
    if not 0 <= float(out["max_bad_fraction"]) <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {out['max_bad_fraction']}")
    return out


def caption_fields(caption_key: str) -> list[tuple[str, list[str]]]:
    """``"txt,json:meta.caption"`` -> ``[("txt", []), ("json", ["meta", "caption"])]``."""
    out = []
    for alt in str(caption_key).split(","):
        alt = alt.strip()
        ext, _, path = alt.partition(":")
        out.append((ext.lower(), [p for p in path.split(".") if p]))
    return out


def extract_caption(sample: dict, caption_key: str) -> str:
    """The caption of a raw sample; raises ``ValueError`` with reason prefix when missing/empty."""
    tried = []
    for ext, path in caption_fields(caption_key):
        raw = sample.get(ext)
        tried.append(ext + (":" + ".".join(path) if path else ""))
        if raw is None:
            continue
        if path:
            try:
                value: Any = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"bad_caption: {ext} member is not valid JSON: {e}") from None
            for p in path:
                value = value.get(p) if isinstance(value, dict) else None
            if value is None:
                continue
            text = str(value)
        else:
            try:
                text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
            except UnicodeDecodeError as e:
                raise ValueError(f"bad_caption: {ext} member is not UTF-8: {e}") from None
        text = text.strip()
        if not text:
            raise ValueError(f"empty_caption: {tried[-1]} is empty")
        return text
    raise ValueError(f"missing_caption: no {' or '.join(tried)} in the sample")


# ----------------------------------------------------------------------------- per-sample work

def _process(cfg: dict, item: tuple) -> tuple:
    """Decode one item -> ("ok", uint8 image, caption or label) or ("bad", reason, message)."""
    kind, key, url, image, extra, seed = item
    try:
        if cfg["mode"] == "train":
            if image is None:
                return ("bad", "missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
            try:
                target: Any = extract_caption(extra, cfg["caption_key"])
            except ValueError as e:
                reason, _, msg = str(e).partition(": ")
                return ("bad", reason, msg)
            arr = decode.train_transform_uint8(
                image, cfg["image_size"], random.Random(seed), scale=cfg["crop_scale"],
                ratio=cfg["crop_ratio"], max_pixels=cfg["max_pixels"], background=cfg["background"])
        else:
            if image is None:
                return ("bad", "missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
            target = extra
            if isinstance(image, str):  # a class folder's file: read here, in the worker
                with open(image, "rb") as f:
                    image = f.read()
            arr = decode.eval_transform_uint8(image, cfg["image_size"], resize_size=cfg["resize_size"],
                                              max_pixels=cfg["max_pixels"], background=cfg["background"])
        return ("ok", arr, target)
    except decode.DecodeError as e:
        return ("bad", e.reason, str(e))
    except OSError as e:  # a file of a class folder that cannot be read
        return ("bad", "unreadable_file", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - one bad sample must not kill the run
        return ("bad", "error", f"{type(e).__name__}: {e}")


def _worker_loop(tasks: Any, results: Any, cfg: dict, parent_pid: int) -> None:
    """Worker process: decode chunks until a ``None`` task arrives or the parent disappears."""
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if task is None:
            return
        job_id, items = task
        results.put((job_id, [_process(cfg, it) for it in items]))


class _Pool:
    """Worker processes with one task queue, one result queue and in-order delivery."""

    def __init__(self, num_workers: int, cfg: dict, start_method: str):
        ctx = multiprocessing.get_context(start_method)
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker_loop, args=(self.tasks, self.results, cfg, os.getpid()),
                                  daemon=True, name=f"hetclip-decode-{i}") for i in range(num_workers)]
        for p in self.procs:
            p.start()
        self.done: dict[int, list] = {}

    def submit(self, job_id: int, items: list) -> None:
        self.tasks.put((job_id, items))

    def get(self, job_id: int) -> list:
        while job_id not in self.done:
            try:
                jid, res = self.results.get(timeout=1.0)
                self.done[jid] = res
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"decode worker {dead[0].name} (pid {dead[0].pid}) exited with "
                                       f"code {dead[0].exitcode}; see its output above") from None
        return self.done.pop(job_id)

    def close(self) -> None:
        for _ in self.procs:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            try:  # drain so workers blocked on a full result pipe can finish
                while True:
                    self.results.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                pass
            for p in self.procs:
                p.join(0.05)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            p.close()
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()
        self.procs, self.done = [], {}


# ----------------------------------------------------------------------------- the loader

class Ledger:
    """Counts used and skipped samples, warns about skipped ones and enforces ``max_bad_fraction``.

    Lives in the main process; workers report what they skipped (reason, shard, key, message).
    """

    def __init__(self, cfg: dict, d: dict | None = None, *, shards: int | None = None):
        d = d or {}
        self._cfg = cfg
        self._shards = shards  # the shards this process reads (the denominator of max_bad_shard_fraction)
        self.samples_ok = int(d.get("samples_ok", 0))
        self.skipped: collections.Counter = collections.Counter(d.get("skipped", {}))
        self.batches = int(d.get("batches", 0))
        # {url: {"reason", "detail"}} of every shard that could not be read to its end (or held nothing)
        self.bad_shards: dict[str, dict] = dict(d.get("bad_shards", {}))
        self.examples: collections.deque = collections.deque(maxlen=50)
        self._warned: collections.Counter = collections.Counter()

    @property
    def bad_samples(self) -> int:
        return sum(v for k, v in self.skipped.items() if not k.endswith("_shard"))

    def to_dict(self) -> dict:
        return {"samples_ok": self.samples_ok, "skipped": dict(self.skipped), "batches": self.batches,
                "bad_shards": dict(self.bad_shards)}

    def bad(self, reason: str, url: str, key: str | None, msg: str) -> None:
        """Count one skipped sample (``key`` given) or shard (``key`` None) and warn (``warn_limit``)."""
        if key is None:
            self.bad_shards.setdefault(url, {"reason": reason, "detail": msg})
        self.skipped[reason] += 1
        self.examples.append({"reason": reason, "shard": url, "key": key, "message": msg})
        self._warned[reason] += 1
        limit = int(self._cfg["warn_limit"])
        if self._warned[reason] <= limit:
            what = f"shard {url}" if key is None else f"sample {key!r} of {url}"
            more = " (further warnings of this kind suppressed)" if self._warned[reason] == limit else ""
            warnings.warn(f"skipped {what}: {reason}: {msg}{more}", BadSampleWarning, stacklevel=4)

    def check(self, *, final: bool) -> None:
        """Raise ``TooManyBadSamples`` when the skipped fraction is over the limit (or nothing was usable)."""
        limit = self._cfg.get("max_bad_shard_fraction")
        if self._shards and limit is not None and len(self.bad_shards) > float(limit) * self._shards:
            n = len(self.bad_shards)
            listed = name_list([f"{u} ({v['reason']})" for u, v in self.bad_shards.items()])
            raise TooManyBadSamples(
                f"{n} of {self._shards} shards failed ({n / self._shards:.1%} > max_bad_shard_fraction "
                f"{float(limit):.1%}): {listed}. Check them with `hetclip-shards check`, then rewrite or remove "
                "them, or raise data.max_bad_shard_fraction")
        bad = self.bad_samples
        seen = bad + self.samples_ok
        frac = float(self._cfg["max_bad_fraction"])
        if bad and (final or seen >= int(self._cfg["bad_check_after"])) and bad > frac * seen:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            ex = self.examples[-1] if self.examples else {}
            raise TooManyBadSamples(
                f"{bad} of {seen} samples skipped ({bad / seen:.1%} > max_bad_fraction {frac:.1%}); "
                f"by reason: {reasons}; last: {ex.get('reason')} in {ex.get('shard')} key {ex.get('key')!r}: "
                f"{ex.get('message')}. {_advice(str(ex.get('shard')))}")
        if final and self.samples_ok == 0 and self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            raise TooManyBadSamples(f"no usable sample: all input was skipped ({reasons})")


def _advice(where: str) -> str:
    """What to do about skipped samples: shards have a checker; a class folder's files are looked at directly."""
    if where.endswith(".tar") or where.startswith("pipe:") or "://" in where:
        return "Check the shards with `hetclip-shards check`."
    return "Check or remove the image files named (raise max_bad_fraction to skip them)."


class Closing:
    """``close()`` on leaving a ``with`` block and on garbage collection (loaders own processes)."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Loader(Closing):
    """Evaluation batches in item order: ``{"image": uint8 [b, S, S, 3], "label": int32 [b], "name": [b]}``
    (``"label"`` is a list when the targets are not integers, e.g. retrieval captions; ``"name"`` holds
    ``item_name`` of each image). The last batch may be smaller. ``stats()`` and ``close()`` (also a context manager). Built by ``make_eval_loader``.
    """

    def __init__(self, *, items: Iterator, cfg: dict, batch_size: int, num_workers: int,
                 closers: Sequence[Callable[[], None]] = ()):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._items, self._cfg = items, cfg
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self._limit = None if cfg.get("limit") is None else int(cfg["limit"])
        self._closers = list(closers)
        self._stats = Ledger(cfg)
        self._wait = 0.0
        self._read = 0
        self._pool: _Pool | None = None
        self._closed = False
        self._exhausted = False
        self._next_job = 0
        self._inflight: collections.deque = collections.deque()  # (job_id, meta, items|None)
        self._pending: collections.deque = collections.deque()   # decoded entries, in stream order
        self._pending_ok = 0
        chunk = max(1, min(int(cfg["chunk_size"]), self.batch_size))
        self._chunk = chunk
        self._max_inflight = max(2 * max(num_workers, 1),
                                 int(cfg["prefetch"]) * math.ceil(self.batch_size / chunk))
        if num_workers > 0:
            self._pool = _Pool(num_workers, cfg, cfg["start_method"])

    # -- iteration
    def __iter__(self) -> "Loader":
        return self

    def _read_chunk(self) -> bool:
        items, meta = [], []
        while len(items) < self._chunk:
            try:
                it = next(self._items)
            except StopIteration:
                self._exhausted = True
                break
            if isinstance(it, ShardFailure):
                meta.append(("fail", it))
                items.append(None)
            else:
                meta.append(("sample", it[1], it[2]))
                items.append(it)
        if not items:
            return False
        self._read += len(items)
        job = self._next_job
        self._next_job += 1
        work = [it for it in items if it is not None]
        if self._pool is not None and work:
            self._pool.submit(job, work)
            self._inflight.append((job, meta, None))
        else:
            self._inflight.append((job, meta, work))
        return True

    def _fill(self) -> None:
        while len(self._inflight) < self._max_inflight and not self._exhausted:
            if not self._read_chunk():
                break

    def _collect(self) -> None:
        job, meta, work = self._inflight.popleft()
        t0 = time.perf_counter()
        if work is None:
            results = self._pool.get(job)  # type: ignore[union-attr]
        else:
            results = [_process(self._cfg, it) for it in work]
        self._wait += time.perf_counter() - t0
        res = iter(results)
        for m in meta:
            if m[0] == "fail":
                f = m[1]
                entry = ("bad", f.reason, f.url, f.key, f.detail)
            else:
                r = next(res)
                if r[0] == "ok":
                    entry = ("ok", r[1], r[2], item_name(m[2], m[1]))
                    self._pending_ok += 1
                else:
                    entry = ("bad", r[1], m[2], m[1], r[2])
            self._pending.append(entry)

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("loader is closed")
        want = self.batch_size
        if self._limit is not None:
            want = min(want, self._limit - self._stats.samples_ok)
        while want > 0 and self._pending_ok < want:
            self._fill()
            if not self._inflight:
                break
            self._collect()
        if want <= 0 or self._pending_ok == 0:
            while want > 0 and self._pending:  # account for trailing bad samples
                self._commit(self._pending.popleft())
            self._check_bad(final=True)
            self.close()
            raise StopIteration
        images, targets, names = [], [], []
        while len(images) < want and self._pending_ok:
            entry = self._pending.popleft()
            self._commit(entry)
            if entry[0] == "ok":
                self._pending_ok -= 1
                images.append(entry[1])
                targets.append(entry[2])
                names.append(entry[3])
        self._check_bad(final=False)
        self._stats.batches += 1
        labels: Any = targets
        if all(isinstance(t, (int, np.integer)) for t in targets):
            labels = np.asarray(targets, np.int32)
        return {"image": np.stack(images), "label": labels, "name": names}

    def _commit(self, entry: tuple) -> None:
        if entry[0] == "ok":
            self._stats.samples_ok += 1
            return
        _, reason, url, key, msg = entry
        self._stats.bad(reason, url, key, msg)

    def _check_bad(self, *, final: bool) -> None:
        try:
            self._stats.check(final=final)
        except TooManyBadSamples:
            self.close()
            raise

    # -- stats, shutdown
    def stats(self) -> dict:
        """Samples read/used, skipped by reason (with recent examples), seconds waiting on workers."""
        return {**self._stats.to_dict(), "samples_read": self._read, "wait_seconds": self._wait,
                "bad_examples": list(self._stats.examples)}

    def close(self) -> None:
        """Stop the workers and close open shards (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for c in self._closers:
            c()
        self._pending.clear()
        self._inflight.clear()


# ----------------------------------------------------------------------------- train

class _TrainFields:
    """The members a training sample needs (picklable: it travels to the workers)."""

    def __init__(self, caption_key: str):
        self.keep = frozenset(IMAGE_EXTS) | {ext for ext, _ in caption_fields(caption_key)}

    def __call__(self, ext: str) -> bool:
        return ext in self.keep


def _train_items(stream: SampleStream, seed: int, process_index: int, worker_index: int = 0,
                 worker_count: int = 1) -> Iterator:
    """Raw samples -> work items; a sample's augmentation seed hashes (seed, process, [worker], position)."""
    key = (seed, process_index) if worker_count == 1 else (seed, process_index, worker_index, worker_count)
    for s in stream:
        if isinstance(s, ShardFailure):
            yield s
            continue
        image = next((s[e] for e in IMAGE_EXTS if e in s), None)
        extra = {k: v for k, v in s.items() if not k.startswith("__") and k not in IMAGE_EXTS}
        yield ("train", s["__key__"], s["__url__"], image, extra, hash_words(*key, s["__index__"], 7))


def make_train_loader(spec: Any, tokenizer: Any, *, batch_size: int, seed: int, process_index: int = 0,
                      process_count: int = 1, num_workers: int = 2, state: dict | None = None,
                      **overrides: Any) -> Any:
    """Training loader over webdataset shards (``spec`` keys: see ``TRAIN_DEFAULTS``).

    ``batch_size`` is per process. Yields ``{"image": uint8 [B, H, W, 3], "text": int32 [B, L]}``
    (normalise with ``decode.normalize`` or on the device); see ``hetclip.data.workers``.
    ``loader.epoch_size`` is the epoch size over all processes (sizes.json or ``epoch_size``; None
    if unknown).
    """
    from .workers import TrainLoader

    cfg = resolve_spec(spec, TRAIN_DEFAULTS, **overrides)
    if not cfg["shards"]:
        raise ShardError("data spec has no `shards`")
    sources = parse_sources(cfg["shards"], cfg["weights"])
    wcfg = {"mode": "train", **{k: cfg[k] for k in ("image_size", "caption_key", "crop_scale", "crop_ratio",
                                                       "max_pixels", "background")}}
    loader = TrainLoader(cfg={**cfg, **wcfg}, sources=sources, fields=_TrainFields(cfg["caption_key"]),
                         tokenizer=tokenizer, batch_size=batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, num_workers=num_workers, state=state)
    try:
        loader.epoch_size = epoch_size(sources, cfg["epoch_size"])  # type: ignore[attr-defined]
    except ShardError:
        loader.epoch_size = None  # type: ignore[attr-defined]
    return loader


# ----------------------------------------------------------------------------- eval

def item_name(where: str, key: str | None) -> str:
    """How messages and per-image outputs name a sample: its file, or ``shard:key`` for a shard member."""
    return f"{where}:{key}" if key and key not in where else str(where)


def eval_item(key: str, where: str, image: bytes | str | None, target: Any) -> tuple:
    """A work item for ``make_eval_loader``: ``image`` is encoded bytes or a file path (read by the worker),
    ``where`` names the shard or file in messages, ``target`` is a label or captions."""
    return ("eval", key, where, image, target, 0)


def make_eval_loader(items: Iterator, *, batch_size: int, num_workers: int = 2, **overrides: Any) -> Loader:
    """Evaluation loader over ``items`` (``eval_item`` tuples and ``ShardFailure`` markers, in order);
    settings: ``EVAL_DEFAULTS``. Yields uint8 images (normalise on the device, e.g.
    ``hetclip.model.normalize_images``, or with ``decode.normalize``)."""
    cfg = resolve_spec(None, EVAL_DEFAULTS, **overrides)
    if cfg["resize_size"] is not None and int(cfg["resize_size"]) < int(cfg["image_size"]):
        raise ValueError(f"resize_size {cfg['resize_size']} is smaller than the crop size {cfg['image_size']}")
    if int(cfg["image_size"]) < 1:
        raise ValueError(f"image_size must be >= 1, got {cfg['image_size']}")
    items = iter(items)
    return Loader(items=items, cfg={**cfg, "mode": "eval"}, batch_size=batch_size, num_workers=num_workers,
                  closers=[getattr(items, "close", lambda: None)])
