"""Training and evaluation batches built by worker processes into shared memory.

Each of the ``W`` workers of a process owns every ``W``-th shard visit of that process's share of an
epoch (``SampleStream(worker_index=w, worker_count=W)``) and does all per-sample work itself: shard
reading, sample grouping, its own shuffle buffer, decoding, augmentation and tokenisation. A batch
of ``B`` rows is the concatenation of one sub-batch per worker (worker ``w`` fills rows
``[offset_w, offset_w + B_w)``, ``B_w`` = ``B // W`` plus one for the first ``B % W`` workers) written
straight into a shared-memory slot: ``image`` uint8 ``[B, H, W, 3]`` and ``text`` int32 ``[B, L]``.
The main process waits for the ``W`` sub-batches of a slot, copies the slot out (one memcpy per
array) and hands the slot back; it does no per-sample work.

Evaluation (``EvalLoader``) uses the same worker processes and shared memory: the main process walks
the work items in order and sends chunks of them (file paths or encoded bytes) to the workers in turn;
each worker decodes its chunk into the rows of a slot, and the main process copies the decoded rows into
batches in item order, so evaluation batches do not depend on the number of workers.

Determinism: training batches depend on the seed, the process split and the number of workers (not on
timing). ``num_workers=0`` runs the single producer in the calling process and gives the same
batches as one worker (useful for debugging).

Resume: ``state()`` holds, per worker, its stream position after its last sub-batch the caller
received, plus the sample counters; a loader built with that state continues with the identical next
batch. A state saved with a different number of workers is refused with both counts named. The state
format has one version number (``STATE_VERSION``); a state of the single-stream format
(``SINGLE_STREAM_STATE_VERSION``) resumes with one worker.

Processes: workers are plain ``python`` subprocesses (no ``multiprocessing``, hence no resource
tracker). The shared memory is an anonymous ``memfd`` (Linux; an unlinked temporary file elsewhere)
passed by descriptor, so nothing is left in ``/dev/shm`` whatever happens. A worker exits when its
parent dies (``PR_SET_PDEATHSIG`` on Linux, and a parent-pid watchdog everywhere) or when its command
pipe closes; it ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group, and the parent
decides when to stop). A worker that dies ends iteration with ``DataWorkerError`` naming the worker and the
shard it was reading (each worker keeps the URL of its open shard in a small status record in the
shared memory). Errors raised inside a worker (e.g. ``ShardError``) are re-raised in the main process.

Why not grain (0.2.18): it has no webdataset-tar or ``pipe:`` source (a custom ``IterDataset``
around ``SampleStream`` would be needed anyway), its mixtures sample per element rather than
upsample shard visits, its worker processes come from ``multiprocessing`` (a resource tracker and
workers that outlive a killed parent), and it moves elements one by one rather than sub-batches.

Memory: ``prefetch`` slots of ``B * (H * W * 3 + 4 L)`` bytes per process (3 slots of a 1,024-image
224-px batch: 0.46 GB). Evaluation: ``W * prefetch + 1`` slots of ``chunk_size`` images (2 workers, 2, 16:
5 slots of 224-px images, 12 MB), plus the batch buffers handed out (reused once the caller lets go).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .samples import Closing, Ledger, TooManyBadSamples, item_name, process, train_items
from .shards import NoSamples, SampleStream, ShardError, ShardFailure, Source, process_visits

log = logging.getLogger("hetclip.data")

STATE_VERSION = 2  # the loader state: per-worker stream states, counters
SINGLE_STREAM_STATE_VERSION = 1  # one stream per process (resumes with one worker)
_STATUS_BYTES = 1024
_ALIGN = 4096
_PR_SET_PDEATHSIG = 1


class DataWorkerError(RuntimeError):
    """A data worker process died or could not start (the message names the worker and its shard)."""


def split_rows(batch_size: int, workers: int) -> list[tuple[int, int]]:
    """``(offset, rows)`` of each worker's sub-batch: sizes differ by at most one, larger first."""
    base, extra = divmod(batch_size, workers)
    out, off = [], 0
    for w in range(workers):
        n = base + (1 if w < extra else 0)
        out.append((off, n))
        off += n
    return out


