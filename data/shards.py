"""Webdataset shard sets: pattern expansion, sample counts, per-process split, resumable sample stream.

Shards follow the img2dataset / webdataset layout: tar files whose members are ``KEY.EXT``; members
sharing a key form one sample (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` ...).

Specification of a shard set (``shards=``):
  * one pattern with brace ranges/alternatives: ``"data/{00000..00099}.tar"``, globs ``"data/*.tar"``;
  * several sources joined by ``::`` (open_clip style): ``"a/{0..3}.tar::b/{0..1}.tar"``;
  * a list of patterns, of ``(pattern, weight)`` pairs or of ``{"shards": pattern, "weight": w}`` dicts;
  * ``pipe:COMMAND`` URLs (the command writes the tar to stdout), e.g. ``"pipe:cat data/{0..3}.tar"``.

Source weights are *upsampling factors* (open_clip's meaning): per epoch, a source with ``n`` shards
and weight ``w`` contributes ``round(w * n)`` shard visits (whole cycles of a shuffled list, then a
random part of one more), so its share of the samples grows by ``w``. Weight 1 everywhere means
one pass over every shard per epoch.

Determinism and resume. Everything random is a counter-based hash of (seed, epoch, process, counter):
the per-epoch shard order, the per-process split and the shuffle-buffer choices. The stream's
position is therefore a small dict (``SampleStream.state()``): epoch, index of the current shard
visit, number of samples read from it, number of samples emitted, and the shuffle buffer as
references ``[visit, index_in_shard]``. Restoring re-opens the current shard and reads (without
decoding) up to the saved offset, and re-reads the earlier shards of the epoch that still have
samples in the buffer (with a buffer much smaller than a shard: the current shard and one or two
before it). The cost of a restore is thus reading at most a few shards' bytes, never decoding.
The shuffle buffer is drained at each epoch end, so epochs never mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import tarfile
from typing import Any, Callable, Iterator, Sequence

import braceexpand

# ``webdataset`` is imported lazily (in ``iter_shard``): importing it costs seconds (it pulls in
# torch when available), which decode workers and CLI start-up should not pay.

# Image file extensions, in the order a sample's image member is chosen (webdataset members and the
# files of class folders alike).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "jpe", "bmp", "gif", "tif", "tiff", "ppm")
STATE_VERSION = 1
EMPTY_SHARD = "the shard holds no sample (no member named KEY.EXT)"

_MASK64 = (1 << 64) - 1


class ShardError(ValueError):
    """A shard specification or shard set that cannot be used (names the pattern or file)."""


class NoSamples(ShardError):
    """A stream's whole share of an epoch's shards failed or was empty (the message lists them)."""


class ShardReadError(IOError):
    """Reading one shard failed; ``url`` and ``reason`` say which and why."""

    def __init__(self, url: str, reason: str, detail: str, n_read: int):
        super().__init__(f"shard {url}: {reason}: {detail} (after {n_read} samples)")
        self.url, self.reason, self.detail, self.n_read = url, reason, detail, n_read


# ----------------------------------------------------------------------------- counter-based RNG

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_words(*words: int) -> int:
    """A 64-bit hash of a tuple of integers (stable across Python/numpy versions)."""
    h = 0x6A09E667F3BCC909
    for w in words:
        h = _splitmix64(h ^ (int(w) & _MASK64))
    return h


def permutation(n: int, *key: int) -> list[int]:
    """Fisher-Yates permutation of ``range(n)`` driven by ``hash_words(*key, i)``."""
    out = list(range(n))
    for i in range(n - 1, 0, -1):
        j = hash_words(*key, i) % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out


# ----------------------------------------------------------------------------- patterns and sources

@dataclasses.dataclass(frozen=True)
class Source:
    """One shard source: its pattern, the expanded shard URLs and its upsampling weight."""

    pattern: str
    urls: tuple[str, ...]
    weight: float = 1.0


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_pattern(pattern: str, *, check_exists: bool = True) -> list[str]:
    """Expand braces (``{000..009}``, ``{a,b}``) and, for local paths, globs; ordered, no duplicates.

    Raises ``ShardError`` when a local pattern matches no existing file.
    """
    pattern = pattern.strip()
    if not pattern:
        raise ShardError("empty shard pattern")
    urls: list[str] = []
    for url in braceexpand.braceexpand(pattern):
        if _is_local(url) and any(c in url for c in "*?["):
            urls.extend(sorted(glob.glob(os.path.expanduser(url))))
        else:
            urls.append(os.path.expanduser(url) if _is_local(url) else url)
    urls = list(dict.fromkeys(urls))
    if check_exists:
        local = [u for u in urls if _is_local(u)]
        if not urls or (local and not any(os.path.isfile(u) for u in local)):
            first = f" (first expansion: {urls[0]!r})" if urls else ""
            raise ShardError(f"shard pattern {pattern!r} matched no files{first}")
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise ShardError(f"{len(missing)} of the {len(urls)} shards of {pattern!r} do not exist: "
                             f"{name_list(missing)}")
    return urls


def name_list(names: Sequence[str], limit: int = 20) -> str:
    """``a, b, c`` (the first ``limit`` names, then how many more): shard lists in one-line messages."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _parse_weights(weights: Any, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        weights = weights.split("::")
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise ShardError(f"{len(ws)} source weights given for {n} shard sources")
    if any(w < 0 for w in ws) or not any(w > 0 for w in ws):
        raise ShardError(f"source weights must be >= 0 with at least one > 0, got {ws}")
    return ws


