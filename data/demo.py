"""Built-in demo dataset: rendered scenes of simple shapes with captions, generated from a seed (no downloads).

Layout written by ``generate_demo`` / ``ensure_demo`` (and the ``hetclip-demo-data`` console script)::

    OUT/manifest.json                    all generation parameters + summary (written last)
    OUT/train/00000.tar ...              webdataset shards (img2dataset layout): KEY.png, KEY.txt, KEY.json
    OUT/train/sizes.json                 {"00000.tar": n, ...}
    OUT/eval/{shape,color,shape_color}/  zero-shot tasks as image folders: <class>/NNNNN.png,
                                         classnames.txt (line k = sorted folder k), templates.txt,
                                         meta.jsonl (per-image attributes); shape_color/heldout.txt
    OUT/tokenizer/                       CLIP-style byte-level BPE trained on the train captions (HF format)

Each image shows one object near the centre (or, with ``multi_prob``, 2-3 anywhere) of one shape and one colour
(8 shapes x 8 colours) with varied size, a small rotation and offset, sometimes faded, on a neutral
background (solid, gradient or noise texture); the difficulty knobs are in ``DEFAULTS``. Captions name
both attributes, or (``shape_only_prob``, ``color_only_prob``) only one. Some colour-shape pairs are held
out of training entirely (neither rendered nor captioned) and appear only in the ``shape_color``
evaluation task. Optional input-dependent caption noise (``noise_rule``) on the samples a rule selects,
with probability ``noise_prob`` (the other samples: ``noise_prob_easy``); ``KEY.json`` records what was
changed:

- ``"hard"``: samples that are hard to see (small objects -> shape word, low-contrast objects -> colour
  word) get a random wrong attribute word;
- ``"color_partner"``: objects of the ``PARTNER_COLORS`` (the warm half of the palette, easy to see at any
  size) get the shape word of the shape's look-alike (``PARTNER_SHAPES``: circle-ring, square-diamond,
  star-cross, triangle-heart). The noise is a property of the image a model can see, not of its difficulty,
  and it always points to one other class (unless that colour-shape pair is held out; then the caption
  stays clean).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "COLORS", "BACKGROUNDS", "DEFAULTS", "TASKS", "NOISE_RULES", "PARTNER_COLORS", "PARTNER_SHAPES",
           "noise_selected", "DemoPaths", "heldout_pairs", "render_scene", "make_caption", "generate_demo", "ensure_demo", "demo_paths", "main"]

FORMAT_VERSION = 3
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond")
PLURALS = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
COLORS = {  # name -> base RGB (jittered per sample)
    "red": (220, 30, 30), "orange": (245, 135, 20), "yellow": (240, 220, 30), "green": (40, 170, 50),
    "cyan": (30, 200, 210), "blue": (35, 75, 220), "purple": (140, 50, 190), "pink": (245, 120, 190),
}
BACKGROUNDS = {  # neutral tones only, so the colour of a scene is the colour of its objects
    "white": (240, 240, 240), "light gray": (190, 190, 190), "gray": (128, 128, 128),
    "dark gray": (64, 64, 64), "black": (16, 16, 16), "beige": (228, 216, 190),
}
# radius / image size; a small object is still about a quarter of the image across (one patch of the demo
# recipe's ViT) or more, so that its outline is there to be seen
SIZES = {"small": (0.12, 0.16), "medium": (0.15, 0.24), "large": (0.24, 0.38)}
ROTATABLE = ("square", "diamond", "triangle", "star", "cross", "heart")  # circle and ring look the same turned
COUNT_WORDS = {2: "two", 3: "three"}
NOISE_RULES = ("hard", "color_partner")
PARTNER_COLORS = ("red", "orange", "yellow", "pink")
PARTNER_SHAPES = {"circle": "ring", "ring": "circle", "square": "diamond", "diamond": "square",
                  "star": "cross", "cross": "star", "triangle": "heart", "heart": "triangle"}
TASKS = ("shape", "color", "shape_color")
TEMPLATES = {
    "shape": ["a photo of a {c}.", "a drawing of a {c}.", "a {c}.", "a picture of a {c}."],
    "color": ["a photo of something {c}.", "a shape colored {c}.", "{c} shapes.", "the {c} shape."],
    "shape_color": ["a photo of the {c}.", "the {c}.", "a drawing of the {c}.", "a picture of the {c}."],
}
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "image_size": 64,
    "num_train": 16000,
    "shard_size": 2000,
    "eval_per_class": 100,   # shape and color tasks: images per class
    "eval_per_combo": 20,    # shape_color task: images per colour-shape pair (64 classes)
    "num_heldout": 8,        # colour-shape pairs never rendered nor captioned in train
    "faded_prob": 0.1,       # probability that the objects are drawn semi-transparent (low contrast)
    "small_prob": 0.1,       # probability that the objects are small (hard to tell the shape)
    "multi_prob": 0.0,       # probability of 2-3 objects (small or medium) instead of one (the demo recipe
                             # tells their shape in about half of the cases)
    "max_rotation": 15.0,    # degrees, uniform in [-max, max]
    "max_offset": 0.05,      # a single object's centre: at most this fraction of the image from the centre
    "shape_only_prob": 0.65, # probability that a caption names the shape but not the colour
    "color_only_prob": 0.1,  # ... the colour but not the shape
    "noise_rule": "hard",    # which samples get caption noise and of what kind: one of NOISE_RULES
    "noise_prob": 0.0,       # caption corruption probability for the samples the rule selects
    "noise_prob_easy": 0.0,  # ... and for the others
    "contrast_threshold": 0.2,
    "image_format": "png",
    "vocab_size": 1024,
    "context_length": 32,
}


# --------------------------------------------------------------------------------------------------
# scene rendering
# --------------------------------------------------------------------------------------------------

def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (x, y) of a shape of radius ~1 centred at the origin (y points down)."""
    if shape == "square":
        a = np.deg2rad(45 + 90 * np.arange(4))
        return 0.9 * np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "triangle":
        a = np.deg2rad(-90 + 120 * np.arange(3))
        return np.stack([np.cos(a), np.sin(a) + 0.15], 1)
    if shape == "diamond":
        return np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], float)
    if shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w = 0.3
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
                         [-1, w], [-1, -w], [-w, -w]], float)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], 1) / 16.5
    raise ValueError(f"no polygon for shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s not in ("circle", "ring")}


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    if shape in ("circle", "ring"):
        rr = 0.9 * r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
        if shape == "ring":
            ri = 0.55 * rr
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
        return
    c, s = math.cos(angle), math.sin(angle)
    pts = _POLYGONS[shape] @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
    draw.polygon([tuple(p) for p in pts.tolist()], fill=255)


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    return xs, ys


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    """(float32 [S, S, 3] background in [0, 255], kind, caption word)."""
    names = list(BACKGROUNDS)
    u = rng.random()
    kind = "solid" if u < 0.4 else "gradient" if u < 0.7 else "noise"
    name = names[int(rng.integers(len(names)))]
    base = np.array(BACKGROUNDS[name], np.float32)
    if kind == "solid":
        color = np.clip(base + rng.uniform(-8, 8, 3).astype(np.float32), 0, 255)
        return np.broadcast_to(color, (size, size, 3)), kind, name
    if kind == "gradient":
        other = np.array(BACKGROUNDS[names[int(rng.integers(len(names)))]], np.float32)
        if np.abs(other - base).sum() < 60:
            other = 255.0 - base
        theta = rng.uniform(0, 2 * np.pi)
        xs, ys = _unit_grid(size)
        t = xs * math.cos(theta) + ys * math.sin(theta)
        lo, hi = float(t.min()), float(t.max())
        t = (t - lo) * (1.0 / max(hi - lo, 1e-6))
        return base + (other - base) * t[..., None], kind, "gradient"
    k = int(rng.integers(3, 7))
    coarse = np.clip(128 + rng.normal(0, 45, (k, k, 3)), 0, 255).astype(np.uint8)
    low = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32) - 128.0
    fine = rng.standard_normal((size, size, 1), dtype=np.float32) * 8.0
    bg = base + 0.8 * low.mean(-1, keepdims=True) + 0.15 * low + fine
    return np.clip(bg, 0, 255), kind, ("textured", "noisy")[int(rng.integers(2))]