# ----------------------------------------------------------------------------- shared memory

def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class SharedSlots:
    """``slots`` batch buffers (image uint8, text int32) and per-worker status records in one mapping.

    ``SharedSlots.create(...)`` makes the anonymous file; ``SharedSlots(fd, layout)`` maps an inherited one.
    """

    def __init__(self, fd: int, layout: dict):
        self.fd, self.layout = fd, dict(layout)
        self._mm = mmap.mmap(fd, layout["nbytes"])
        b, s, L = layout["batch"], layout["image_size"], layout["context"]
        self.images = [np.frombuffer(self._mm, np.uint8, b * s * s * 3, off).reshape(b, s, s, 3)
                       for off in layout["image_offsets"]]
        self.text = [np.frombuffer(self._mm, np.int32, b * L, off).reshape(b, L) for off in layout["text_offsets"]]

    @staticmethod
    def layout(slots: int, batch: int, image_size: int, context: int, workers: int) -> dict:
        off = _align(workers * _STATUS_BYTES)
        image_offsets, text_offsets = [], []
        for _ in range(slots):
            image_offsets.append(off)
            off = _align(off + batch * image_size * image_size * 3)
            text_offsets.append(off)
            off = _align(off + batch * context * 4)
        return {"slots": slots, "batch": batch, "image_size": image_size, "context": context,
                "workers": workers, "image_offsets": image_offsets, "text_offsets": text_offsets, "nbytes": off}

    @classmethod
    def create(cls, layout: dict) -> "SharedSlots":
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("hetclip-batches")
        else:  # an unlinked file: gone with the last descriptor
            f = tempfile.TemporaryFile(prefix="hetclip-batches-")
            fd = os.dup(f.fileno())
            f.close()
        try:
            os.ftruncate(fd, layout["nbytes"])
            return cls(fd, layout)
        except BaseException:
            os.close(fd)
            raise

    def set_status(self, worker: int, text: str) -> None:
        raw = text.encode("utf-8", "replace")[: _STATUS_BYTES - 4]
        off = worker * _STATUS_BYTES
        self._mm[off + 4: off + 4 + len(raw)] = raw
        self._mm[off: off + 4] = len(raw).to_bytes(4, "little")

    def status(self, worker: int) -> str:
        off = worker * _STATUS_BYTES
        n = min(int.from_bytes(self._mm[off: off + 4], "little"), _STATUS_BYTES - 4)
        return self._mm[off + 4: off + 4 + n].decode("utf-8", "replace")

    def close(self, *, close_fd: bool = True) -> None:
        self.images, self.text = [], []
        try:
            self._mm.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes with it
            pass
        if close_fd:
            os.close(self.fd)


# ----------------------------------------------------------------------------- the producer

