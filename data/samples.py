"""The per-sample pieces shared by the training and evaluation loaders (``hetclip.data.workers``).

* Work items: ``train_items`` turns a ``SampleStream`` into training items whose augmentation seed hashes
  ``(seed, process, [worker], position in the stream)``; ``eval_item`` builds an evaluation item (encoded
  bytes or a file path, a label or captions). ``process`` decodes one item (in a worker process, or in the
  caller with ``num_workers=0``) into ``("ok", image, target)`` or ``("bad", reason, message)``.
* Captions: ``caption_fields`` / ``extract_caption`` (``"txt"``, ``"json:field.sub"``, alternatives joined by ``,``).
* Bad input: ``Ledger`` counts used and skipped samples in the main process, names skipped ones in a
  ``BadSampleWarning`` and raises ``TooManyBadSamples`` over the limits; ``item_name`` is how a sample is named.
* ``Closing``: ``close()`` on leaving a ``with`` block and on garbage collection.
"""

from __future__ import annotations

import collections
import json
import random
import warnings
from typing import Any, Iterator

from . import decode
from .shards import IMAGE_EXTS, SampleStream, ShardFailure, hash_words, name_list


class BadSampleWarning(UserWarning):
    """A sample or shard was skipped (the message names the shard and key and why)."""


class TooManyBadSamples(RuntimeError):
    """Skipped samples exceed ``max_bad_fraction`` (or failed shards ``max_bad_shard_fraction``)."""


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

def process(cfg: dict, item: tuple, out: Any = None) -> tuple:
    """Decode one item -> ("ok", uint8 image, caption or label) or ("bad", reason, message); the image is
    written into ``out`` (uint8 [S, S, 3], e.g. a row of a shared-memory batch) when given."""
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
                ratio=cfg["crop_ratio"], max_pixels=cfg["max_pixels"], background=cfg["background"], out=out)
        else:
            if image is None:
                return ("bad", "missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
            target = extra
            if isinstance(image, str):  # a class folder's file: read here, in the worker
                with open(image, "rb") as f:
                    image = f.read()
            arr = decode.eval_transform_uint8(image, cfg["image_size"], resize_size=cfg["resize_size"],
                                              max_pixels=cfg["max_pixels"], background=cfg["background"], out=out)
        return ("ok", arr, target)
    except decode.DecodeError as e:
        return ("bad", e.reason, str(e))
    except OSError as e:  # a file of a class folder that cannot be read
        return ("bad", "unreadable_file", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - one bad sample must not kill the run
        return ("bad", "error", f"{type(e).__name__}: {e}")

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

class TrainFields:
    """The members a training sample needs (picklable: it travels to the workers)."""

    def __init__(self, caption_key: str):
        self.keep = frozenset(IMAGE_EXTS) | {ext for ext, _ in caption_fields(caption_key)}

    def __call__(self, ext: str) -> bool:
        return ext in self.keep


def train_items(stream: SampleStream, seed: int, process_index: int, worker_index: int = 0,
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

def item_name(where: str, key: str | None) -> str:
    """How messages and per-image outputs name a sample: its file, or ``shard:key`` for a shard member."""
    return f"{where}:{key}" if key and key not in where else str(where)


def eval_item(key: str, where: str, image: bytes | str | None, target: Any) -> tuple:
    """A work item for ``make_eval_loader``: ``image`` is encoded bytes or a file path (read by the worker),
    ``where`` names the shard or file in messages, ``target`` is a label or captions."""
    return ("eval", key, where, image, target, 0)

