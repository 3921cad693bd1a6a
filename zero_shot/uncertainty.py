"""Per-image uncertainty of zero-shot predictions and how well it ranks the mistakes (selective prediction).

Per image (``per_image_scores``), from the class log-probabilities of a predictive:

* ``pred``, ``correct``: the top-1 class and whether it is the label;
* ``confidence``: the top-1 probability;
* ``entropy``: ``−Σ_c p_c log p_c`` (nats) of the predictive.

For a HET-XL model the MC-averaged predictive gives the same fields (prefix ``mc_``), and the head's
``noise``: the angular size of the image's embedding noise (``hetclip.noise.per_example_sizes``).

Selective prediction (``selective_prediction``): rank the images by a certainty score (higher = more
certain; for the noise size its negative) and keep the most certain fraction. The report gives

* ``auroc``: the probability that a correctly classified image scores higher than a misclassified one
  (ties count one half), i.e. the area under the ROC curve of detecting the mistakes by a low score;
  ``None`` when every image is right or every image is wrong (the ranking has nothing to separate);
* ``aurc``: the area under the risk–coverage curve (mean error rate over the coverages ``k/N``), lower is
  better; the best possible for this accuracy is the error rate of the ideal ranking, ``aurc_optimal``;
* ``accuracy_at``: the accuracy of the most certain 50 %, 80 %, 90 % and all images;
* ``curve``: accuracy against coverage at ``points`` evenly spaced coverages (the plotted curve).

``write_per_image`` writes the per-image fields as CSV or JSON Lines (by the file's extension), one row per
image with its name, label and predicted class names.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

COVERAGES = (0.5, 0.8, 0.9, 1.0)

# score name -> (per-image field, sign): the score is sign * field, higher = more certain
SCORES = {
    "confidence": ("confidence", 1.0),
    "mc_confidence": ("mc_confidence", 1.0),
    "noise": ("noise", -1.0),
}


def per_image_scores(log_probs, labels, prefix: str = "") -> Dict[str, np.ndarray]:
    """``{prefix + pred, correct, confidence, entropy}`` per row of ``log_probs [N, C]`` (normalised)."""
    lp = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels)
    if lp.ndim != 2 or labels.shape != (lp.shape[0],):
        raise ValueError(f"expected log-probabilities [N, C] and labels [N], got {lp.shape} and {labels.shape}")
    p = np.exp(lp)
    pred = np.argmax(lp, axis=1)
    entropy = -np.sum(np.where(p > 0, p * lp, 0.0), axis=1)
    return {f"{prefix}pred": pred.astype(np.int64), f"{prefix}correct": pred == labels,
            f"{prefix}confidence": p[np.arange(len(pred)), pred], f"{prefix}entropy": entropy}


def auroc(correct, score) -> Optional[float]:
    """P(score of a correct item > score of a wrong one) + ½ P(equal): Mann–Whitney on average ranks."""
    correct = np.asarray(correct, bool)
    score = np.asarray(score, np.float64)
    n_pos, n_neg = int(correct.sum()), int((~correct).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_scores = score[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[correct].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def selective_prediction(correct, score, *, points: int = 20, coverages: Sequence[float] = COVERAGES) -> Dict:
    """The selective-prediction report of one certainty ``score`` (see the module docstring)."""
    correct = np.asarray(correct, bool)
    score = np.asarray(score, np.float64)
    n = correct.shape[0]
    if n == 0 or score.shape != (n,):
        raise ValueError(f"need one score per image: {score.shape} scores for {n} images")
    if not np.isfinite(score).all():
        raise ValueError(f"{int((~np.isfinite(score)).sum())} non-finite certainty score(s)")
    # most certain first; among equal scores the order is the input order (stable)
    kept_correct = np.cumsum(correct[np.argsort(-score, kind="mergesort")])
    k = np.arange(1, n + 1)
    accuracy = kept_correct / k
    ideal = np.minimum(k, correct.sum()) / k
    grid = np.linspace(1.0 / points, 1.0, points)

    def at(c):
        return float(accuracy[max(int(np.ceil(c * n)), 1) - 1])

    return {"auroc": auroc(correct, score), "aurc": float(np.mean(1.0 - accuracy)),
            "aurc_optimal": float(np.mean(1.0 - ideal)),
            "accuracy_at": {f"{c:g}": at(c) for c in coverages},
            "curve": {"coverage": [float(c) for c in grid], "accuracy": [at(c) for c in grid]}}


def selective_report(per_image: Dict[str, np.ndarray]) -> Dict[str, Dict]:
    """``selective_prediction`` for each certainty score the per-image fields allow: ``confidence``
    (deterministic top-1 probability), ``mc_confidence`` (MC predictive, judged on the MC prediction's
    correctness) and ``noise`` (minus the HET-XL noise size, judged on the deterministic prediction)."""
    out = {}
    for name, (field, sign) in SCORES.items():
        if field not in per_image:
            continue
        correct = per_image["mc_correct" if name == "mc_confidence" else "correct"]
        out[name] = selective_prediction(correct, sign * np.asarray(per_image[field], np.float64))
    return out


MISSING = {
    "mc_confidence": "needs the HET-XL head and --mc-samples > 0",
    "noise": "needs the HET-XL head",
}


def describe(per_image: Dict[str, np.ndarray], het: bool) -> Dict:
    """Which certainty scores a run reports, and why the others are absent (a model without the HET-XL head
    reports its deterministic confidence only)."""
    have = [name for name, (field, _) in SCORES.items() if field in per_image]
    missing = {name: MISSING[name] + ("" if het else ": this model has no HET-XL head (het.enabled=False)")
               for name in SCORES if name not in have}
    return {"scores": have, "missing": missing}


def _rows(per_image: Dict, classnames: Sequence[str]):
    fields = [k for k in per_image if k not in ("classnames",)]
    n = len(per_image["label"])
    for i in range(n):
        row = {}
        for k in fields:
            v = per_image[k][i]
            row[k] = v.item() if hasattr(v, "item") else v
            if k in ("label", "pred", "mc_pred") and classnames:
                row[f"{k}_name"] = classnames[int(v)]
        yield row


def write_per_image(path: str, per_image: Dict) -> str:
    """Write ``per_image`` (``run_zero_shot(..., per_image=True)["per_image"]``) to ``path``: ``.csv`` or
    ``.jsonl``; written under a temporary name and renamed. Returns ``path``."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl"):
        raise ValueError(f"per-image output {path!r} must end in .csv or .jsonl")
    classnames = list(per_image.get("classnames") or [])
    rows = _rows(per_image, classnames)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if ext == ".jsonl":
            for row in rows:
                f.write(json.dumps(row) + "\n")
        else:
            first = next(rows, None)
            if first is not None:
                w = csv.DictWriter(f, fieldnames=list(first))
                w.writeheader()
                w.writerow(first)
                w.writerows(rows)
    os.replace(tmp, path)
    return path
