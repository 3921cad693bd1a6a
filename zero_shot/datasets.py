"""Evaluation sources for zero-shot classification and retrieval, and a batched, threaded image loader.

Sources (each has ``classnames``, ``records()`` yielding ``(name, path-or-bytes, label)``, ``describe()``):

* ``ImageFolder(root, classnames=None)``: one sub-folder per class; label = index in sorted folder order;
  class names from a list/file (one per line, same order) or the folder names. Hidden folders and files
  whose extension is not an image extension are ignored; an empty class folder keeps its label (warning).
* ``imagenet(root)``: an ``ImageFolder`` whose folders must be exactly the 1000 ImageNet WNIDs; names are
  the CLIP class names. A wrong layout raises an error listing the missing/extra folders.
* ``WdsClassification(shards, classnames=None)``: webdataset tars with ``KEY.<image ext>`` + ``KEY.cls``
  (CLIP_benchmark layout: ``DIR/*.tar`` or ``DIR/test/*.tar`` with ``DIR/classnames.txt``).
* ``WdsRetrieval(shards)``: webdataset tars with ``KEY.<image ext>`` + ``KEY.txt`` (one caption a line)
  or ``KEY.json`` (``{"captions": [...]}`` or a list).

``EvalBatches(source, image_size, batch_size)`` decodes with a thread pool (resize shortest side bicubic,
centre crop, CLIP mean/std), keeps the source order, skips unreadable images with a warning naming the
file, and counts them in ``.skipped``.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from hetclip.zero_shot.templates import imagenet_classnames, imagenet_wnids, load_classnames

from hetclip.data import decode as _decode

_shared_decode = _decode  # former name (kept for callers)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jpe")
CLIP_MEAN = np.array(_decode.CLIP_MEAN, np.float32)
CLIP_STD = np.array(_decode.CLIP_STD, np.float32)

Record = Tuple[str, Union[str, bytes], object]


def _summarise(items: Sequence[str], limit: int = 10) -> str:
    items = list(items)
    head = ", ".join(items[:limit])
    return head + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------- decoding

def eval_transform(img: Image.Image, size: int, resize_size: Optional[int] = None) -> np.ndarray:
    """RGB (alpha on white), resize the shortest side to ``resize_size`` (default ``size``; bicubic),
    centre crop ``size × size``, CLIP mean/std: ``hetclip.data.decode.eval_transform``."""
    return _decode.eval_transform(img, size, resize_size=resize_size)


def decode_image(data: Union[str, bytes], size: int, resize_size: Optional[int] = None) -> np.ndarray:
    """Decode a path or encoded bytes to a normalised ``[size, size, 3]`` float32 array (the shared
    decoder: decompression-bomb guard, JPEG draft, alpha composited on white)."""
    return _decode.eval_transform(data, size, resize_size=resize_size)


# ---------------------------------------------------------------------------------------------- folders

class ImageFolder:
    """Class-folder tree: ``root/<class>/<image>``; label = position of the folder in sorted order."""

    def __init__(self, root: str, classnames: Union[None, str, Sequence[str]] = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset folder not found: {root!r}")
        self.root = root
        entries = sorted(os.listdir(root))
        self.folders = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
        if not self.folders:
            stray = [e for e in entries if _is_image(e)]
            hint = f" (it holds {len(stray)} image files directly; expected one sub-folder per class)" if stray else ""
            raise ValueError(f"no class folders in {root!r}{hint}")
        if isinstance(classnames, str):
            classnames = load_classnames(classnames)
        if classnames is not None:
            classnames = list(classnames)
            if len(classnames) != len(self.folders):
                raise ValueError(
                    f"{root!r} has {len(self.folders)} class folders but {len(classnames)} class names were "
                    f"given: a class folder is missing or extra (folders: {_summarise(self.folders)})")
        self.classnames = classnames if classnames is not None else list(self.folders)
        self.files: List[Tuple[str, int]] = []
        self.empty: List[str] = []
        self.ignored = 0
        for label, folder in enumerate(self.folders):
            names = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if f.startswith("."):
                        continue
                    if _is_image(f):
                        names.append(os.path.join(dirpath, f))
                    else:
                        self.ignored += 1
            if not names:
                self.empty.append(folder)
            self.files.extend((p, label) for p in names)
        if self.empty:
            warnings.warn(f"{len(self.empty)} class folder(s) in {root!r} hold no images: "
                          f"{_summarise(self.empty)}", stacklevel=2)
        if not self.files:
            raise ValueError(f"no images (extensions {', '.join(IMAGE_EXTENSIONS)}) under {root!r}")

    def __len__(self) -> int:
        return len(self.files)

    def records(self) -> Iterator[Record]:
        for path, label in self.files:
            yield path, path, label

    def describe(self) -> dict:
        return {"kind": "imagefolder", "root": os.path.abspath(self.root), "num_classes": len(self.classnames),
                "num_files": len(self.files), "empty_class_folders": list(self.empty),
                "ignored_non_image_files": self.ignored}


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
        msg.append(f"missing {len(missing)}: {_summarise(missing)}")
    if extra:
        msg.append(f"unexpected {len(extra)}: {_summarise(extra)}")
    for sub in ("val", "validation", "ILSVRC2012_img_val"):
        if sub in extra:
            msg.append(f"hint: try --imagenet {os.path.join(root, sub)}")
    if not present and any(_is_image(e) for e in os.listdir(root)):
        msg.append("hint: the images sit directly in the folder; sort them into WNID folders first")
    raise ValueError("; ".join(msg))


def imagenet(root: str) -> ImageFolder:
    check_imagenet_layout(root)
    src = ImageFolder(root, imagenet_classnames())
    src.kind = "imagenet"
    return src


# ---------------------------------------------------------------------------------------------- webdataset

def expand_shards(spec: str) -> List[str]:
    """A directory (its ``*.tar``, or ``test/*.tar``), a glob, or a brace pattern; ``::`` joins several."""
    from braceexpand import braceexpand

    out: List[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                found = sorted(glob.glob(os.path.join(part, "test", "*.tar")))
            if not found:
                raise FileNotFoundError(f"no .tar shards in {part!r} or {os.path.join(part, 'test')!r}")
            out.extend(found)
            continue
        for p in braceexpand(part):
            matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            if not matches:
                raise FileNotFoundError(f"shard pattern {p!r} matches no file")
            out.extend(matches)
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {_summarise(missing)}")
    return out


def iter_tar_samples(path: str) -> Iterator[Tuple[str, dict]]:
    """Group a tar's members by webdataset key (path up to the first dot of the basename)."""
    key, sample = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                k = os.path.join(dirname, stem)
                if k != key:
                    if key is not None:
                        yield key, sample
                    key, sample = k, {}
                sample[ext.lower()] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ValueError(f"cannot read shard {path!r}: {e}") from e
    if key is not None:
        yield key, sample


def _image_member(sample: dict) -> Optional[str]:
    for ext in sample:
        if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return ext
    return None


def _find_classnames(shards: Sequence[str]) -> Optional[str]:
    d = os.path.dirname(os.path.abspath(shards[0]))
    for cand in (os.path.join(d, "classnames.txt"), os.path.join(os.path.dirname(d), "classnames.txt")):
        if os.path.isfile(cand):
            return cand
    return None


class WdsClassification:
    """Webdataset evaluation shards: ``KEY.<image>`` + ``KEY.cls`` (integer label)."""

    def __init__(self, spec: str, classnames: Union[None, str, Sequence[str]] = None):
        self.spec = spec
        self.shards = expand_shards(spec)
        if classnames is None:
            found = _find_classnames(self.shards)
            if found is None:
                raise ValueError(f"no class names for {spec!r}: pass --classnames FILE or put classnames.txt "
                                 f"beside the shards (or in their parent folder)")
            classnames = found
        self.classnames_source = classnames if isinstance(classnames, str) else "list"
        self.classnames = load_classnames(classnames) if isinstance(classnames, str) else list(classnames)
        self.incomplete = 0

    def records(self) -> Iterator[Record]:
        c = len(self.classnames)
        for shard in self.shards:
            for key, sample in iter_tar_samples(shard):
                img = _image_member(sample)
                if img is None or "cls" not in sample:
                    self.incomplete += 1
                    warnings.warn(f"{shard}: sample {key!r} lacks an image or a .cls member "
                                  f"(has {sorted(sample)}); skipped", stacklevel=2)
                    continue
                raw = sample["cls"].decode("utf-8", "replace").strip()
                try:
                    label = int(raw)
                except ValueError:
                    raise ValueError(f"{shard}: {key}.cls holds {raw[:40]!r}, not an integer label") from None
                if not 0 <= label < c:
                    raise ValueError(f"{shard}: {key}.cls = {label} is outside [0, {c}) "
                                     f"({c} class names)")
                yield f"{shard}:{key}.{img}", sample[img], label

    def describe(self) -> dict:
        return {"kind": "wds", "shards": self.spec, "num_shards": len(self.shards),
                "num_classes": len(self.classnames), "classnames": self.classnames_source}


def _captions(sample: dict, where: str) -> List[str]:
    if "txt" in sample:
        caps = [c.strip() for c in sample["txt"].decode("utf-8", "replace").splitlines() if c.strip()]
    elif "json" in sample:
        try:
            obj = json.loads(sample["json"])
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.json is not valid JSON: {e}") from None
        caps = obj.get("captions", obj.get("caption")) if isinstance(obj, dict) else obj
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        caps = [str(c).strip() for c in caps if str(c).strip()]
    else:
        caps = []
    return caps


class WdsRetrieval:
    """Webdataset image–text shards: ``KEY.<image>`` + ``KEY.txt`` (one caption per line) or ``KEY.json``."""

    def __init__(self, spec: str):
        self.spec = spec
        self.shards = expand_shards(spec)
        self.classnames: List[str] = []
        self.incomplete = 0

    def records(self) -> Iterator[Record]:
        for shard in self.shards:
            for key, sample in iter_tar_samples(shard):
                img = _image_member(sample)
                caps = _captions(sample, f"{shard}: {key}")
                if img is None or not caps:
                    self.incomplete += 1
                    warnings.warn(f"{shard}: sample {key!r} lacks an image or captions "
                                  f"(has {sorted(sample)}); skipped", stacklevel=2)
                    continue
                yield f"{shard}:{key}.{img}", sample[img], caps

    def describe(self) -> dict:
        return {"kind": "wds-retrieval", "shards": self.spec, "num_shards": len(self.shards)}


def open_source(path: str, classnames: Union[None, str, Sequence[str]] = None):
    """A class-folder tree if ``path`` is a folder with sub-folders and no shards, else webdataset shards."""
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.tar")) \
            and not glob.glob(os.path.join(path, "test", "*.tar")):
        return ImageFolder(path, classnames)
    return WdsClassification(path, classnames)


# ---------------------------------------------------------------------------------------------- batching

def _decode_or_none(record: Record, size: int, resize_size: Optional[int]):
    name, data, label = record
    try:
        return decode_image(data, size, resize_size), label, None
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable image"
        return None, label, f"{type(e).__name__}: {e}"


class EvalBatches:
    """Iterate ``{"image": float32 [b, S, S, 3], "label": [b] or captions list}`` in source order.

    ``limit`` stops after that many (readable) images; ``skipped`` lists ``(name, reason)`` for unreadable
    images; ``num_images`` counts images yielded so far.
    """

    def __init__(self, source, image_size: int, batch_size: int, *, workers: int = 4,
                 limit: Optional[int] = None, resize_size: Optional[int] = None):
        if image_size < 1 or batch_size < 1:
            raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
        self.source = source
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.workers = max(1, int(workers))
        self.limit = limit
        self.resize_size = resize_size
        if resize_size is not None and resize_size < image_size:
            raise ValueError(f"resize_size {resize_size} is smaller than the crop size {image_size}")
        self.skipped: List[Tuple[str, str]] = []
        self.num_images = 0

    def __len__(self) -> int:
        n = len(self.source) if hasattr(self.source, "__len__") else None
        if n is None:
            raise TypeError("source size unknown")
        return min(n, self.limit) if self.limit is not None else n

    def _emit(self, images, labels):
        batch = {"image": np.stack(images)}
        batch["label"] = (np.asarray(labels, np.int32) if labels and not isinstance(labels[0], list)
                          else list(labels))
        return batch

    def __iter__(self):
        self.skipped, self.num_images = [], 0
        images, labels = [], []
        pending = collections.deque()
        depth = 2 * self.batch_size
        records = iter(self.source.records())
        done = False
        with ThreadPoolExecutor(self.workers) as pool:
            while True:
                while not done and len(pending) < depth:
                    rec = next(records, None)
                    if rec is None:
                        done = True
                        break
                    pending.append((rec[0], pool.submit(_decode_or_none, rec, self.image_size, self.resize_size)))
                if not pending:
                    break
                name, fut = pending.popleft()
                img, label, err = fut.result()
                if img is None:
                    self.skipped.append((name, err))
                    warnings.warn(f"skipping unreadable image {name}: {err}", stacklevel=2)
                    continue
                images.append(img)
                labels.append(label)
                self.num_images += 1
                if len(images) == self.batch_size:
                    yield self._emit(images, labels)
                    images, labels = [], []
                if self.limit is not None and self.num_images >= self.limit:
                    for _, f in pending:
                        f.cancel()
                    break
        if images:
            yield self._emit(images, labels)
