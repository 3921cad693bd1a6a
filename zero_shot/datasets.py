"""Evaluation sources for zero-shot classification and retrieval, read through ``hetclip.data``.

Sources (each has ``classnames``, ``items()`` — work items for ``hetclip.data.loader.make_eval_loader`` —
and ``describe()``):

* ``ImageFolder(root, classnames=None)``: one sub-folder per class (``hetclip.data.folders``); class
  names from a list/file (one per line, in sorted folder order) or the folder names. An empty class
  folder keeps its label (warning).
* ``imagenet(root)``: an ``ImageFolder`` whose folders must be exactly the 1000 ImageNet WNIDs; names are
  the CLIP class names. A wrong layout raises an error listing the missing/extra folders.
* ``WdsClassification(shards, classnames=None)``: webdataset tars with ``KEY.<image ext>`` + ``KEY.cls``
  (CLIP_benchmark layout: ``DIR/*.tar`` or ``DIR/test/*.tar`` with ``DIR/classnames.txt``). A label
  that is not an integer in ``[0, classes)`` is an error (the data set, not one sample, is wrong).
* ``WdsRetrieval(shards)``: webdataset tars with ``KEY.<image ext>`` + ``KEY.txt`` (one caption a line)
  or ``KEY.json`` (``{"captions": [...]}`` or a list).

``eval_batches(source, image_size, batch_size, workers=...)`` is the loader: worker processes read and
decode (resize shortest side bicubic, centre crop) in source order; batches carry uint8 images (the
evaluator normalises on the device). Unusable samples (undecodable image, sample without image, label or
caption, truncated shard) are skipped, named in a ``BadSampleWarning`` and counted in ``stats()``; more
than ``max_bad_fraction`` of them is an error (``TooManyBadSamples``).
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Any, Iterator, List, Optional, Sequence, Union

from hetclip.data import folders, shards
from hetclip.data.loader import Loader, eval_item, item_name, make_eval_loader
from hetclip.data.shards import IMAGE_EXTS, ShardFailure, ShardReadError
from hetclip.zero_shot.templates import imagenet_classnames, imagenet_wnids, load_classnames

Classnames = Union[None, str, Sequence[str]]


def _image_member(sample: dict) -> Optional[str]:
    return next((e for e in IMAGE_EXTS if e in sample), None)


# ---------------------------------------------------------------------------------------------- folders

class ImageFolder:
    """Class-folder tree: ``root/<class>/<image>``; label = position of the folder in sorted order."""

    kind = "imagefolder"

    def __init__(self, root: str, classnames: Classnames = None):
        tree = folders.scan(root)
        if isinstance(classnames, str):
            classnames = load_classnames(classnames)
        if classnames is not None:
            classnames = list(classnames)
            if len(classnames) != len(tree.classes):
                raise ValueError(
                    f"{root!r} has {len(tree.classes)} class folders but {len(classnames)} class names were "
                    f"given: a class folder is missing or extra (folders: {folders.summarise(tree.classes)})")
        self.root, self.tree = root, tree
        self.classnames = classnames if classnames is not None else list(tree.classes)
        if tree.empty:
            warnings.warn(f"{len(tree.empty)} class folder(s) in {root!r} hold no images: "
                          f"{folders.summarise(tree.empty)}", stacklevel=2)

    @property
    def files(self):
        return self.tree.files

    @property
    def empty(self):
        return self.tree.empty

    @property
    def ignored(self):
        return self.tree.ignored

    def __len__(self) -> int:
        return len(self.tree.files)

    def items(self) -> Iterator[tuple]:
        for path, label in self.tree.files:
            yield eval_item(os.path.basename(path), path, path, label)

    def describe(self) -> dict:
        return {"kind": self.kind, "root": os.path.abspath(self.root), "num_classes": len(self.classnames),
                "num_files": len(self.tree.files), "empty_class_folders": list(self.tree.empty),
                "ignored_non_image_files": self.tree.ignored}


def check_imagenet_layout(root: str) -> None:
    """Raise a clear error unless ``root`` holds exactly the 1000 ImageNet WNID folders."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageNet folder not found: {root!r}")
    wnids = imagenet_wnids()
    present = {e for e in os.listdir(root) if not e.startswith(".") and os.path.isdir(os.path.join(root, e))}
    missing = sorted(set(wnids) - present)
    extra = sorted(present - set(wnids))
    if not missing and not extra:
        return
    msg = [f"{root!r} is not an ImageNet validation folder of 1000 WNID class folders"]
    if missing:
        msg.append(f"missing {len(missing)}: {folders.summarise(missing)}")
    if extra:
        msg.append(f"unexpected {len(extra)}: {folders.summarise(extra)}")
    for sub in ("val", "validation", "ILSVRC2012_img_val"):
        if sub in extra:
            msg.append(f"hint: try --imagenet {os.path.join(root, sub)}")
    if not present and any(shards.is_image_name(e) for e in os.listdir(root)):
        msg.append("hint: the images sit directly in the folder; sort them into WNID folders first")
    raise ValueError("; ".join(msg))


