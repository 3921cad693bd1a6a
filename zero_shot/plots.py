"""Reliability diagrams of zero-shot predictions (matplotlib, the optional ``plot`` extra).

A diagram shows, for each of the 15 equal-width confidence bins of the ECE (``metrics.py``), the
accuracy of the examples whose top-class probability falls in the bin, against the diagonal of
perfect calibration; the gap to the bin's mean confidence is shaded and the ECE is in the title.
With MC-averaged HET-XL predictions the deterministic and the MC diagrams are drawn side by side.
The figure is built with ``matplotlib.figure.Figure`` (no pyplot, no global backend state).
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


def write_reliability_plot(result: Dict[str, Any], out_dir: str, name: str, title: Optional[str] = None) -> str:
    """Render ``result["reliability"]`` (from ``run_zero_shot``) to ``out_dir/reliability_<name>.png``;
    returns the path. The file is written under a temporary name and renamed."""
    require_matplotlib()
    diagrams = result.get("reliability") or {}
    fig = reliability_figure(diagrams, title if title is not None else name)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"reliability_{_slug(name)}.png")
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path
