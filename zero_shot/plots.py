"""Reliability diagrams of zero-shot predictions (matplotlib, the optional ``plot`` extra).

A diagram shows, for each of the 15 equal-width confidence bins of the ECE (``metrics.py``), the
accuracy of the examples whose top-class probability falls in the bin, against the diagonal of
perfect calibration; the gap to the bin's mean confidence is shaded and the ECE is in the title.
With MC-averaged HET-XL predictions the deterministic and the MC diagrams are drawn side by side.
The selective-prediction figure (``selective_figure``) draws the accuracy of the most certain images against
the fraction kept, one curve per certainty score of ``uncertainty.selective_report``, with its AUROC.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global backend state).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

PANELS = (("deterministic", "deterministic"), ("mc", "MC-averaged"))
EXTRA_HINT = "pip install 'hetclip[plot]' (matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Fail early, naming the extra to install, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed: {EXTRA_HINT}") from None


def ece_of(diagram: Dict[str, List]) -> float:
    """``Σ_b count_b / N · |accuracy_b − confidence_b|`` over the filled bins of a diagram."""
    n = sum(diagram["count"])
    if n == 0:
        raise ValueError("the reliability diagram has no examples")
    return sum(c / n * abs(a - f) for c, a, f in zip(diagram["count"], diagram["accuracy"], diagram["confidence"])
               if c)


def reliability_figure(diagrams: Dict[str, Dict[str, List]], title: str = ""):
    """A ``Figure`` with one panel per diagram present (``deterministic``, then ``mc``). In each panel
    the bars (one per bin, empty bins at height 0) are the per-bin accuracies; the panel's title holds
    its ECE."""
    from matplotlib.figure import Figure

    present = [(key, label) for key, label in PANELS if key in diagrams]
    if not present:
        raise ValueError(f"no reliability diagram to plot; expected one of {[k for k, _ in PANELS]}")
    fig = Figure(figsize=(4.2 * len(present), 4.4), layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, (key, label) in zip(axes, present):
        d = diagrams[key]
        width = [u - lo for lo, u in zip(d["lower"], d["upper"])]
        acc = [a if a is not None else 0.0 for a in d["accuracy"]]
        conf = [c if c is not None else lo + w / 2 for c, lo, w in zip(d["confidence"], d["lower"], width)]
        ax.bar(d["lower"], acc, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5,
               label="accuracy", gid="accuracy")
        gaps = [(c - a) if n else 0.0 for c, a, n in zip(conf, acc, d["count"])]
        ax.bar(d["lower"], gaps, bottom=acc, width=width, align="edge", color="tab:red", alpha=0.3,
               label="gap to confidence", gid="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}: ECE {ece_of(d):.4f} ({len(d['count'])} bins)")
        ax.legend(loc="upper left", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "task"


SCORE_LABELS = {"confidence": "deterministic confidence", "mc_confidence": "MC predictive confidence",
                "noise": "HET-XL noise size (smaller = more certain)"}


def selective_figure(selective: Dict[str, Dict], title: str = ""):
    """Accuracy against coverage for each score in ``selective`` (``uncertainty.selective_report``)."""
    from matplotlib.figure import Figure

    if not selective:
        raise ValueError("no selective-prediction report to plot")
    fig = Figure(figsize=(5.2, 4.4), layout="constrained")
    ax = fig.subplots()
    for name, rep in selective.items():
        auroc = rep["auroc"]
        label = f"{SCORE_LABELS.get(name, name)}: AUROC " + ("n/a" if auroc is None else f"{auroc:.3f}")
        ax.plot(rep["curve"]["coverage"], rep["curve"]["accuracy"], marker=".", label=label, gid=name)
    ax.set_xlim(0, 1)
    ax.set_xlabel("coverage (fraction of images kept, most certain first)")
    ax.set_ylabel("accuracy of the kept images")
    ax.legend(loc="lower left", fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def _save(fig, out_dir: str, stem: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.png")
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def write_selective_plot(result: Dict[str, Any], out_dir: str, name: str, title: Optional[str] = None) -> str:
    """Render ``result["selective"]`` (from ``run_zero_shot``) to ``out_dir/selective_<name>.png``."""
    require_matplotlib()
    fig = selective_figure(result.get("selective") or {}, title if title is not None else name)
    return _save(fig, out_dir, f"selective_{_slug(name)}")


def write_reliability_plot(result: Dict[str, Any], out_dir: str, name: str, title: Optional[str] = None) -> str:
    """Render ``result["reliability"]`` (from ``run_zero_shot``) to ``out_dir/reliability_<name>.png``;
    returns the path. The file is written under a temporary name and renamed."""
    require_matplotlib()
    diagrams = result.get("reliability") or {}
    fig = reliability_figure(diagrams, title if title is not None else name)
    return _save(fig, out_dir, f"reliability_{_slug(name)}")