class Producer:
    """One worker's share: its sample stream, decoding, augmentation and tokenisation into sub-batches."""

    def __init__(self, setup: dict, tokenizer: Any):
        cfg = setup["cfg"]
        self.cfg, self.tokenizer = cfg, tokenizer
        self.stream = SampleStream(
            setup["sources"], seed=setup["seed"], process_index=setup["process_index"],
            process_count=setup["process_count"], shuffle_buffer=int(cfg["shuffle_buffer"]),
            shuffle_shards=bool(cfg["shuffle_shards"]), epochs=cfg["epochs"], fields=setup["fields"],
            state=setup["stream_state"], worker_index=setup["worker_index"], worker_count=setup["worker_count"])
        self.items = train_items(self.stream, setup["seed"], setup["process_index"], setup["worker_index"],
                                  setup["worker_count"])
        for _ in range(int(setup.get("skip", 0))):
            next(self.items)

    def fill(self, images: np.ndarray, text: np.ndarray, on_shard: Any = None) -> dict:
        """Fill ``images`` [n, H, W, 3] and ``text`` [n, L] with the next ``n`` usable samples.

        Returns ``{"end", "ok", "read", "bad": [(reason, url, key, message)], "state"}``; with ``end``
        the data ran out before ``n`` samples (``state`` is then None); ``"error"`` (with ``end``): every
        shard of this worker's epoch failed (``shards.NoSamples``; raised by the caller after counting).
        """
        n = images.shape[0]
        filled, read, bad, captions = 0, 0, [], []
        shard = None
        while filled < n:
            try:
                it = next(self.items)
            except StopIteration:
                return {"end": True, "ok": filled, "read": read, "bad": bad, "state": None}
            except NoSamples as e:  # raised after the failures it names were counted: the limits speak first
                return {"end": True, "ok": filled, "read": read, "bad": bad, "state": None, "error": str(e)}
            read += 1
            current = self.stream.current_shard
            if on_shard is not None and current is not None and current != shard:
                shard = current
                on_shard(shard)
            if not isinstance(it, tuple):  # ShardFailure
                bad.append((it.reason, it.url, None, it.detail))
                continue
            r = process(self.cfg, it, images[filled])  # decoded straight into the batch row
            if r[0] == "ok":
                captions.append(r[2])
                filled += 1
            else:
                bad.append((r[1], it[2], it[1], r[2]))
        if n:
            tokens = np.asarray(self.tokenizer(captions))
            if tokens.shape != text.shape:
                raise ValueError(f"tokenizer returned shape {tokens.shape} for {n} captions; expected "
                                 f"{text.shape} ([batch, context_length])")
            text[...] = tokens
        return {"end": False, "ok": filled, "read": read, "bad": bad, "state": self.stream.state()}

    def close(self) -> None:
        self.stream.close()


# ----------------------------------------------------------------------------- evaluation decoding

def decode_into(cfg: dict, items: list, images: np.ndarray) -> list:
    """Decode ``items`` into ``images[i]`` (evaluation); per item ``None`` (decoded) or ``(reason, message)``."""
    out = []
    for i, it in enumerate(items):
        r = process(cfg, it, images[i])
        out.append(None if r[0] == "ok" else (r[1], r[2]))
    return out


# ----------------------------------------------------------------------------- worker process

def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent is gone: kernel signal on Linux, a watchdog thread everywhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _one_thread_per_worker() -> None:
    """A worker is one core's worth of work: OpenCV's own thread pool (resampling) would only compete with the
    other workers and the trainer."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - the Pillow path has no threads of its own
        pass


def _portable(exc: BaseException) -> bytes | None:
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
        return blob
    except Exception:  # noqa: BLE001 - sent as text instead
        return None


class _TrainRole:
    """A training worker: each request names a slot; the reply is ``Producer.fill``'s report on its rows."""

    def __init__(self, setup: dict, slots: SharedSlots, worker: int):
        tok = setup["tokenizer"]
        if tok[0] == "spec":
            from .tokenizers import load_tokenizer

            tok = load_tokenizer(tok[1])
        else:
            tok = tok[1]
        self.slots, self.rows = slots, setup["rows"]
        self.producer = Producer(setup, tok)
        self.on_shard = lambda url: slots.set_status(worker, f"shard {url}")

    def __call__(self, slot: int) -> tuple[dict, bool]:
        off, n = self.rows
        out = self.producer.fill(self.slots.images[slot][off: off + n], self.slots.text[slot][off: off + n],
                                 self.on_shard)
        return out, out["end"]

    def close(self) -> None:
        self.producer.close()


class _EvalRole:
    """An evaluation worker: each request is ``(slot, items)``; the items are decoded into the slot's rows."""

    def __init__(self, setup: dict, slots: SharedSlots, worker: int):
        self.cfg, self.slots, self.worker = setup["cfg"], slots, worker

    def __call__(self, request: tuple) -> tuple[list, bool]:
        slot, items = request
        if items:
            self.slots.set_status(self.worker, f"image {item_name(items[0][2], items[0][1])} (and the "
                                               f"{len(items) - 1} after it)")
        return decode_into(self.cfg, items, self.slots.images[slot]), False

    def close(self) -> None:
        pass