def parse_sources(shards: Any, weights: Any = None, *, check_exists: bool = True) -> list[Source]:
    """Turn a shard specification (see module docstring) into ``Source``s."""
    items: list[tuple[str, float | None]] = []
    if isinstance(shards, str):
        items = [(p, None) for p in shards.split("::")]
    elif isinstance(shards, Sequence) or hasattr(shards, "__iter__"):
        for entry in shards:
            if isinstance(entry, str):
                items.append((entry, None))
            elif isinstance(entry, (tuple, list)) and len(entry) == 2:
                items.append((str(entry[0]), float(entry[1])))
            elif hasattr(entry, "get") and (entry.get("shards") or entry.get("pattern")):
                w = entry.get("weight")
                items.append((str(entry.get("shards") or entry.get("pattern")), None if w is None else float(w)))
            else:
                raise ShardError(f"cannot understand shard source entry {entry!r}")
    else:
        raise ShardError(f"shards must be a pattern string or a list of sources, got {shards!r}")
    if not items:
        raise ShardError("no shard sources given")
    if weights is not None and any(w is not None for _, w in items):
        raise ShardError("give source weights either with the sources or as `weights`, not both")
    ws = _parse_weights(weights, len(items)) if weights is not None else \
        _parse_weights([1.0 if w is None else w for _, w in items], len(items))
    return [Source(p, tuple(expand_pattern(p, check_exists=check_exists)), w) for (p, _), w in zip(items, ws)]


# ----------------------------------------------------------------------------- sizes

def read_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Sample counts per shard from ``sizes.json`` beside the shards (``{"00000.tar": n, ...}``).

    Returns only the shards found; raises ``ShardError`` naming the file if a sizes.json is malformed.
    """
    cache: dict[str, dict] = {}
    out: dict[str, int] = {}
    for url in urls:
        if not _is_local(url):
            continue
        d = os.path.dirname(url) or "."
        if d not in cache:
            path = os.path.join(d, "sizes.json")
            cache[d] = {}
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        cache[d] = json.load(f)
                except (OSError, ValueError) as e:
                    raise ShardError(f"{path}: cannot read sample counts: {e}") from None
                if not isinstance(cache[d], dict):
                    raise ShardError(f"{path}: expected a JSON object {{shard name: count}}")
        name = os.path.basename(url)
        if name in cache[d]:
            out[url] = int(cache[d][name])
    return out


def epoch_size(sources: Sequence[Source], given: int | None = None) -> int:
    """Samples in one epoch over all processes: ``given`` if set, else from sizes.json files.

    With weights the count is the expected one (``sum_i w_i * n_i``).
    """
    if given:
        return int(given)
    total = 0.0
    for s in sources:
        sizes = read_sizes(s.urls)
        missing = [u for u in s.urls if u not in sizes]
        if missing:
            raise ShardError(
                f"no sample count for {len(missing)} shard(s) of {s.pattern!r} (e.g. {missing[0]}): "
                "add a sizes.json beside the shards or set the epoch size (data.epoch_size)")
        total += s.weight * sum(sizes[u] for u in s.urls)
    return int(round(total))


# ----------------------------------------------------------------------------- shard order and split

def epoch_visits(sources: Sequence[Source], seed: int, epoch: int, *, shuffle: bool = True) -> list[str]:
    """The global list of shard visits of one epoch (all processes), deterministic from (seed, epoch)."""
    visits: list[str] = []
    for si, src in enumerate(sources):
        n = len(src.urls)
        count = int(round(src.weight * n))
        if src.weight > 0:
            count = max(count, 1)
        for k in range(count):
            cycle, i = divmod(k, n)
            order = permutation(n, seed, epoch, si, cycle, 1) if shuffle else list(range(n))
            visits.append(src.urls[order[i]])
    if shuffle:
        visits = [visits[i] for i in permutation(len(visits), seed, epoch, 2)]
    return visits


def process_visits(sources: Sequence[Source], seed: int, epoch: int, process_index: int,
                   process_count: int, *, shuffle: bool = True) -> list[str]:
    """This process's shard visits of an epoch: every ``process_count``-th visit (disjoint split)."""
    if not 0 <= process_index < process_count:
        raise ShardError(f"process_index {process_index} not in [0, {process_count})")
    visits = epoch_visits(sources, seed, epoch, shuffle=shuffle)
    if len(visits) < process_count:
        pats = "::".join(s.pattern for s in sources)
        raise ShardError(
            f"{len(visits)} shard(s) in {pats!r} for {process_count} processes: each process needs at "
            "least one shard; write more, smaller shards (hetclip-shards from-captions --shard-size)")
    return visits[process_index::process_count]