def render_scene(rng: np.random.Generator, size: int, shape: str, color: str, *, count: int | None = None,
                 faded_prob: float = DEFAULTS["faded_prob"], small_prob: float = DEFAULTS["small_prob"],
                 multi_prob: float = DEFAULTS["multi_prob"], max_rotation: float = DEFAULTS["max_rotation"],
                 max_offset: float = DEFAULTS["max_offset"], supersample: int = 2) -> tuple[np.ndarray, dict]:
    """Render one scene; returns (uint8 [S, S, 3] image, attributes dict).

    ``count`` objects (default: one, or 2-3 with probability ``multi_prob``); they are small with probability
    ``small_prob``, else large or medium (a single object) or medium (several); each is turned by up to
    ``max_rotation`` degrees. A single object's centre is at most ``max_offset`` (a fraction of the image size)
    from the image centre; several objects go anywhere.
    """
    if count is None:
        count = 1 if rng.random() >= multi_prob else int(rng.integers(2, 4))
    if rng.random() < small_prob:
        size_word = "small"
    else:
        size_word = ("large", "medium")[int(rng.integers(2))] if count == 1 else "medium"
    lo, hi = SIZES[size_word]
    bg, bg_kind, bg_word = _background(rng, size)
    rgb = np.clip(np.array(COLORS[color], np.float32) + rng.uniform(-15, 15, 3), 0, 255).astype(np.float32)
    faded = bool(rng.random() < faded_prob)
    alpha = float(rng.uniform(0.3, 0.55)) if faded else 1.0
    ss = supersample
    mask_img = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(mask_img)
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = float(rng.uniform(lo, hi)) * size
        for _attempt in range(25):
            if count == 1:  # within max_offset of the centre (as far as the object fits)
                cx, cy = np.clip(size / 2 + rng.uniform(-max_offset, max_offset, 2) * size, r, size - r)
            else:
                cx, cy = rng.uniform(r, size - r, 2)
            if all(math.hypot(cx - x, cy - y) > r + q + 1 for x, y, q in placed):
                break
        placed.append((float(cx), float(cy), r))
        angle = math.radians(float(rng.uniform(-1, 1)) * max_rotation) if shape in ROTATABLE else 0.0
        _draw_object(draw, shape, cx * ss, cy * ss, r * ss, angle)
    if ss > 1:
        mask_img = mask_img.resize((size, size), Image.BOX)
    img = (bg + 0.5).astype(np.uint8)
    box = mask_img.getbbox()
    contrast = 0.0
    if box is not None:  # blend inside the objects' bounding box only (convex blend: stays in [0, 255])
        x0, y0, x1, y1 = box
        m = np.asarray(mask_img.crop(box), np.float32) * (1.0 / 255.0)
        under = bg[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = (under + (rgb - under) * (alpha * m)[..., None] + 0.5).astype(np.uint8)
        inside = m > 0
        w = m[inside]
        diff = np.sqrt(((rgb - under[inside]) ** 2).sum(-1)) / (255.0 * math.sqrt(3.0))
        contrast = alpha * float((diff * w).sum() / max(float(w.sum()), 1e-6))
    cx, cy, _ = placed[0]
    attrs = {"shape": shape, "color": color, "count": count, "size": size_word,
             "radius": round(float(np.mean([p[2] for p in placed])) / size, 4), "faded": faded,
             "alpha": round(alpha, 3), "contrast": round(contrast, 4), "background": bg_kind,
             "background_word": bg_word, "position": _position(cx / size, cy / size) if count == 1 else None}
    return img, attrs


def _position(x: float, y: float) -> str:
    v = "top" if y < 0.36 else "bottom" if y > 0.64 else ""
    h = "left" if x < 0.36 else "right" if x > 0.64 else ""
    return (v + " " + h).strip() or "center"


# --------------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(rng: np.random.Generator, shape: str, color: str, count: int, size: str, background: str,
                 position: str | None, *, shape_only_prob: float = DEFAULTS["shape_only_prob"],
                 color_only_prob: float = DEFAULTS["color_only_prob"]) -> str:
    """One caption of many phrasings for the (possibly corrupted) attribute words.

    With probability ``shape_only_prob`` the caption names the shape but not the colour (``color_only_prob``:
    the colour but not the shape); otherwise both.
    """
    u = rng.random()
    if u < shape_only_prob:
        noun = shape if count == 1 else PLURALS[shape]
        obj = f"{_article(shape)} {shape}" if count == 1 else f"{COUNT_WORDS[count]} {noun}"
        pool = [obj, f"a photo of {obj}", f"a drawing of {obj}", f"a picture of {obj}", f"an image of {obj}",
                f"{obj} on {_article(background)} {background} background", f"a simple {shape} shape",
                f"a rendering of {obj}", f"{_article(size)} {size} {noun}" if count == 1 else f"{size} {noun}"]
        return pool[int(rng.integers(len(pool)))]
    if u < shape_only_prob + color_only_prob:
        pool = [f"a photo of something {color}", f"a shape colored {color}", f"{color} shapes",
                f"something {color} on {_article(background)} {background} background",
                f"{_article(color)} {color} object"]
        return pool[int(rng.integers(len(pool)))]
    use_size = rng.random() < 0.4
    adj = (size + " " if use_size else "") + color
    noun = shape if count == 1 else PLURALS[shape]
    obj = f"{_article(adj)} {adj} {noun}" if count == 1 else f"{COUNT_WORDS[count]} {adj} {noun}"
    bg = f"{background} background"
    options = [
        f"{obj}", f"{obj} on {_article(bg)} {bg}", f"a photo of {obj}", f"a drawing of {obj}",
        f"an image of {obj}", f"a picture showing {obj}", f"a rendering of {obj} on {_article(bg)} {bg}",
        f"{obj}, {bg}", f"a photo of {obj} on {_article(bg)} {bg}",
    ]
    if count == 1:
        the = f"the {adj} {noun}"
        options += [f"there is {obj} in the {position}", f"{obj} in the {position}", f"a photo of {the}",
                    the, f"a {shape} colored {color}", f"a simple {shape} shape in {color}",
                    f"a {shape} colored {color} on {_article(bg)} {bg}"]
    else:
        options += [f"{COUNT_WORDS[count]} {PLURALS[shape]} colored {color}", f"a group of {obj}",
                    f"{color} {PLURALS[shape]} on {_article(bg)} {bg}"]
    return options[int(rng.integers(len(options)))]