_ROLES = {"train": _TrainRole, "eval": _EvalRole}


def worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: ``SHM_FD CMD_FD RESULT_FD PARENT_PID WORKER``."""
    shm_fd, cmd_fd, res_fd, parent_pid, worker = (int(a) for a in argv)
    # Ctrl-C and a TERM sent to the process group are for the parent (it saves a checkpoint and then
    # closes the loader); workers end with their command pipe or their parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    _one_thread_per_worker()
    cmd, res = Connection(cmd_fd, writable=False), Connection(res_fd, readable=False)
    try:
        sys.path[:] = cmd.recv()
        setup = cmd.recv()
    except (EOFError, OSError):
        os._exit(0)
    slots = SharedSlots(shm_fd, setup["layout"])
    role = None
    try:
        role = _ROLES[setup["role"]](setup, slots, worker)
        while True:
            try:
                request = pickle.loads(cmd.recv_bytes())
            except (EOFError, OSError):
                break
            if request is None:
                break
            reply, end = role(request)
            res.send_bytes(pickle.dumps(("ok", reply), protocol=pickle.HIGHEST_PROTOCOL))
            if end:
                break
    except BaseException as e:  # noqa: BLE001 - reported to the main process, which raises it
        try:
            res.send_bytes(pickle.dumps(("error", _portable(e), f"{type(e).__name__}: {e}", traceback.format_exc())))
        except OSError:
            pass
    finally:
        if role is not None:
            role.close()
        res.close()
        cmd.close()


class _Workers:
    """``len(setups)`` worker processes sharing one ``SharedSlots`` mapping, each with a command pipe and
    a result pipe. ``receive`` raises a worker's own error, or ``DataWorkerError`` when a worker died."""

    def __init__(self, layout: dict, setups: list[dict], process_index: int, idle: str, stopping: str):
        self.process_index, self._idle, self._stopping = process_index, idle, stopping
        self.procs: list[subprocess.Popen] = []
        self._cmd: list[Connection] = []
        self._res: list[Connection] = []
        self.slots: SharedSlots | None = SharedSlots.create(layout)
        try:
            for w, setup in enumerate(setups):
                self._start(w, {**setup, "layout": layout})
        except BaseException:
            self.close()
            raise

    def _start(self, w: int, setup: dict) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        code = "import sys; from hetclip.data.workers import worker_main; worker_main(sys.argv[1:])"
        args = [sys.executable, "-c", code, str(self.slots.fd), str(cmd_r), str(res_w), str(os.getpid()), str(w)]
        try:
            proc = subprocess.Popen(args, pass_fds=(self.slots.fd, cmd_r, res_w), env=env)
        finally:
            os.close(cmd_r)
            os.close(res_w)
        self.procs.append(proc)
        self._cmd.append(Connection(cmd_w, readable=False))
        self._res.append(Connection(res_r, writable=False))
        self._cmd[-1].send(list(sys.path))
        self._cmd[-1].send(setup)

    def send(self, w: int, request: Any) -> None:
        self._cmd[w].send_bytes(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self, w: int) -> Any:
        # Blocking: only the worker holds the write end, so its death is an end of file here.
        try:
            msg = pickle.loads(self._res[w].recv_bytes())
        except (EOFError, OSError):
            self._died(w)
        if msg[0] == "error":
            blob, text, tb = msg[1], msg[2], msg[3]
            exc = pickle.loads(blob) if blob is not None else None
            if isinstance(exc, Exception):
                raise exc
            raise DataWorkerError(f"data worker {w} of process {self.process_index} failed: {text}\n{tb}")
        return msg[1]

    def _died(self, w: int) -> None:
        proc = self.procs[w]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        doing = self.slots.status(w) if self.slots is not None else ""
        if code is None:
            how = "closed its result pipe"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        raise DataWorkerError(
            f"data worker {w} (pid {proc.pid}) of process {self.process_index} {how} "
            f"{'while reading ' + doing if doing else self._idle}; {self._stopping}")

    def close(self) -> None:
        """Ask the workers to stop, wait for them (killing any that hang) and free the shared memory."""
        for c in self._cmd:
            try:
                c.send(None)
            except OSError:
                pass
            c.close()
        for c in self._res:
            c.close()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs, self._cmd, self._res = [], [], []
        if self.slots is not None:
            self.slots.close()
            self.slots = None


