"""Check that the accelerator extras of pyproject.toml resolve, without installing anything.

    python .ci/check_extras.py [--extras cuda12 tpu] [--timeout 120]

For each extra this runs ``pip install --dry-run --ignore-installed --report FILE ".[EXTRA]"`` (pip
resolves the dependencies from the indexes' metadata; nothing is installed) and checks the report:
jax at the version the base dependencies pin, and the extra's accelerator package (the CUDA 12 plugin,
libtpu) at a version that belongs to it. A resolution that fails is an error (exit 1). When the package
index cannot be reached (no network, a timeout) the check is skipped with the reason printed (exit 0):
CI machines without internet access must not fail on it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the package each extra must bring in, besides jax itself
ACCELERATOR_PACKAGE = {"cuda12": "jax-cuda12-plugin", "tpu": "libtpu"}
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "Read timed out", "ConnectTimeoutError", "timed out")


class ExtrasError(RuntimeError):
    pass


def base_jax_pin(pyproject: dict) -> str:
    """The exact jax version of the base dependencies (``jax==X.Y.Z``)."""
    for dep in pyproject["project"]["dependencies"]:
        m = re.fullmatch(r"\s*jax\s*==\s*([0-9][0-9A-Za-z.]*)\s*", dep.split(";")[0])
        if m:
            return m.group(1)
    raise ExtrasError("pyproject.toml: the base dependencies do not pin jax exactly (jax==X.Y.Z)")


def extra_jax_pin(pyproject: dict, extra: str) -> str:
    """The jax version an accelerator extra pins (``jax[cuda12]==X.Y.Z``)."""
    deps = pyproject["project"].get("optional-dependencies", {}).get(extra)
    if deps is None:
        raise ExtrasError(f"pyproject.toml has no extra {extra!r}")
    for dep in deps:
        m = re.fullmatch(r"\s*jax\[[^\]]+\]\s*==\s*([0-9][0-9A-Za-z.]*)\s*", dep.split(";")[0])
        if m:
            return m.group(1)
    raise ExtrasError(f"pyproject.toml: extra {extra!r} does not pin jax[...]==X.Y.Z")


def check_report(report: dict, extra: str, jax_version: str) -> dict:
    """Versions of jax and the accelerator package in a ``pip --report``; raises on a mismatch."""
    found = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
             for item in report.get("install", [])}
    if found.get("jax") != jax_version:
        raise ExtrasError(f"extra {extra!r} resolves jax {found.get('jax')!r}, the base pins {jax_version}")
    package = ACCELERATOR_PACKAGE[extra]
    if package not in found:
        raise ExtrasError(f"extra {extra!r} does not bring in {package} (resolved: {sorted(found)})")
    if extra == "cuda12" and found[package] != jax_version:
        raise ExtrasError(f"extra {extra!r} resolves {package} {found[package]}, jax is {jax_version}")
    return {"jax": found["jax"], package: found[package], "packages": len(found)}


def resolve(extra: str, timeout: float) -> tuple[str, dict | None]:
    """``("ok", report)``, or ``("skip", reason)`` when the index cannot be reached."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--timeout", "15", "--retries", "1", "--report", out, f".[{extra}]"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "skip", f"pip did not resolve .[{extra}] within {timeout:.0f} s"
        if proc.returncode != 0:
            if any(s in proc.stderr for s in NETWORK_ERRORS):
                last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:]
                return "skip", f"package index not reachable ({' '.join(last)[:200]})"
            raise ExtrasError(f"pip cannot resolve .[{extra}]:\n{proc.stderr[-2000:]}")
        with open(out, encoding="utf-8") as f:
            return "ok", json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extras", nargs="+", default=sorted(ACCELERATOR_PACKAGE), choices=sorted(ACCELERATOR_PACKAGE))
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per extra before skipping")
    args = p.parse_args(argv)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    try:
        jax_version = base_jax_pin(pyproject)
        for extra in args.extras:
            if extra_jax_pin(pyproject, extra) != jax_version:
                raise ExtrasError(f"extra {extra!r} pins jax {extra_jax_pin(pyproject, extra)}, "
                                  f"the base pins {jax_version}")
            start = time.perf_counter()
            status, report = resolve(extra, args.timeout)
            took = time.perf_counter() - start
            if status == "skip":
                print(f"check_extras: .[{extra}] SKIPPED: {report}")
                continue
            versions = check_report(report, extra, jax_version)
            print(f"check_extras: .[{extra}] resolves ({took:.0f} s): {versions}")
    except ExtrasError as e:
        print(f"check_extras: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
