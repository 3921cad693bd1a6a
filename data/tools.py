"""``hetclip-shards``: write and inspect webdataset shards (img2dataset layout).

Subcommands::

  hetclip-shards from-captions IMAGE_DIR CAPTIONS.{csv,tsv,jsonl} OUT [--shard-size N]
  hetclip-shards from-folders CLASS_DIR OUT [--shard-size N] [--classnames FILE]
  hetclip-shards stats PATTERN [--caption-key txt] [--json]
  hetclip-shards check PATTERN [--caption-key txt] [--image-size 224] [--json]

Shards are ``OUT/00000.tar, 00001.tar, ...`` with keys ``SSSSSIIII`` (5-digit shard number and
4-digit index, img2dataset's scheme; a 9+-digit running number when ``--shard-size`` > 10000) and a
``sizes.json`` of sample counts. Train samples hold ``KEY.jpg|png|webp`` (original bytes),
``KEY.txt`` (caption) and ``KEY.json`` (caption, source file); eval samples hold the image and
``KEY.cls`` (label index), with ``classnames.txt`` (CLIP_benchmark layout).

``stats`` reads every member without decoding; ``check`` also decodes each image with the training
pipeline's rules. Both list every problem (shard, key, reason) and exit with status 1 if there is any.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile
from typing import Any, Iterator, Sequence

from . import decode
from . import folders
from .samples import extract_caption
from .shards import EMPTY_SHARD, IMAGE_EXTS, ShardError, ShardReadError, expand_pattern, iter_shard, read_sizes

_KEEP_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
_IMAGE_COLS = ("filepath", "image", "file", "path", "filename", "url")
_CAPTION_COLS = ("caption", "text", "title", "txt")


# ----------------------------------------------------------------------------- writing

def _image_member(path: str) -> tuple[str, bytes]:
    """(ext, bytes) for a source image: JPEG/PNG/WebP as stored, anything else re-encoded as PNG."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    with open(path, "rb") as f:
        data = f.read()
    if ext in _KEEP_EXTS:
        return _KEEP_EXTS[ext], data
    img = decode.load_rgb(data)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "png", buf.getvalue()