def heldout_pairs(seed: int, num_heldout: int) -> list[tuple[str, str]]:
    """Colour-shape pairs kept out of training: distinct shapes and distinct colours (seeded)."""
    if not 0 <= num_heldout <= min(len(SHAPES), len(COLORS)):
        raise ValueError(f"num_heldout={num_heldout} must be in [0, {min(len(SHAPES), len(COLORS))}] "
                         "(one held-out colour per shape at most)")
    rng = np.random.default_rng([seed, 99])
    shapes = rng.permutation(len(SHAPES))[:num_heldout]
    colors = rng.permutation(len(COLORS))[:num_heldout]
    names = list(COLORS)
    return sorted((SHAPES[s], names[c]) for s, c in zip(shapes, colors))


# --------------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------------

def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _train_sample(p: dict, index: int, heldout: set) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng([p["seed"], 0, index])
    names = list(COLORS)
    while True:  # rejection keeps held-out pairs out of training (uniform over the allowed pairs)
        shape, color = SHAPES[int(rng.integers(len(SHAPES)))], names[int(rng.integers(len(names)))]
        if (shape, color) not in heldout:
            break
    img, a = render_scene(rng, p["image_size"], shape, color, **_scene_params(p))
    hard_shape = a["size"] == "small"
    hard_color = a["contrast"] < p["contrast_threshold"]
    hard = hard_shape or hard_color
    selected = noise_selected(p["noise_rule"], color, hard_shape, hard_color)
    prob = p["noise_prob"] if selected else p["noise_prob_easy"]
    cap_shape, cap_color, corrupted = shape, color, None
    if rng.random() < prob:
        if p["noise_rule"] == "color_partner":
            if (PARTNER_SHAPES[shape], color) not in heldout:
                corrupted, cap_shape = "shape", PARTNER_SHAPES[shape]
        else:
            corrupted, cap_shape, cap_color = _random_wrong_word(rng, shape, color, hard_shape, hard_color, heldout)
    caption = make_caption(rng, cap_shape, cap_color, a["count"], a["size"], a["background_word"], a["position"],
                           shape_only_prob=p["shape_only_prob"], color_only_prob=p["color_only_prob"])
    meta = {**a, "hard": hard, "hard_shape": hard_shape, "hard_color": hard_color, "noise_selected": selected,
            "corrupted": corrupted is not None, "corrupted_attribute": corrupted,
            "caption_shape": cap_shape, "caption_color": cap_color, "caption": caption}
    return img, meta


