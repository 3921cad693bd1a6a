"""Pieces the benchmark scripts share (imported by name: a script's own folder is on ``sys.path``).

Standard library only at import time, so a script's non-hetclip worker (e.g. open_clip's, in another
venv) can import it too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def timed(fn, n: int) -> list[float]:
    """Wall seconds of ``n`` calls of ``fn()``, one entry per call."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def add_before_after_args(ap: argparse.ArgumentParser, what: str) -> None:
    """The options of a before/after comparison: ``--before REF``, ``--workers``, ``--rounds``, ``--tag``,
    ``--out``."""
    ap.add_argument("--before", default="main", help=f"git ref of the 'before' {what} ('' to skip)")
    ap.add_argument("--workers", default="1,2", help="comma list of data worker counts")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of each run (best kept)")
    ap.add_argument("--tag", default="", help="results file suffix, e.g. the CPU kind")
    ap.add_argument("--out", default=RESULTS)


def extract_ref(ref: str, dest: str) -> str:
    """``git archive REF`` of this repository laid out as an importable ``hetclip`` package under ``dest``;
    returns the ``PYTHONPATH`` entry."""
    src, pkg = os.path.join(dest, "src"), os.path.join(dest, "pkg")
    os.makedirs(src)
    os.makedirs(pkg)
    archive = subprocess.run(["git", "-C", REPO, "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    os.rename(os.path.join(src, "hetclip"), os.path.join(pkg, "hetclip"))
    for sub in ("data", "zero_shot", "configs"):
        os.rename(os.path.join(src, sub), os.path.join(pkg, "hetclip", sub))
    return pkg


def require_matplotlib(path: str):
    """``matplotlib`` (the optional ``plot`` extra), or exit naming the extra before any work is done."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"plotting {path} needs matplotlib: pip install -e \".[plot]\" "
                         f"(or pass --figure '' for no figure)") from e
    return matplotlib


def run_json_child(cmd: list[str], env: dict, cwd: str) -> dict:
    """Run a measuring subprocess and parse the JSON object on the last line of its stdout; a failed child
    is reported with its command and the end of its stderr."""
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """What a results header names: the CPU kind (``hetclip.xla.cpu_description``) and the 1/5/15-minute
    load averages (the machine may be shared)."""
    from hetclip.xla import cpu_description

    return {"cpu": cpu_description(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# ---------------------------------------------------------------------------------------------
# Statistics of the evidence scripts: arms compared seed by seed


def paired_interval(a, b, confidence: float = 0.95) -> dict:
    """Paired t-interval of ``mean(b - a)`` over seeds: ``{"mean", "std", "lo", "hi", "n"}``
    (``std`` of the differences; ``lo``/``hi`` NaN for fewer than two pairs)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_interval needs two equal-length 1-D sequences, got {a.shape} and {b.shape}")
    d = b - a
    n = d.size
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    from scipy import stats

    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "std": sd, "lo": mean - half, "hi": mean + half, "n": n}


def verdict(iv: dict, higher_is_better: bool) -> str:
    """Whether a paired interval shows the second arm better, worse, or neither."""
    if not math.isfinite(iv["lo"]):
        return "one seed: no interval"
    if iv["lo"] > 0 or iv["hi"] < 0:
        better = (iv["lo"] > 0) == higher_is_better
        return "**better** (interval excludes 0)" if better else "**worse** (interval excludes 0)"
    return "no difference shown (interval contains 0)"


def mean_std(values) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
