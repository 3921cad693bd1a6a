"""Training batches built by worker processes into shared memory.

Each of the ``W`` workers of a process owns every ``W``-th shard visit of that process's share of an
epoch (``SampleStream(worker_index=w, worker_count=W)``) and does all per-sample work itself: shard
reading, sample grouping, its own shuffle buffer, decoding, augmentation and tokenisation. A batch
of ``B`` rows is the concatenation of one sub-batch per worker (worker ``w`` fills rows
``[offset_w, offset_w + B_w)``, ``B_w`` = ``B // W`` plus one for the first ``B % W`` workers) written
straight into a shared-memory slot: ``image`` uint8 ``[B, H, W, 3]`` and ``text`` int32 ``[B, L]``.
The main process waits for the ``W`` sub-batches of a slot, copies the slot out (one memcpy per
array) and hands the slot back; it does no per-sample work.

Determinism: batches depend on the seed, the process split and the number of workers (not on
timing). ``num_workers=0`` runs the single producer in the calling process and gives the same
batches as one worker (useful for debugging).

Resume: ``state()`` holds, per worker, its stream position after its last sub-batch the caller
received, plus the sample counters; a loader built with that state continues with the identical next
batch. A state saved with a different number of workers is refused with both counts named. A state
of the single-stream loader format (version 1) resumes with one worker.

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
224-px batch: 0.46 GB).
"""

from __future__ import annotations

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
from typing import Any

import numpy as np

from .loader import LOADER_STATE_VERSION as _V1, Closing, Ledger, _process, _train_items
from .shards import NoSamples, SampleStream, ShardError, Source, process_visits

log = logging.getLogger("hetclip.data")