def noise_selected(rule: str, color: str, hard_shape: bool, hard_color: bool) -> bool:
    """Whether ``rule`` puts caption noise on a sample of this colour and visibility (``noise_prob`` applies;
    otherwise ``noise_prob_easy``)."""
    return color in PARTNER_COLORS if rule == "color_partner" else (hard_shape or hard_color)


def _random_wrong_word(rng: np.random.Generator, shape: str, color: str, hard_shape: bool, hard_color: bool,
                       heldout: set) -> tuple[str, str, str]:
    """The ``"hard"`` rule's corruption: ``(attribute, caption shape, caption colour)``, the attribute that is
    hard to see (either if both or neither are) replaced by a random other word outside the held-out pairs."""
    if hard_shape and hard_color:
        corrupted = ("shape", "color")[int(rng.integers(2))]
    elif hard_shape or hard_color:
        corrupted = "shape" if hard_shape else "color"
    else:
        corrupted = ("shape", "color")[int(rng.integers(2))]
    if corrupted == "shape":
        choices = [s for s in SHAPES if s != shape and (s, color) not in heldout]
        return corrupted, choices[int(rng.integers(len(choices)))], color
    choices = [c for c in COLORS if c != color and (shape, c) not in heldout]
    return corrupted, shape, choices[int(rng.integers(len(choices)))]


