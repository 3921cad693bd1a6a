"""Prompt templates and class names for zero-shot classification.

Template sets: ``clip80`` (the 80 ImageNet prompts of the CLIP paper), ``clip7`` (the 7-prompt
subset the CLIP notebook reports as slightly better), ``bare`` (just the class name), or a path to a
text file with one template per line. ``{c}`` stands for the class name; so does ``{}`` in a template
without ``{c}`` (the placeholder of CLIP's and open_clip's template lists).

Class names: ``imagenet`` (the 1000 curated CLIP names, line k = class k) or a text file (one per line).

Canonicalisation (optional, recorded in results): lower-case, strip punctuation, collapse whitespace,
applied to class names and to the finished prompts.
"""
from __future__ import annotations

import os
import re
import string
from importlib import resources as _res
from typing import List, Sequence

TEMPLATE_SETS = ("clip80", "clip7", "bare")

CLIP7 = (
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)

_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_SPACE = re.compile(r"\s+")


def _resource_lines(name: str) -> List[str]:
    text = _res.files("hetclip.zero_shot").joinpath("resources", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _file_lines(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path!r} is empty")
    return lines


def imagenet_wnids() -> List[str]:
    """The 1000 ImageNet-1k WordNet ids, sorted (line k = class k)."""
    return _resource_lines("imagenet_wnids.txt")


def imagenet_classnames() -> List[str]:
    """The 1000 CLIP-curated ImageNet class names, in WNID order."""
    return _resource_lines("imagenet_classnames.txt")


def load_templates(spec: str) -> List[str]:
    """Template list for ``clip80`` / ``clip7`` / ``bare`` or a file path (one template per line)."""
    if spec == "clip80":
        templates = _resource_lines("imagenet_templates.txt")
    elif spec == "clip7":
        templates = list(CLIP7)
    elif spec == "bare":
        templates = ["{c}"]
    elif os.path.exists(spec) or os.sep in spec or spec.endswith(".txt"):
        templates = _file_lines(spec, "templates")
    else:
        raise ValueError(f"unknown template set {spec!r}: expected one of {TEMPLATE_SETS} or a file path")
    templates = [t if "{c}" in t else t.replace("{}", "{c}") for t in templates]
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"templates {spec!r}: {len(bad)} template(s) lack the class name placeholder "
                         f"'{{c}}' (or '{{}}'), e.g. {bad[0]!r}")
    return templates


def load_classnames(spec: str) -> List[str]:
    """Class names: ``imagenet`` or a text file with one name per line."""
    if spec == "imagenet":
        return imagenet_classnames()
    names = _file_lines(spec, "class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"class names file {spec!r} has duplicate names: {dup[:5]}")
    return names


def canonicalize(text: str) -> str:
    """Lower-case, replace punctuation by spaces, collapse whitespace."""
    text = _PUNCT.sub(" ", text.lower())
    return _SPACE.sub(" ", text).strip()


def fill(template: str, classname: str) -> str:
    """Substitute the class name (only ``{c}``; other braces are left alone)."""
    return template.replace("{c}", classname)


def prompts(classnames: Sequence[str], templates: Sequence[str], *, canonical: bool = False) -> List[List[str]]:
    """``[C][T]`` prompt strings; with ``canonical`` both class names and prompts are canonicalised."""
    out = []
    for name in classnames:
        if canonical:
            name = canonicalize(name)
        row = [fill(t, name) for t in templates]
        out.append([canonicalize(p) for p in row] if canonical else row)
    return out