# ----------------------------------------------------------------------------- the training loader

def _parse_state(state: dict | None, workers: int, requested: int) -> tuple[list, int, dict | None]:
    """Per-worker stream states, items to skip and counters from a saved loader state (either version)."""
    if state is None:
        return [None] * workers, 0, None
    version = state.get("version")
    if version == SINGLE_STREAM_STATE_VERSION:
        if workers != 1:
            raise ShardError(
                f"the loader state was saved by a loader with 1 data stream per process, this run uses {workers} "
                f"data workers (data.num_workers={requested}): batches depend on the worker count, so it cannot "
                "resume exactly; set data.num_workers=1 to resume")
        return [state["stream"]], int(state["skip"]), state.get("stats")
    if version != STATE_VERSION:
        raise ShardError(f"unsupported loader state version {version!r} (this loader reads versions "
                         f"{SINGLE_STREAM_STATE_VERSION} and {STATE_VERSION})")
    saved = int(state["workers"])
    if saved != workers:
        raise ShardError(
            f"the loader state was saved with {saved} data worker(s) per process, this run uses {workers} "
            f"(data.num_workers={requested}): batches depend on the worker count, so it cannot resume exactly; "
            f"set data.num_workers={saved} to resume")
    return list(state["streams"]), int(state.get("skip", 0)), state.get("stats")


