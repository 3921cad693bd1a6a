"""Results files in CLIP_benchmark's layout, so its ``clip_benchmark build`` and the tools around it read them.

One JSON object per dataset and task, as ``clip_benchmark eval`` writes::

    {"dataset": "imagenet1k", "model": "hetclip-B/32-HET-XL", "pretrained": "/runs/b32@50000",
     "task": "zeroshot_classification", "language": "en",
     "metrics": {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...,          # CLIP_benchmark's keys
                 "nll": ..., "ece": ..., "mc_acc1": ..., "mc_nll": ..., ...},     # ours, beside them
     "hetclip": {...}}                                                            # how the number was made

Retrieval metrics use CLIP_benchmark's names: ``image_retrieval_recall@k`` (a caption retrieves its
image among all images) and ``text_retrieval_recall@k`` (an image retrieves one of its captions).
``acc5`` is left out with fewer than 5 classes (CLIP_benchmark writes NaN there, which strict JSON
readers refuse). The output path may hold CLIP_benchmark's placeholders ``{dataset}``, ``{model}``,
``{pretrained}``, ``{task}``, ``{language}`` (filled with ``/`` replaced by ``_``).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
PLACEHOLDERS = ("dataset", "model", "pretrained", "task", "language")

_CLASSIFICATION_KEYS = {"top1": "acc1", "top5": "acc5"}


def classification_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """hetclip's zero-shot metric names -> CLIP_benchmark's (``top1`` -> ``acc1``, ``mc_top1`` ->
    ``mc_acc1``, ...); every other key (NLL, ECE, MC predictive, counts) is kept as it is."""
    out = {}
    for key, value in metrics.items():
        prefix, base = ("mc_", key[3:]) if key.startswith("mc_") else ("", key)
        out[prefix + _CLASSIFICATION_KEYS.get(base, base)] = value
    return out


def retrieval_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """``text_to_image_R@k`` -> ``image_retrieval_recall@k``, ``image_to_text_R@k`` ->
    ``text_retrieval_recall@k``; other keys (counts) kept."""
    out = {}
    for key, value in metrics.items():
        m = re.fullmatch(r"(text_to_image|image_to_text)_R@(\d+)", key)
        if m:
            kind = "image" if m.group(1) == "text_to_image" else "text"
            out[f"{kind}_retrieval_recall@{m.group(2)}"] = value
        else:
            out[key] = value
    return out


def dataset_name(path: str, imagenet: bool = False) -> str:
    """``imagenet1k`` (CLIP_benchmark's name) for ``--imagenet``, else the last meaningful part of the
    directory or shard pattern (``/data/cifar10/{0..9}.tar`` -> ``cifar10``)."""
    if imagenet:
        return "imagenet1k"
    parts = [p for p in re.split(r"[/\\]", path.rstrip("/\\")) if p and not re.search(r"[{}*?\[\]]|\.tar$", p)]
    return parts[-1] if parts else "dataset"


def model_name(cfg) -> str:
    """``hetclip-<preset>`` when the towers match a preset (``hetclip-B/32``), else ``hetclip-ViT-W<width>-
    P<patch>``; ``-HET-XL`` is appended for a model with the HET-XL head."""
    from hetclip.model import PRESETS

    if cfg is None:
        return "hetclip"
    name = next((f"hetclip-{n}" for n, p in PRESETS.items()
                 if p.vision == cfg.vision and p.text.width == cfg.text.width and p.text.layers == cfg.text.layers),
                f"hetclip-ViT-W{cfg.vision.width}-P{cfg.vision.patch_size}")
    return name + ("-HET-XL" if getattr(cfg.het, "enabled", False) else "")


def record(result: Dict[str, Any], *, task: str, dataset: str, model: str, pretrained: str,
           language: str = "en") -> Dict[str, Any]:
    """A CLIP_benchmark results object from a ``run_zero_shot`` / ``run_retrieval`` result (plus the
    checkpoint fields the CLIs add); everything but ``metrics`` goes under ``hetclip``."""
    if task not in (CLASSIFICATION, RETRIEVAL):
        raise ValueError(f"task must be {CLASSIFICATION!r} or {RETRIEVAL!r}, got {task!r}")
    convert = classification_metrics if task == CLASSIFICATION else retrieval_metrics
    metrics = convert(result["metrics"])
    if task == CLASSIFICATION:  # no NaN in the file: a metric that does not exist is left out
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and v != v)}
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "language": language,
            "metrics": metrics, "hetclip": {k: v for k, v in result.items() if k != "metrics"}}


def output_path(template: str, rec: Dict[str, Any]) -> str:
    """``template`` with CLIP_benchmark's placeholders filled from ``rec``; a path without them as is."""
    fields = {k: str(rec[k]).replace("/", "_").replace(os.sep, "_") for k in PLACEHOLDERS}
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        known = ", ".join("{%s}" % k for k in PLACEHOLDERS)
        raise ValueError(f"--out {template!r}: unknown placeholder {e}; use {known}") from None


def pretrained_tag(info: Dict[str, Any], fallback: Optional[str] = None) -> str:
    """``<checkpoint>@<step>`` for a training checkpoint, the directory for an HF export."""
    ck = info.get("checkpoint") or fallback or "unknown"
    return f"{ck}@{info['step']}" if info.get("step") is not None else str(ck)