class ShardWriter:
    """Writes numbered tar shards of at most ``shard_size`` samples and a ``sizes.json``."""

    def __init__(self, out_dir: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size = out_dir, shard_size
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._shard = -1
        self._count = 0
        self.total = 0

    def _key(self) -> str:
        if self.shard_size <= 10000:
            return f"{self._shard:05d}{self._count:04d}"
        return f"{self.total:09d}"

    def write(self, members: dict[str, bytes]) -> str:
        """Add one sample (``{ext: bytes}``); returns its key."""
        if self._tar is None or self._count >= self.shard_size:
            self._close_shard()
            self._shard += 1
            self._count = 0
            name = f"{self._shard:05d}.tar"
            self._tar = tarfile.open(os.path.join(self.out_dir, name), "w", format=tarfile.USTAR_FORMAT)
            self.sizes[name] = 0
        key = self._key()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.total += 1
        self.sizes[f"{self._shard:05d}.tar"] = self._count
        return key

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        """Finish the last shard and write ``sizes.json``."""
        self._close_shard()
        with open(os.path.join(self.out_dir, "sizes.json"), "w") as f:
            json.dump(self.sizes, f, indent=1, sort_keys=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_captions(path: str, image_col: str | None = None, caption_col: str | None = None) -> Iterator[tuple[int, str, str]]:
    """Rows ``(line number, image path, caption)`` of a CSV/TSV (with header) or JSONL file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{ln}: not valid JSON: {e}") from None
                ic = image_col or next((c for c in _IMAGE_COLS if c in row), None)
                cc = caption_col or next((c for c in _CAPTION_COLS if c in row), None)
                if ic is None or cc is None or ic not in row:
                    raise ValueError(f"{path}:{ln}: need an image field ({'/'.join(_IMAGE_COLS)}) and a "
                                     f"caption field ({'/'.join(_CAPTION_COLS)}); got {sorted(row)}")
                yield ln, str(row[ic]), "" if row.get(cc) is None else str(row[cc])
        return
    if ext not in (".csv", ".tsv"):
        raise ValueError(f"{path}: captions must be .csv, .tsv or .jsonl")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        cols = reader.fieldnames or []
        ic = image_col or next((c for c in _IMAGE_COLS if c in cols), None)
        cc = caption_col or next((c for c in _CAPTION_COLS if c in cols), None)
        if ic not in cols or cc not in cols:
            raise ValueError(f"{path}: header {cols} lacks an image column ({'/'.join(_IMAGE_COLS)}) or a "
                             f"caption column ({'/'.join(_CAPTION_COLS)}); use --image-col/--caption-col")
        for ln, row in enumerate(reader, 2):
            yield ln, row[ic] or "", row[cc] or ""


def from_captions(image_dir: str, captions: str, out: str, *, shard_size: int = 10000,
                  image_col: str | None = None, caption_col: str | None = None) -> tuple[int, list[str]]:
    """Write train shards; returns (samples written, problems)."""
    problems: list[str] = []
    with ShardWriter(out, shard_size) as w:
        for ln, rel, caption in read_captions(captions, image_col, caption_col):
            path = rel if os.path.isabs(rel) else os.path.join(image_dir, rel)
            if not caption.strip():
                problems.append(f"{captions}:{ln}: empty caption for {rel!r} (skipped)")
                continue
            try:
                ext, data = _image_member(path)
            except (OSError, decode.DecodeError) as e:
                problems.append(f"{captions}:{ln}: image {path!r}: {e} (skipped)")
                continue
            meta = {"caption": caption, "source": rel}
            w.write({ext: data, "txt": caption.encode("utf-8"),
                     "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        n = w.total
    return n, problems


def from_folders(class_dir: str, out: str, *, shard_size: int = 10000,
                 classnames: str | None = None) -> tuple[int, list[str]]:
    """Write eval shards (``KEY.cls``) + ``classnames.txt`` from an ImageFolder tree."""
    tree = folders.scan(class_dir)
    files, names = tree.files, tree.classes
    if classnames:
        with open(classnames, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
        if len(names) != len(tree.classes):
            raise ValueError(f"{classnames}: {len(names)} class names for {len(tree.classes)} class folders")
    problems: list[str] = []
    with ShardWriter(out, shard_size) as w:
        for path, label in files:
            try:
                ext, data = _image_member(path)
            except (OSError, decode.DecodeError) as e:
                problems.append(f"image {path!r}: {e} (skipped)")
                continue
            w.write({ext: data, "cls": str(label).encode()})
        n = w.total
    with open(os.path.join(out, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(names) + "\n")
    return n, problems


# ----------------------------------------------------------------------------- inspection

def inspect_shards(pattern: str, *, caption_key: str = "txt", decode_images: bool = False,
                   image_size: int = 224, max_pixels: int | None = decode.DEFAULT_MAX_PIXELS,
                   label_key: str | None = None) -> dict:
    """Read a shard set; counts and a list of problems ``{"shard", "key", "reason", "message"}``."""
    urls = []
    for p in str(pattern).split("::"):
        urls.extend(expand_pattern(p))
    sizes = read_sizes(urls)
    report: dict[str, Any] = {"shards": len(urls), "samples": 0, "images": 0, "captions": 0,
                              "extensions": {}, "per_shard": {}, "problems": []}
    problems = report["problems"]
    for url in urls:
        n = 0
        try:
            for s in iter_shard(url):
                n += 1
                key = s["__key__"]
                for ext in s:
                    if not ext.startswith("__"):
                        report["extensions"][ext] = report["extensions"].get(ext, 0) + 1
                image = next((s[e] for e in IMAGE_EXTS if e in s), None)
                if image is None:
                    problems.append({"shard": url, "key": key, "reason": "missing_image",
                                     "message": f"no {'/'.join(IMAGE_EXTS)} member"})
                else:
                    report["images"] += 1
                    if decode_images:
                        try:
                            decode.eval_transform_uint8(image, image_size, max_pixels=max_pixels)
                        except decode.DecodeError as e:
                            problems.append({"shard": url, "key": key, "reason": e.reason, "message": str(e)})
                if label_key:
                    raw = s.get(label_key)
                    try:
                        int(raw.decode().strip())  # type: ignore[union-attr]
                    except (AttributeError, ValueError):
                        problems.append({"shard": url, "key": key, "reason": "missing_label",
                                         "message": f"no integer {label_key} member"})
                    continue
                try:
                    extract_caption(s, caption_key)
                    report["captions"] += 1
                except ValueError as e:
                    reason, _, msg = str(e).partition(": ")
                    problems.append({"shard": url, "key": key, "reason": reason, "message": msg})
        except ShardReadError as e:
            problems.append({"shard": url, "key": None, "reason": e.reason, "message": e.detail})
        else:
            if n == 0:
                problems.append({"shard": url, "key": None, "reason": "empty_shard", "message": EMPTY_SHARD})
        report["samples"] += n
        report["per_shard"][url] = n
        if url in sizes and sizes[url] != n:
            problems.append({"shard": url, "key": None, "reason": "size_mismatch",
                             "message": f"sizes.json says {sizes[url]} samples, the shard has {n}"})
    return report


def _print_report(report: dict, out: Any = None) -> None:
    out = out or sys.stdout
    print(f"shards: {report['shards']}  samples: {report['samples']}  images: {report['images']}  "
          f"captions: {report['captions']}", file=out)
    print("members: " + ", ".join(f"{k}={v}" for k, v in sorted(report["extensions"].items())), file=out)
    by_reason: dict[str, int] = {}
    for p in report["problems"]:
        by_reason[p["reason"]] = by_reason.get(p["reason"], 0) + 1
        where = p["shard"] if p["key"] is None else f"{p['shard']} key {p['key']}"
        print(f"PROBLEM {p['reason']}: {where}: {p['message']}", file=out)
    if by_reason:
        print("problems: " + ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items())), file=out)
    else:
        print("no problems found", file=out)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hetclip-shards", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("from-captions", help="train shards from an image folder and a captions file")
    p.add_argument("image_dir")
    p.add_argument("captions", help=".csv/.tsv with a header, or .jsonl")
    p.add_argument("out")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--image-col", default=None, help=f"default: first of {', '.join(_IMAGE_COLS)}")
    p.add_argument("--caption-col", default=None, help=f"default: first of {', '.join(_CAPTION_COLS)}")
    p = sub.add_parser("from-folders", help="eval shards (KEY.cls + classnames.txt) from class folders")
    p.add_argument("class_dir")
    p.add_argument("out")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--classnames", default=None, help="text file, one readable name per class folder")
    for name, helptext in (("stats", "count samples and members, find missing captions (no decoding)"),
                           ("check", "like stats, and decode every image")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("pattern")
        p.add_argument("--caption-key", default="txt", help='"txt", "json:caption", alternatives with ","')
        p.add_argument("--label-key", default=None, help="check eval shards: label member (e.g. cls)")
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in ("from-captions", "from-folders"):
            if args.cmd == "from-captions":
                n, problems = from_captions(args.image_dir, args.captions, args.out, shard_size=args.shard_size,
                                            image_col=args.image_col, caption_col=args.caption_col)
            else:
                n, problems = from_folders(args.class_dir, args.out, shard_size=args.shard_size,
                                           classnames=args.classnames)
            for p in problems:
                print(f"PROBLEM {p}", file=sys.stderr)
            print(f"wrote {n} samples to {args.out}" + (f"; {len(problems)} skipped" if problems else ""))
            return 1 if problems or n == 0 else 0
        report = inspect_shards(args.pattern, caption_key=args.caption_key, decode_images=args.cmd == "check",
                                image_size=args.image_size, label_key=args.label_key)
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            _print_report(report)
        return 1 if report["problems"] or report["samples"] == 0 else 0
    except (ShardError, ValueError, OSError) as e:
        print(f"hetclip-shards: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