def _scene_params(p: dict) -> dict:
    return {k: p[k] for k in ("faded_prob", "small_prob", "multi_prob", "max_rotation", "max_offset")}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(args: tuple[dict, int, str]) -> tuple[str, int, int]:
    p, shard, out = args
    heldout = {tuple(x) for x in heldout_pairs(p["seed"], p["num_heldout"])}
    start = shard * p["shard_size"]
    stop = min(start + p["shard_size"], p["num_train"])
    ext = "jpg" if p["image_format"] == "jpg" else "png"
    name = f"{shard:05d}.tar"
    corrupted = 0
    with tarfile.open(os.path.join(out, name), "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, stop):
            img, meta = _train_sample(p, i, heldout)
            key = f"{i:09d}"
            meta = {"key": key, **meta}
            corrupted += meta["corrupted"]
            _tar_add(tar, f"{key}.{ext}", _encode(img, p["image_format"]))
            _tar_add(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
            _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    return name, stop - start, corrupted


def _eval_classes(task: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(folder, class name, [(shape, color) pairs sampled for this class])."""
    names = list(COLORS)
    if task == "shape":
        classes = [(s, s, [(s, c) for c in names]) for s in SHAPES]
    elif task == "color":
        classes = [(c, c, [(s, c) for s in SHAPES]) for c in names]
    else:
        classes = [(f"{c}_{s}", f"{c} {s}", [(s, c)]) for s in SHAPES for c in names]
    return sorted(classes)  # label k = k-th folder in sorted order (ImageFolder convention)


def _write_eval_class(args: tuple[dict, str, int, str, str, list, str]) -> list[dict]:
    p, task, class_index, folder, classname, pairs, out = args
    n = p["eval_per_class"] if task in ("shape", "color") else p["eval_per_combo"]
    ext = "jpg" if p["image_format"] == "jpg" else "png"
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    rows = []
    for j in range(n):
        rng = np.random.default_rng([p["seed"], 1 + TASKS.index(task), class_index, j])
        shape, color = pairs[int(rng.integers(len(pairs)))]
        img, a = render_scene(rng, p["image_size"], shape, color, **_scene_params(p))
        rel = f"{folder}/{j:05d}.{ext}"
        with open(os.path.join(out, rel), "wb") as f:
            f.write(_encode(img, p["image_format"]))
        rows.append({"path": rel, "label": class_index, "class": classname, **a,
                     "hard_shape": a["size"] == "small", "hard_color": a["contrast"] < p["contrast_threshold"]})
    return rows


# --------------------------------------------------------------------------------------------------
# dataset generation
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where the parts of a generated demo dataset live."""

    root: str
    manifest: str
    train_dir: str
    train_shards: tuple[str, ...]
    train_pattern: str  # brace pattern over the shards, e.g. ".../train/{00000..00007}.tar"
    sizes: str
    eval_dirs: dict[str, str]
    tokenizer: str

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "train_shards": list(self.train_shards)}


_FLOAT_RANGES = {k: (0.0, 1.0) for k in ("faded_prob", "small_prob", "multi_prob", "shape_only_prob",
                                         "color_only_prob", "noise_prob", "noise_prob_easy", "contrast_threshold")}
_FLOAT_RANGES.update(max_offset=(0.0, 0.5), max_rotation=(0.0, 180.0))  # fraction of the image; degrees


def _check_params(params: dict) -> dict:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown demo parameter(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    for k in ("seed", "image_size", "num_train", "shard_size", "eval_per_class", "eval_per_combo", "num_heldout",
              "vocab_size", "context_length"):
        if not isinstance(p[k], (int, np.integer)) or isinstance(p[k], bool):
            raise ValueError(f"demo parameter {k}={p[k]!r} must be an int")
        p[k] = int(p[k])
    for k, (lo, hi) in _FLOAT_RANGES.items():
        p[k] = float(p[k])
        if not lo <= p[k] <= hi:
            raise ValueError(f"demo parameter {k}={p[k]} must be in [{lo:g}, {hi:g}]")
    if p["shape_only_prob"] + p["color_only_prob"] > 1.0:
        raise ValueError(f"demo parameters shape_only_prob + color_only_prob = "
                         f"{p['shape_only_prob'] + p['color_only_prob']} must be <= 1")
    if p["image_size"] < 16:
        raise ValueError(f"demo parameter image_size={p['image_size']} must be >= 16 pixels")
    for k in ("num_train", "shard_size", "eval_per_class", "eval_per_combo"):
        if p[k] < 1:
            raise ValueError(f"demo parameter {k}={p[k]} must be >= 1")
    if p["noise_rule"] not in NOISE_RULES:
        raise ValueError(f"demo parameter noise_rule={p['noise_rule']!r} must be one of {list(NOISE_RULES)}")
    if p["image_format"] not in ("png", "jpg"):
        raise ValueError(f"demo parameter image_format={p['image_format']!r} must be 'png' or 'jpg'")
    if p["context_length"] < 2:
        raise ValueError(f"demo parameter context_length={p['context_length']} must be >= 2")
    heldout_pairs(p["seed"], p["num_heldout"])  # validates num_heldout
    return p


def demo_paths(root: str | os.PathLike, num_train: int, shard_size: int) -> DemoPaths:
    root = os.path.abspath(os.fspath(root))
    n = -(-num_train // shard_size)
    train = os.path.join(root, "train")
    shards = tuple(os.path.join(train, f"{i:05d}.tar") for i in range(n))
    pattern = os.path.join(train, f"{{00000..{n - 1:05d}}}.tar" if n > 1 else "00000.tar")
    return DemoPaths(root=root, manifest=os.path.join(root, "manifest.json"), train_dir=train, train_shards=shards,
                     train_pattern=pattern, sizes=os.path.join(train, "sizes.json"),
                     eval_dirs={t: os.path.join(root, "eval", t) for t in TASKS},
                     tokenizer=os.path.join(root, "tokenizer"))


def _run(fn, jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: safe even when the caller has threads (JAX, TensorFlow) running
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, jobs))


def generate_demo(out_dir: str | os.PathLike, *, workers: int = 1, **params: Any) -> DemoPaths:
    """Generate the demo dataset into ``out_dir`` (must not exist); returns its paths. See ``DEFAULTS``."""
    p = _check_params(params)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"demo output directory {out} already exists (use ensure_demo to reuse/replace it)")
    paths = demo_paths(out, p["num_train"], p["shard_size"])
    heldout = heldout_pairs(p["seed"], p["num_heldout"])
    os.makedirs(paths.train_dir)
    n_shards = len(paths.train_shards)
    eval_jobs = []
    for task in TASKS:
        for k, (folder, classname, pairs) in enumerate(_eval_classes(task)):
            eval_jobs.append((p, task, k, folder, classname, pairs, paths.eval_dirs[task]))
    jobs = [("train", (p, s, paths.train_dir)) for s in range(n_shards)] + [("eval", j) for j in eval_jobs]
    results = _run(_job, jobs, workers)
    shard_results, eval_results = results[:n_shards], results[n_shards:]
    sizes = {name: n for name, n, _ in shard_results}
    with open(paths.sizes, "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    eval_summary = {}
    for task in TASKS:
        classes = _eval_classes(task)
        rows = [r for (job, res) in zip(eval_jobs, eval_results) if job[1] == task for r in res]
        d = paths.eval_dirs[task]
        with open(os.path.join(d, "classnames.txt"), "w") as f:
            f.write("".join(c[1] + "\n" for c in classes))
        with open(os.path.join(d, "templates.txt"), "w") as f:
            f.write("".join(t + "\n" for t in TEMPLATES[task]))
        with open(os.path.join(d, "meta.jsonl"), "w") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        eval_summary[task] = {"num_classes": len(classes), "num_images": len(rows)}
    with open(os.path.join(paths.eval_dirs["shape_color"], "heldout.txt"), "w") as f:
        f.write("".join(f"{c} {s}\n" for s, c in heldout))

    from hetclip.data.bpe import iter_shard_captions, train_bpe

    tok = train_bpe(iter_shard_captions(list(paths.train_shards)), paths.tokenizer, vocab_size=p["vocab_size"],
                    min_frequency=2, context_length=p["context_length"])
    manifest = {
        "format": FORMAT_VERSION,
        "generator": "hetclip.data.demo",
        "params": p,
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "backgrounds": list(BACKGROUNDS),
        "heldout_pairs": [{"shape": s, "color": c} for s, c in heldout],
        "train": {"shards": [os.path.basename(s) for s in paths.train_shards], "num_samples": sum(sizes.values()),
                  "num_corrupted": int(sum(c for _, _, c in shard_results)),
                  "pattern": os.path.relpath(paths.train_pattern, paths.root)},
        "eval": eval_summary,
        "tokenizer": {"path": "tokenizer", "kind": "hf", "vocab_size": tok["vocab_size"],
                      "context_length": p["context_length"]},
    }
    with open(paths.manifest, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return paths


def _job(job):
    kind, args = job
    return _write_shard(args) if kind == "train" else _write_eval_class(args)


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a generated demo dataset, or None if absent/unreadable."""
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def _is_current(out_dir: Path, p: dict) -> bool:
    m = read_manifest(out_dir)
    return m is not None and m.get("format") == FORMAT_VERSION and m.get("params") == p


def ensure_demo(out_dir: str | os.PathLike, *, workers: int = 1, force: bool = False, **params: Any) -> DemoPaths:
    """Return the demo dataset at ``out_dir``, generating it if missing or if its manifest differs.

    Generation is atomic: everything is written to a temporary sibling directory renamed into place at the
    end, so an interrupted run never leaves a half-written dataset that looks complete.
    """
    p = _check_params(params)
    out = Path(out_dir).absolute()
    if not force and _is_current(out, p):
        return demo_paths(out, p["num_train"], p["shard_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        generate_demo(tmp_root / "demo", workers=workers, **p)
        if out.exists() or out.is_symlink():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp_root / "demo", out)
        except OSError:
            if not _is_current(out, p):  # a concurrent writer that produced something else
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return demo_paths(out, p["num_train"], p["shard_size"])


def configure(cfg: dict, paths: DemoPaths) -> dict:
    """A copy of a training config (as a dict) whose data shards, tokenizer (unless ``data.tokenizer.path``
    names one, e.g. a pretrained model's) and demo evaluators are the demo data's at ``paths``: an
    ``evals`` entry named after a demo task (``TASKS``) with no ``dir`` gets that task's folder, class
    names and prompts."""
    out = copy.deepcopy(cfg)
    out["data"]["shards"] = paths.train_pattern
    if not out["data"]["tokenizer"].get("path"):
        out["data"]["tokenizer"]["path"] = paths.tokenizer
    for entry in out.get("evals", []):
        task = entry.get("name")
        if task in TASKS and not entry.get("dir"):
            entry.update(dir=paths.eval_dirs[task], classnames=os.path.join(paths.eval_dirs[task], "classnames.txt"),
                         templates=os.path.join(paths.eval_dirs[task], "templates.txt"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hetclip-demo-data",
                                 description="Generate the built-in demo dataset (rendered shapes + captions).")
    ap.add_argument("--out", required=True, help="output directory")
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if k == "image_format":
            ap.add_argument(flag, default=v, choices=["png", "jpg"])
        else:
            ap.add_argument(flag, type=type(v), default=v, help=f"default {v}")
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help="processes (the output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="regenerate even if the manifest matches")
    args = ap.parse_args(argv)
    params = {k: getattr(args, k) for k in DEFAULTS}
    t0 = time.perf_counter()
    try:
        paths = ensure_demo(args.out, workers=args.workers, force=args.force, **params)
    except (ValueError, FileExistsError) as e:
        print(f"hetclip-demo-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**paths.as_dict(), "seconds": round(time.perf_counter() - t0, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