class TrainLoader(Closing):
    """Iterator of ``{"image": uint8 [B, H, W, 3], "text": int32 [B, L]}`` with ``state()``, ``stats()``,
    ``close()`` (also a context manager). See the module docstring."""

    def __init__(self, *, cfg: dict, sources: list[Source], fields: Any, tokenizer: Any, batch_size: int,
                 seed: int, process_index: int, process_count: int, num_workers: int, state: dict | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._closed = True  # until everything is set up
        self._workers: _Workers | None = None
        self._producer: Producer | None = None
        self.batch_size, self.process_index = int(batch_size), int(process_index)
        mine = process_visits(sources, seed, 0, process_index, process_count, shuffle=bool(cfg["shuffle_shards"]))
        visits = len(mine)
        workers = max(1, int(num_workers))
        if workers > min(visits, batch_size):
            log.warning("data.num_workers=%d but process %d has %d shard visit(s) per epoch and a batch of %d: "
                        "using %d worker(s)", num_workers, process_index, visits, batch_size,
                        min(visits, batch_size))
            workers = min(visits, batch_size)
        self.num_workers = workers
        self.inline = num_workers == 0
        streams, skip, stats = _parse_state(state, workers, num_workers)
        # a process's share of the shards: its visits of the first epoch (the set is split, not sampled)
        self._ledger = Ledger(cfg, stats, shards=len(set(mine)))
        self._streams: list = list(streams)
        self._skip = skip  # items worker 0 still skips (a restored single-stream state), until a batch
        self._rows = split_rows(batch_size, workers)
        self._wait, self._read, self._k, self._ended = 0.0, 0, 0, False
        context = int(tokenizer.context_length)
        n_slots = 1 if self.inline else max(1, int(cfg["prefetch"]))
        self._n_slots = n_slots
        layout = SharedSlots.layout(n_slots, batch_size, int(cfg["image_size"]), context, workers)
        base = {"role": "train", "cfg": cfg, "sources": sources, "fields": fields, "seed": int(seed),
                "process_index": int(process_index), "process_count": int(process_count), "worker_count": workers}
        if self.inline:
            self._local = (np.zeros((batch_size, cfg["image_size"], cfg["image_size"], 3), np.uint8),
                           np.zeros((batch_size, context), np.int32))
            self._producer = Producer({**base, "worker_index": 0, "stream_state": streams[0], "skip": skip},
                                      tokenizer)
            self._closed = False
            return
        tok = _tokenizer_payload(tokenizer)
        setups = [{**base, "worker_index": w, "stream_state": streams[w], "skip": skip if w == 0 else 0,
                   "rows": self._rows[w], "tokenizer": tok} for w in range(workers)]
        self._workers = _Workers(layout, setups, self.process_index, "before it opened a shard",
                                 "stopping (checkpoints already written are intact)")
        self._closed = False
        try:
            for slot in range(n_slots):
                for w in range(workers):
                    self._workers.send(w, slot)
        except BaseException:
            self.close()
            raise

    # -- iteration
    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("loader is closed")
        if self._ended:
            raise StopIteration
        slot = self._k % self._n_slots
        t0 = time.perf_counter()
        try:
            if self.inline:
                outs = [self._producer.fill(*self._local)]
            else:
                outs = [self._workers.receive(w) for w in range(self.num_workers)]
        except BaseException:
            self.close()
            raise
        self._wait += time.perf_counter() - t0
        ended = False
        for out in outs:
            for b in out["bad"]:
                self._ledger.bad(*b)
            self._ledger.samples_ok += out["ok"]
            self._read += out["read"]
            ended = ended or out["end"]
        try:
            error = next((o["error"] for o in outs if o.get("error")), None)
            self._ledger.check(final=ended and not error)  # the shard limit first, then the worker's own error
            if error:
                raise NoSamples(error)
        except Exception:
            self.close()
            raise
        if ended:
            self._ended = True
            raise StopIteration
        if self.inline:
            batch = {"image": self._local[0].copy(), "text": self._local[1].copy()}
        else:
            slots = self._workers.slots
            batch = {"image": slots.images[slot].copy(), "text": slots.text[slot].copy()}
            for w in range(self.num_workers):
                try:
                    self._workers.send(w, slot)
                except OSError:  # the worker ended (its data ran out, or it died): its messages say which
                    pass
        self._streams = [o["state"] for o in outs]
        self._skip = 0
        self._ledger.batches += 1
        self._k += 1
        return batch

    # -- state, stats, shutdown
    def state(self) -> dict:
        """Position after the last returned batch (JSON-serialisable); pass as ``state=`` to resume."""
        return {"version": STATE_VERSION, "workers": self.num_workers, "streams": list(self._streams),
                "skip": self._skip, "stats": self._ledger.to_dict()}

    def stats(self) -> dict:
        """Samples read/used, skipped by reason (with recent examples), seconds waiting on workers."""
        return {**self._ledger.to_dict(), "samples_read": self._read, "wait_seconds": self._wait,
                "workers": self.num_workers, "bad_examples": list(self._ledger.examples)}

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers.procs] if self._workers is not None else []

    def close(self) -> None:
        """Stop the workers, free the shared memory and close open shards (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None


# ----------------------------------------------------------------------------- the evaluation loader

class _InlineDecoder:
    """The workers' interface in the calling process (``num_workers=0``): a request is decoded when its
    answer is asked for."""

    def __init__(self, layout: dict, cfg: dict):
        s = layout["image_size"]
        self.images = [np.zeros((layout["batch"], s, s, 3), np.uint8) for _ in range(layout["slots"])]
        self._cfg = cfg
        self._todo: collections.deque = collections.deque()

    def send(self, w: int, request: tuple) -> None:
        self._todo.append(request)

    def receive(self, w: int) -> list:
        slot, items = self._todo.popleft()
        return decode_into(self._cfg, items, self.images[slot])

    def close(self) -> None:
        self.images = []
        self._todo.clear()


class EvalLoader(Closing):
    """Evaluation batches in item order: ``{"image": uint8 [b, S, S, 3], "label": int32 [b], "name": [b]}``
    (``"label"`` is a list when the targets are not integers, e.g. retrieval captions; ``"name"`` holds
    ``item_name`` of each image). The last batch may be smaller. ``stats()`` and ``close()`` (also a context
    manager). Built by ``hetclip.data.loader.make_eval_loader``.

    The main process reads the items in order and sends them in chunks of ``chunk_size`` to the workers in
    turn (chunk ``j`` to worker ``j % W``; each worker answers its chunks in order), each chunk with a free
    shared-memory slot of ``chunk_size`` rows to decode into. It then walks the answers in chunk order:
    decoded rows are copied into the batch (one copy per chunk), skipped items go to the ``Ledger``. A slot
    is free again once its rows were copied out. ``W * prefetch`` chunks are in flight, plus one being read.
    """

    def __init__(self, *, items: Iterator, cfg: dict, batch_size: int, num_workers: int,
                 closers: Sequence[Callable[[], None]] = ()):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._closed = True
        self._items, self._cfg = items, cfg
        self._closers = list(closers)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self._size = int(cfg["image_size"])
        self._limit = None if cfg.get("limit") is None else int(cfg["limit"])
        self._ledger = Ledger(cfg)
        self._wait, self._read, self._sent = 0.0, 0, 0
        self._exhausted = False
        self._chunk = max(1, min(int(cfg["chunk_size"]), self.batch_size))
        workers = max(1, self.num_workers)
        n_slots = workers * max(1, int(cfg["prefetch"])) + 1
        self._free = list(range(n_slots - 1, -1, -1))
        self._inflight: collections.deque = collections.deque()  # [slot, worker, meta] per chunk, in item order
        self._current: list | None = None  # [slot, entries, position]: the chunk being read into batches
        self._outputs: list[np.ndarray] = []  # batch buffers, used again once the caller let go of them
        layout = SharedSlots.layout(n_slots, self._chunk, self._size, 0, workers)
        if self.num_workers == 0:
            self._transport: Any = _InlineDecoder(layout, cfg)
            self._images = self._transport.images
        else:
            setups = [{"role": "eval", "cfg": cfg} for _ in range(workers)]
            self._transport = _Workers(layout, setups, 0, "before its first image", "stopping the evaluation")
            self._images = self._transport.slots.images
        self._closed = False

    # -- iteration
    def __iter__(self) -> "EvalLoader":
        return self

    def _send(self) -> None:
        """Read chunks of items and send them to the workers while slots are free."""
        while self._free and not self._exhausted:
            meta, work = [], []
            while len(work) < self._chunk:
                try:
                    it = next(self._items)
                except StopIteration:
                    self._exhausted = True
                    break
                self._read += 1
                if isinstance(it, ShardFailure):
                    meta.append(it)
                else:
                    meta.append(it)
                    work.append(("eval", it[1], it[2], it[3], None, 0))
            if not meta:
                return
            slot = worker = None
            if work:
                slot, worker = self._free.pop(), self._sent % max(1, self.num_workers)
                self._sent += 1
                try:
                    self._transport.send(worker, (slot, work))
                except OSError:  # the worker died: receiving its answer says so, naming it
                    pass
            self._inflight.append((slot, worker, meta))

    def _next_chunk(self) -> list | None:
        """The oldest chunk in flight as ``[slot, entries, 0]``: per item ``(row, target, name)`` if decoded,
        else ``(None, reason, where, key, message)``."""
        self._send()
        if not self._inflight:
            return None
        slot, worker, meta = self._inflight.popleft()
        t0 = time.perf_counter()
        answers = iter(self._transport.receive(worker) if worker is not None else ())
        self._wait += time.perf_counter() - t0
        entries, row = [], 0
        for it in meta:
            if isinstance(it, ShardFailure):
                entries.append((None, it.reason, it.url, it.key, it.detail))
                continue
            a = next(answers)
            if a is None:
                entries.append((row, it[4], item_name(it[2], it[1])))
            else:
                entries.append((None, a[0], it[2], it[1], a[1]))
            row += 1
        return [slot, entries, 0]

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("loader is closed")
        want = self.batch_size
        if self._limit is not None:
            want = min(want, self._limit - self._ledger.samples_ok)
        try:
            batch = self._batch(want) if want > 0 else None
        except BaseException:
            self.close()
            raise
        if batch is None:
            self._check_bad(final=True)
            self.close()
            raise StopIteration
        self._check_bad(final=False)
        return batch

    def _output(self, rows: int) -> np.ndarray:
        """A ``[rows, S, S, 3]`` array for the next batch: a batch-sized buffer the caller no longer holds is
        used again (its pages are mapped already, so filling it costs no page faults), else a new one."""
        for buf in self._outputs:
            # our list and getrefcount's argument: no batch, view or array sharing its memory is alive
            if sys.getrefcount(buf) == 3:
                return buf[:rows]
        buf = np.empty((self.batch_size, self._size, self._size, 3), np.uint8)
        if len(self._outputs) < 4:
            self._outputs.append(buf)
        return buf[:rows]

    def _batch(self, want: int) -> dict[str, Any] | None:
        images = self._output(want)
        targets: list = []
        names: list = []
        while len(targets) < want:
            if self._current is None:
                self._current = self._next_chunk()
                if self._current is None:
                    break
            slot, entries, pos = self._current
            rows = []
            while pos < len(entries) and len(targets) < want:
                e = entries[pos]
                pos += 1
                if e[0] is None:
                    self._ledger.bad(*e[1:])
                else:
                    rows.append(e[0])
                    targets.append(e[1])
                    names.append(e[2])
            if rows:
                at = len(targets) - len(rows)
                if rows[-1] - rows[0] == len(rows) - 1:  # consecutive rows: one slice copy
                    images[at: len(targets)] = self._images[slot][rows[0]: rows[-1] + 1]
                else:
                    np.take(self._images[slot], rows, axis=0, out=images[at: len(targets)])
            self._current[2] = pos
            if pos == len(entries):
                if slot is not None:
                    self._free.append(slot)
                self._current = None
        self._ledger.samples_ok += len(targets)
        self._send()  # keep the workers busy while the caller uses this batch
        if not targets:
            return None
        self._ledger.batches += 1
        labels: Any = targets
        if all(isinstance(t, (int, np.integer)) for t in targets):
            labels = np.asarray(targets, np.int32)
        return {"image": images[: len(targets)], "label": labels, "name": names}

    def _check_bad(self, *, final: bool) -> None:
        try:
            self._ledger.check(final=final)
        except TooManyBadSamples:
            self.close()
            raise

    # -- stats, shutdown
    def stats(self) -> dict:
        """Samples read/used, skipped by reason (with recent examples), seconds waiting on workers."""
        return {**self._ledger.to_dict(), "samples_read": self._read, "wait_seconds": self._wait,
                "workers": self.num_workers, "bad_examples": list(self._ledger.examples)}

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in getattr(self._transport, "procs", [])]

    def close(self) -> None:
        """Stop the workers, free the shared memory and close open shards (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._transport.close()
        for c in self._closers:
            c()
        self._inflight.clear()
        self._current = None


def _tokenizer_payload(tokenizer: Any) -> tuple[str, Any]:
    """hetclip tokenizers travel as their spec (rebuilt in the worker), others pickled."""
    from .tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return ("spec", tokenizer.spec())
    try:
        pickle.dumps(tokenizer)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"the tokenizer {type(tokenizer).__name__} cannot be sent to the data workers: it is "
                        f"neither a hetclip Tokenizer nor picklable ({e}); use num_workers=0") from None
    return ("pickle", tokenizer)
