"""Batches for training and evaluation: the data specs and the two loader factories.

Both loaders run the per-sample work (``hetclip.data.samples``) in the same worker processes, which
write uint8 images straight into shared-memory batch slots (``hetclip.data.workers``); ``num_workers=0``
does the work in the calling process.

Training: ``make_train_loader`` builds a ``TrainLoader``: each worker owns its share of the shard
visits (reading, shuffle buffer, decode, augment, tokenise); batches depend on the number of workers;
``state()`` resumes exactly. A sample's augmentation randomness is
``hash(seed, process, [worker], position in its stream)``.

Evaluation: ``make_eval_loader(items, ...)`` builds an ``EvalLoader`` over work items from an evaluation
source (``hetclip.zero_shot.datasets``: class folders, ``.cls`` shards, retrieval shards): the main
process walks the items in a fixed order and hands chunks of them to the workers in turn; the batches
are assembled in item order, so they do not depend on the number of workers. Evaluation loaders are
read once (no ``state()``).

Bad input: a sample without image or caption, with an empty caption, an undecodable image, an
image over the pixel limit or in an unconvertible mode is skipped; so is the rest of a truncated or
unreadable shard, and a shard without samples. Each is counted by reason, named in a
``BadSampleWarning`` (shard URL and key; the first ``warn_limit`` of each reason) and listed in
``stats()`` (``Ledger``, in the main process; workers report what they skipped with every
sub-batch; failed shards by URL in ``bad_shards``). More than ``max_bad_fraction`` of skipped
samples (checked once ``bad_check_after`` samples were seen, and at the end of the data) raises
``TooManyBadSamples``; so do failed shards (distinct URLs) over ``max_bad_shard_fraction`` of the
shards a training process reads (checked at every batch). Local shards that do not exist are
refused before any reading (``shards.expand_pattern``).
"""

from __future__ import annotations

from typing import Any, Iterator

from hetclip.suggest import did_you_mean

from . import decode
from .samples import (BadSampleWarning, TooManyBadSamples, TrainFields, caption_fields, eval_item,
                      extract_caption, item_name)
from .shards import ShardError, epoch_size, parse_sources
from .workers import DataWorkerError, EvalLoader, TrainLoader

Loader = EvalLoader  # the evaluation loader's name for its users' annotations

__all__ = ["BadSampleWarning", "DataWorkerError", "EVAL_DEFAULTS", "EvalLoader", "Loader", "TRAIN_DEFAULTS",
           "TooManyBadSamples", "TrainLoader", "caption_fields", "eval_item", "extract_caption", "item_name",
           "make_eval_loader", "make_train_loader", "resolve_spec"]

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
    "chunk_size": 16,           # items a worker decodes per request
    "prefetch": 2,              # requests in flight per worker
    "warn_limit": 20,
}


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


# ----------------------------------------------------------------------------- the factories

def make_train_loader(spec: Any, tokenizer: Any, *, batch_size: int, seed: int, process_index: int = 0,
                      process_count: int = 1, num_workers: int = 2, state: dict | None = None,
                      **overrides: Any) -> Any:
    """Training loader over webdataset shards (``spec`` keys: see ``TRAIN_DEFAULTS``).

    ``batch_size`` is per process. Yields ``{"image": uint8 [B, H, W, 3], "text": int32 [B, L]}``
    (normalise with ``decode.normalize`` or on the device); see ``hetclip.data.workers``.
    ``loader.epoch_size`` is the epoch size over all processes (sizes.json or ``epoch_size``; None
    if unknown).
    """
    cfg = resolve_spec(spec, TRAIN_DEFAULTS, **overrides)
    if not cfg["shards"]:
        raise ShardError("data spec has no `shards`")
    sources = parse_sources(cfg["shards"], cfg["weights"])
    wcfg = {"mode": "train", **{k: cfg[k] for k in ("image_size", "caption_key", "crop_scale", "crop_ratio",
                                                       "max_pixels", "background")}}
    loader = TrainLoader(cfg={**cfg, **wcfg}, sources=sources, fields=TrainFields(cfg["caption_key"]),
                         tokenizer=tokenizer, batch_size=batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, num_workers=num_workers, state=state)
    try:
        loader.epoch_size = epoch_size(sources, cfg["epoch_size"])  # type: ignore[attr-defined]
    except ShardError:
        loader.epoch_size = None  # type: ignore[attr-defined]
    return loader


def make_eval_loader(items: Iterator, *, batch_size: int, num_workers: int = 2, **overrides: Any) -> EvalLoader:
    """Evaluation loader over ``items`` (``eval_item`` tuples and ``ShardFailure`` markers, in order);
    settings: ``EVAL_DEFAULTS``. Yields uint8 images (normalise on the device, e.g.
    ``hetclip.model.normalize_images``, or with ``decode.normalize``)."""
    cfg = resolve_spec(None, EVAL_DEFAULTS, **overrides)
    if cfg["resize_size"] is not None and int(cfg["resize_size"]) < int(cfg["image_size"]):
        raise ValueError(f"resize_size {cfg['resize_size']} is smaller than the crop size {cfg['image_size']}")
    if int(cfg["image_size"]) < 1:
        raise ValueError(f"image_size must be >= 1, got {cfg['image_size']}")
    items = iter(items)
    return EvalLoader(items=items, cfg={**cfg, "mode": "eval"}, batch_size=batch_size, num_workers=num_workers,
                      closers=[getattr(items, "close", lambda: None)])