def imagenet(root: str) -> ImageFolder:
    check_imagenet_layout(root)
    src = ImageFolder(root, imagenet_classnames())
    src.kind = "imagenet"
    return src


# ---------------------------------------------------------------------------------------------- webdataset

def shard_urls(spec: str) -> List[str]:
    """Shards of an evaluation set: a directory (its ``*.tar``, else ``test/*.tar``) or a pattern
    (``hetclip.data.shards.expand_pattern``); ``::`` joins several. Every local shard must exist."""
    out: List[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar"))) or \
                sorted(glob.glob(os.path.join(part, "test", "*.tar")))
            if not found:
                raise FileNotFoundError(f"no .tar shards in {part!r} or {os.path.join(part, 'test')!r}")
            out.extend(found)
        else:
            out.extend(shards.expand_pattern(part))
    missing = [u for u in out if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {folders.summarise(missing)}")
    return out


def _shard_samples(urls: Sequence[str], keep: Any) -> Iterator[Any]:
    """Samples of the shards in order; a shard that breaks off yields a ``ShardFailure`` and reading
    goes on with the next shard."""
    for url in urls:
        try:
            yield from shards.iter_shard(url, keep)
        except ShardReadError as e:
            yield ShardFailure(e.url, e.reason, e.detail)


def _find_classnames(urls: Sequence[str]) -> Optional[str]:
    d = os.path.dirname(os.path.abspath(urls[0]))
    for cand in (os.path.join(d, "classnames.txt"), os.path.join(os.path.dirname(d), "classnames.txt")):
        if os.path.isfile(cand):
            return cand
    return None


class _ShardSource:
    """Shards read in order; ``_item`` turns each sample (its image member and ``members``) into a work
    item or a ``ShardFailure`` naming the sample."""

    members: tuple = ()
    shards: List[str]

    def items(self) -> Iterator[Any]:
        keep = set(IMAGE_EXTS) | set(self.members)
        for s in _shard_samples(self.shards, keep.__contains__):
            if isinstance(s, ShardFailure):
                yield s
            else:
                yield self._item(s["__url__"], s["__key__"], _image_member(s), s)

    def _item(self, url: str, key: str, img: Optional[str], s: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class WdsClassification(_ShardSource):
    """Webdataset evaluation shards: ``KEY.<image>`` + ``KEY.cls`` (integer label)."""

    kind = "wds"

    def __init__(self, spec: str, classnames: Classnames = None):
        self.spec = spec
        self.shards = shard_urls(spec)
        if classnames is None:
            found = _find_classnames(self.shards)
            if found is None:
                raise ValueError(f"no class names for {spec!r}: pass --classnames FILE or put classnames.txt "
                                 f"beside the shards (or in their parent folder)")
            classnames = found
        self.classnames_source = classnames if isinstance(classnames, str) else "list"
        self.classnames = load_classnames(classnames) if isinstance(classnames, str) else list(classnames)

    members = ("cls",)

    def _item(self, url: str, key: str, img: Optional[str], s: dict) -> Any:
        if img is None or "cls" not in s:
            what = "an image" if img is None else "a .cls label"
            return ShardFailure(url, "missing_label" if img else "missing_image", f"sample {key!r} has no {what}",
                                key=key)
        c = len(self.classnames)
        raw = s["cls"].decode("utf-8", "replace").strip()
        try:
            label = int(raw)
        except ValueError:
            raise ValueError(f"{url}: {key}.cls holds {raw[:40]!r}, not an integer label") from None
        if not 0 <= label < c:
            raise ValueError(f"{url}: {key}.cls = {label} is outside [0, {c}) ({c} class names)")
        return eval_item(f"{key}.{img}", url, s[img], label)

    def describe(self) -> dict:
        return {"kind": self.kind, "shards": self.spec, "num_shards": len(self.shards),
                "num_classes": len(self.classnames), "classnames": self.classnames_source}


def captions_of(sample: dict) -> List[str]:
    """The captions of a retrieval sample: ``txt`` (one a line) or ``json`` (``{"captions": [...]}``,
    ``{"caption": "..."}`` or a list); raises ``ValueError`` for invalid JSON."""
    if "txt" in sample:
        return [c.strip() for c in sample["txt"].decode("utf-8", "replace").splitlines() if c.strip()]
    if "json" in sample:
        obj = json.loads(sample["json"])
        caps = obj.get("captions", obj.get("caption")) if isinstance(obj, dict) else obj
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        return [str(c).strip() for c in caps if str(c).strip()]
    return []


class WdsRetrieval(_ShardSource):
    """Webdataset image–text shards: ``KEY.<image>`` + ``KEY.txt`` (one caption per line) or ``KEY.json``."""

    kind = "wds-retrieval"

    def __init__(self, spec: str):
        self.spec = spec
        self.shards = shard_urls(spec)
        self.classnames: List[str] = []

    members = ("txt", "json")

    def _item(self, url: str, key: str, img: Optional[str], s: dict) -> Any:
        try:
            caps = captions_of(s)
        except ValueError as e:
            return ShardFailure(url, "bad_caption", f"{key}.json is not valid JSON: {e}", key=key)
        if img is None or not caps:
            return ShardFailure(url, "missing_image" if img is None else "missing_caption",
                                f"sample {key!r} has {sorted(k for k in s if not k.startswith('__'))}", key=key)
        return eval_item(f"{key}.{img}", url, s[img], caps)

    def describe(self) -> dict:
        return {"kind": self.kind, "shards": self.spec, "num_shards": len(self.shards)}


def open_source(path: str, classnames: Classnames = None):
    """A class-folder tree if ``path`` is a folder with sub-folders and no shards, else webdataset shards."""
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.tar")) \
            and not glob.glob(os.path.join(path, "test", "*.tar")):
        return ImageFolder(path, classnames)
    return WdsClassification(path, classnames)


# ---------------------------------------------------------------------------------------------- batching

def eval_batches(source, image_size: int, batch_size: int, *, workers: int = 2, limit: Optional[int] = None,
                 resize_size: Optional[int] = None, max_bad_fraction: float = 0.01) -> Loader:
    """The loader over ``source``: ``{"image": uint8 [b, S, S, 3], "label": int32 [b] or captions}`` in
    source order (``workers`` decode processes; 0 decodes in this process)."""
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
    return make_eval_loader(source.items(), batch_size=batch_size, num_workers=workers, image_size=image_size,
                            resize_size=resize_size, limit=limit, max_bad_fraction=max_bad_fraction)


def skipped_summary(loader: Loader) -> dict:
    """How many samples the loader skipped, by reason, and the first few of them by name."""
    st = loader.stats()
    names = [item_name(e["shard"], e.get("key")) for e in st["bad_examples"][:20]]
    return {"images_skipped": sum(st["skipped"].values()), "skipped_by_reason": st["skipped"],
            "skipped_files": names}