STATE_VERSION = 2
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
        self.items = _train_items(self.stream, setup["seed"], setup["process_index"], setup["worker_index"],
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
            r = _process(self.cfg, it)
            if r[0] == "ok":
                images[filled] = r[1]
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


def _portable(exc: BaseException) -> bytes | None:
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
        return blob
    except Exception:  # noqa: BLE001 - sent as text instead
        return None


def worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: ``SHM_FD CMD_FD RESULT_FD PARENT_PID WORKER``."""
    shm_fd, cmd_fd, res_fd, parent_pid, worker = (int(a) for a in argv)
    # Ctrl-C and a TERM sent to the process group are for the parent (it saves a checkpoint and then
    # closes the loader); workers end with their command pipe or their parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    cmd, res = Connection(cmd_fd, writable=False), Connection(res_fd, readable=False)
    try:
        sys.path[:] = cmd.recv()
        setup = cmd.recv()
    except (EOFError, OSError):
        os._exit(0)
    slots = SharedSlots(shm_fd, setup["layout"])
    offset, rows = setup["rows"]
    producer = None
    try:
        tok = setup["tokenizer"]
        if tok[0] == "spec":
            from .tokenizers import load_tokenizer

            tok = load_tokenizer(tok[1])
        else:
            tok = tok[1]
        producer = Producer(setup, tok)
        on_shard = lambda url: slots.set_status(worker, url)  # noqa: E731
        while True:
            try:
                slot = pickle.loads(cmd.recv_bytes())
            except (EOFError, OSError):
                break
            if slot is None:
                break
            out = producer.fill(slots.images[slot][offset: offset + rows], slots.text[slot][offset: offset + rows],
                                on_shard)
            res.send_bytes(pickle.dumps(("ok", slot, out), protocol=pickle.HIGHEST_PROTOCOL))
            if out["end"]:
                break
    except BaseException as e:  # noqa: BLE001 - reported to the main process, which raises it
        try:
            res.send_bytes(pickle.dumps(("error", _portable(e), f"{type(e).__name__}: {e}", traceback.format_exc())))
        except OSError:
            pass
    finally:
        if producer is not None:
            producer.close()
        res.close()
        cmd.close()


# ----------------------------------------------------------------------------- the loader

def _parse_state(state: dict | None, workers: int, requested: int) -> tuple[list, int, dict | None]:
    """Per-worker stream states, items to skip and counters from a saved loader state."""
    if state is None:
        return [None] * workers, 0, None
    version = state.get("version")
    if version == _V1:
        if workers != 1:
            raise ShardError(
                f"the loader state was saved by a loader with 1 data stream per process, this run uses {workers} "
                f"data workers (data.num_workers={requested}): batches depend on the worker count, so it cannot "
                "resume exactly; set data.num_workers=1 to resume")
        return [state["stream"]], int(state["skip"]), state.get("stats")
    if version != STATE_VERSION:
        raise ShardError(f"unsupported loader state version {version!r}")
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
        self._procs: list[subprocess.Popen] = []
        self._cmd: list[Connection] = []
        self._res: list[Connection] = []
        self._slots: SharedSlots | None = None
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
        layout = SharedSlots.layout(n_slots, batch_size, int(cfg["image_size"]), context, workers)
        base = {"cfg": cfg, "sources": sources, "fields": fields, "seed": int(seed),
                "process_index": int(process_index), "process_count": int(process_count),
                "worker_count": workers, "layout": layout}
        if self.inline:
            self._local = (np.zeros((batch_size, cfg["image_size"], cfg["image_size"], 3), np.uint8),
                           np.zeros((batch_size, context), np.int32))
            self._producer = Producer({**base, "worker_index": 0, "stream_state": streams[0], "skip": skip},
                                      tokenizer)
            self._closed = False
            return
        self._slots = SharedSlots.create(layout)
        self._closed = False
        try:
            tok = _tokenizer_payload(tokenizer)
            for w in range(workers):
                self._start_worker(w, {**base, "worker_index": w, "stream_state": streams[w],
                                       "skip": skip if w == 0 else 0, "rows": self._rows[w], "tokenizer": tok})
            for slot in range(n_slots):
                for c in self._cmd:
                    c.send_bytes(pickle.dumps(slot))
        except BaseException:
            self.close()
            raise

    def _start_worker(self, w: int, setup: dict) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        code = "import sys; from hetclip.data.workers import worker_main; worker_main(sys.argv[1:])"
        args = [sys.executable, "-c", code, str(self._slots.fd), str(cmd_r), str(res_w), str(os.getpid()), str(w)]
        try:
            proc = subprocess.Popen(args, pass_fds=(self._slots.fd, cmd_r, res_w), env=env)
        finally:
            os.close(cmd_r)
            os.close(res_w)
        self._procs.append(proc)
        self._cmd.append(Connection(cmd_w, readable=False))
        self._res.append(Connection(res_r, writable=False))
        self._cmd[-1].send(list(sys.path))
        self._cmd[-1].send(setup)

    # -- iteration
    def __iter__(self) -> "TrainLoader":
        return self

    def _receive(self, w: int) -> dict:
        # Blocking: only the worker holds the write end, so its death is an end of file here.
        try:
            msg = pickle.loads(self._res[w].recv_bytes())
        except (EOFError, OSError):
            self._died(w)
        if msg[0] == "error":
            blob, text, tb = msg[1], msg[2], msg[3]
            self.close()
            exc = pickle.loads(blob) if blob is not None else None
            if isinstance(exc, Exception):
                raise exc
            raise DataWorkerError(f"data worker {w} of process {self.process_index} failed: {text}\n{tb}")
        return msg[2]

    def _died(self, w: int) -> None:
        proc = self._procs[w]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        shard = self._slots.status(w) if self._slots is not None else ""
        if code is None:
            how = "closed its result pipe"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        self.close()
        raise DataWorkerError(
            f"data worker {w} (pid {proc.pid}) of process {self.process_index} {how} "
            f"{'while reading shard ' + shard if shard else 'before it opened a shard'}; stopping "
            "(checkpoints already written are intact)")

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("loader is closed")
        if self._ended:
            raise StopIteration
        slot = self._k % (1 if self.inline else self._slots.layout["slots"])
        t0 = time.perf_counter()
        if self.inline:
            outs = [self._producer.fill(*self._local)]
        else:
            outs = [self._receive(w) for w in range(self.num_workers)]
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
            batch = {"image": self._slots.images[slot].copy(), "text": self._slots.text[slot].copy()}
            order = pickle.dumps(slot)
            for c in self._cmd:
                try:
                    c.send_bytes(order)
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
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop the workers, free the shared memory and close open shards (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for c in self._cmd:
            try:
                c.send(None)
            except OSError:
                pass
            c.close()
        for c in self._res:
            c.close()
        deadline = time.monotonic() + 10
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs, self._cmd, self._res = [], [], []
        if self._slots is not None:
            self._slots.close()
            self._slots = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None


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