# ----------------------------------------------------------------------------- reading one shard

def _close_stream(f: Any) -> None:
    proc = getattr(f, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()  # stop a pipe: command we no longer need
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
    try:
        if proc is not None:
            f.stream.close()
        else:
            f.close()
    except Exception:  # noqa: BLE001
        pass


def is_image_name(name: str) -> bool:
    """Whether a file or member name ends in one of ``IMAGE_EXTS`` (any case)."""
    return os.path.splitext(name)[1][1:].lower() in IMAGE_EXTS


def split_key(name: str) -> tuple[str, str] | None:
    """``dir/000001.seg.jpg`` -> (``dir/000001``, ``seg.jpg``): key up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:].lower()


def iter_shard(url: str, fields: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Samples of one shard as dicts ``{"__key__", "__url__", ext: bytes...}``, in tar order.

    ``fields(ext)`` selects which members to keep (all by default). Raises ``ShardReadError`` when the
    shard cannot be opened (``unreadable_shard``) or ends early (``truncated_shard``); samples before
    the failure have been yielded. Closes the file/pipe however the generator ends.
    """
    from webdataset.gopen import gopen

    from .tar import members

    try:
        f = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001
        raise ShardReadError(url, "unreadable_shard", f"{type(e).__name__}: {e}", 0) from None
    n = 0
    current: dict | None = None
    try:
        try:
            for name, data in members(f):
                kx = split_key(name)
                if kx is None:
                    continue
                key, ext = kx
                if current is None or current["__key__"] != key:
                    if current is not None:
                        n += 1
                        yield current
                    current = {"__key__": key, "__url__": url}
                if fields is None or fields(ext):
                    current[ext] = data
            status = getattr(f, "proc", None)
            if status is not None:
                f.stream.close()
                code = f.proc.wait()
                if code != 0:
                    raise ShardReadError(url, "unreadable_shard", f"command exited with status {code}", n)
        except ShardReadError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            reason = "unreadable_shard" if n == 0 and current is None and not isinstance(e, EOFError) \
                else "truncated_shard"
            msg = str(e)
            if "unexpected end" in msg or isinstance(e, EOFError):
                reason = "truncated_shard"
            raise ShardReadError(url, reason, f"{type(e).__name__}: {msg}", n) from None
        if current is not None:
            n += 1
            yield current
    finally:
        _close_stream(f)


# ----------------------------------------------------------------------------- the resumable stream

@dataclasses.dataclass
class ShardFailure:
    """Marker emitted in stream order when a shard could not be read to its end (or, with ``key``, when
    one sample is unusable before decoding, e.g. an evaluation sample without a label)."""

    url: str
    reason: str
    detail: str
    key: str | None = None  # set when one sample, not the rest of a shard, is unusable


class SampleStream:
    """Deterministic, resumable stream of raw samples for one process.

    Iterating yields sample dicts (see ``iter_shard``; plus ``"__epoch__"`` and ``"__index__"``, the
    number of items emitted before it) and ``ShardFailure`` markers. ``state()`` after any item is a
    JSON-serialisable dict; ``SampleStream(..., state=s)`` continues the identical stream.

    ``worker_index`` / ``worker_count`` split this process's shard visits once more (every
    ``worker_count``-th visit of ``process_visits``) for the loader's worker processes; each worker's
    shuffle draws are keyed by its index as well. With ``worker_count=1`` the stream is the process's
    whole stream.
    """

    def __init__(self, sources: Sequence[Source], *, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle_buffer: int = 1000, shuffle_shards: bool = True,
                 epochs: int | None = None, fields: Callable[[str], bool] | None = None,
                 state: dict | None = None, worker_index: int = 0, worker_count: int = 1):
        self.sources = list(sources)
        self.seed, self.pi, self.pc = int(seed), int(process_index), int(process_count)
        self.wi, self.wc = int(worker_index), int(worker_count)
        if not 0 <= self.wi < self.wc:
            raise ShardError(f"worker_index {self.wi} not in [0, {self.wc})")
        self.buffer_size = max(int(shuffle_buffer), 0)
        self.shuffle_shards, self.epochs, self.fields = shuffle_shards, epochs, fields
        self.fingerprint = hash_words(*(hash_words(*s.encode()) for src in self.sources
                                        for s in (src.pattern, repr(src.weight), *src.urls)))
        self._reader: Iterator[dict] | None = None
        self._any_sample_ever = False
        self._start_epoch(0)  # also checks the per-process split
        self._n = 0  # items emitted so far (the shuffle RNG counter)
        if state is not None:
            self._restore(state)

    # -- epoch bookkeeping
    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._visits = process_visits(self.sources, self.seed, epoch, self.pi, self.pc,
                                      shuffle=self.shuffle_shards)[self.wi::self.wc]
        if not self._visits:
            raise ShardError(f"worker {self.wi} of {self.wc} of process {self.pi} has no shard to read; "
                             "use fewer data workers or more, smaller shards")
        self._visit = -1          # index of the open shard visit
        self._offset = 0          # samples read from it
        self._done = True         # the current visit has been read to its end (or failed)
        self._buffer: list[tuple[int, int, dict]] = []  # (visit, index in shard, sample)
        self._draining = False
        self._epoch_samples = 0
        self._failures: list[str] = []
        self._close_reader()

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()  # type: ignore[attr-defined]
            self._reader = None

    def close(self) -> None:
        """Close any open shard (file or pipe)."""
        self._close_reader()
        self._buffer = []

    def __enter__(self) -> "SampleStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- raw reading
    def _read_one(self) -> dict | ShardFailure | None:
        """Next sample of the epoch's shard sequence (None at the epoch's end)."""
        while True:
            if self._reader is None:
                if self._visit + 1 >= len(self._visits):
                    return None
                self._visit += 1
                self._offset = 0
                self._done = False
                self._reader = iter_shard(self._visits[self._visit], self.fields)
            try:
                sample = next(self._reader)
            except StopIteration:
                self._reader, self._done = None, True
                if self._offset == 0:  # read to its end without one sample: a shard failure too
                    url = self._visits[self._visit]
                    self._failures.append(f"{url}: empty_shard: {EMPTY_SHARD}")
                    return ShardFailure(url, "empty_shard", EMPTY_SHARD)
                continue
            except ShardReadError as e:
                self._reader, self._done = None, True
                self._failures.append(f"{e.url}: {e.reason}: {e.detail}")
                return ShardFailure(e.url, e.reason, e.detail)
            self._offset += 1
            return sample

    def _draw(self, high: int) -> int:
        if self.wc == 1:
            return hash_words(self.seed, self.pi, self.epoch, self._n, 3) % high
        return hash_words(self.seed, self.pi, self.wi, self.wc, self.epoch, self._n, 3) % high

    @property
    def current_shard(self) -> str | None:
        """URL of the shard being read (None between shards)."""
        return self._visits[self._visit] if self._reader is not None else None

    def __iter__(self) -> "SampleStream":
        return self

    def __next__(self) -> dict | ShardFailure:
        while True:
            if not self._draining:
                item = self._read_one()
                if isinstance(item, ShardFailure):
                    self._n += 1
                    return item
                if item is None:
                    self._draining = True
                    self._close_reader()
                    continue
                self._epoch_samples += 1
                entry = (self._visit, self._offset - 1, item)
                if self.buffer_size <= 1:
                    return self._emit(entry)
                if len(self._buffer) < self.buffer_size:
                    self._buffer.append(entry)
                    continue
                j = self._draw(len(self._buffer))
                out, self._buffer[j] = self._buffer[j], entry
                return self._emit(out)
            if self._buffer:
                j = self._draw(len(self._buffer))
                self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
                return self._emit(self._buffer.pop())
            if self._epoch_samples == 0 and not self._any_sample_ever:
                raise NoSamples(
                    f"epoch {self.epoch}: no sample could be read from the {len(self._visits)} shard(s) "
                    f"of process {self.pi}{f' worker {self.wi}' if self.wc > 1 else ''}: "
                    + "; ".join(self._failures[:5] or [f"{self._visits[0]}: empty"]))
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self._start_epoch(self.epoch + 1)

    def _emit(self, entry: tuple[int, int, dict]) -> dict:
        sample = dict(entry[2])
        sample["__epoch__"] = self.epoch
        sample["__index__"] = self._n
        self._n += 1
        self._any_sample_ever = True
        return sample

    # -- state
    def state(self) -> dict:
        """Position after the last emitted item (JSON-serialisable)."""
        return {
            "version": STATE_VERSION, "fingerprint": format(self.fingerprint, "016x"),
            "seed": self.seed, "process_index": self.pi, "process_count": self.pc,
            "worker_index": self.wi, "worker_count": self.wc,
            "epoch": self.epoch, "visit": self._visit, "offset": self._offset, "done": self._done,
            "emitted": self._n, "draining": self._draining,
            "any_sample": self._any_sample_ever, "epoch_samples": self._epoch_samples,
            "buffer": [[v, i] for v, i, _ in self._buffer],
        }

    def _restore(self, st: dict) -> None:
        if st.get("version") != STATE_VERSION:
            raise ShardError(f"unsupported stream state version {st.get('version')!r}")
        for k, mine in (("seed", self.seed), ("process_index", self.pi), ("process_count", self.pc),
                        ("worker_index", self.wi), ("worker_count", self.wc)):
            if st.get(k, 0 if k == "worker_index" else 1) != mine:
                raise ShardError(f"stream state was saved with {k}={st.get(k)}, this stream has {k}={mine}")
        if st["fingerprint"] != format(self.fingerprint, "016x"):
            raise ShardError("stream state was saved for a different shard set (patterns, weights or "
                             "expanded file list changed); cannot resume exactly")
        self._start_epoch(int(st["epoch"]))
        self._n = int(st["emitted"])
        self._any_sample_ever = bool(st["any_sample"])
        self._epoch_samples = int(st["epoch_samples"])
        self._draining = bool(st["draining"])
        refs = [(int(v), int(i)) for v, i in st["buffer"]]
        visit, offset = int(st["visit"]), int(st["offset"])
        wanted: dict[int, set[int]] = {}
        for v, i in refs:
            wanted.setdefault(v, set()).add(i)
        reopen = 0 <= visit < len(self._visits) and not self._draining and not st["done"]
        found: dict[tuple[int, int], dict] = {}
        for v in sorted(set(wanted) | ({visit} if reopen else set())):
            want = wanted.get(v, set())
            if v == visit and reopen:
                # Re-open the current shard and skip (read, not decode) the samples already taken.
                self._reader = iter_shard(self._visits[v], self.fields)
                for i in range(offset):
                    try:
                        sample = next(self._reader)
                    except (StopIteration, ShardReadError):
                        self._reader = None
                        break
                    if i in want:
                        found[(v, i)] = sample
                continue
            with contextlib.closing(iter_shard(self._visits[v], self.fields)) as it:
                try:
                    for i, sample in enumerate(it):
                        if i in want:
                            found[(v, i)] = sample
                        if i >= max(want):
                            break
                except ShardReadError:
                    pass
        self._visit, self._offset, self._done = visit, offset, bool(st["done"]) or not reopen
        missing = [r for r in refs if r not in found]
        if missing:
            raise ShardError(f"cannot restore the shuffle buffer: {len(missing)} sample(s) no longer "
                             f"readable, e.g. sample {missing[0][1]} of {self._visits[missing[0][0]]}")
        self._buffer = [(v, i, found[(v, i)]) for v, i in refs]
