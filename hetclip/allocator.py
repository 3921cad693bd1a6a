"""A faster memory allocator for hetclip's command-line tools.

XLA:CPU allocates and frees its large temporary buffers on every step. With glibc's allocator those
buffers are mmap'ed and unmapped each time, so every step re-faults its working set page by page:
on the 2-core AVX2 machine a demo training step takes 1.79 s with glibc and 1.20 s with mimalloc
(no purging, transparent huge pages), and 10 steps page-fault 2.6 M times with glibc, 31 k times with
mimalloc (docs/PERFORMANCE.md). An allocator cannot be swapped inside a running process, so the console
scripts re-execute themselves once with mimalloc (from the ``cmeel-mimalloc`` wheel) preloaded.

``HETCLIP_ALLOCATOR=system`` turns this off; the library itself (``import hetclip``) never does it.
Child processes (data-loader workers, ``pipe:`` shard commands) inherit the preload through ``LD_PRELOAD``.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
from typing import Optional

ENV_SWITCH = "HETCLIP_ALLOCATOR"  # "mimalloc" (default) or "system"
_MARK = "_HETCLIP_ALLOCATOR_SET"  # set in the re-executed process: never re-execute twice
MIMALLOC_DEFAULTS = {
    "MIMALLOC_PURGE_DELAY": "-1",           # keep freed pages: the next step reuses them without faults
    "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1",   # transparent huge pages: 512x fewer faults when it does fault
}


@functools.lru_cache(maxsize=1)
def mimalloc_path() -> Optional[str]:
    """Path of the mimalloc shared library shipped by the ``cmeel-mimalloc`` wheel, or None."""
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    libs = sorted(str(f.locate()) for f in files if f.name.startswith("libmimalloc.so"))
    libs = [p for p in libs if os.path.isfile(p)]
    return min(libs, key=len) if libs else None


def loaded_allocator() -> str:
    """``"mimalloc"`` if this process has mimalloc mapped, else ``"system"`` (Linux; elsewhere "system")."""
    try:
        with open("/proc/self/maps") as f:
            return "mimalloc" if "libmimalloc" in f.read() else "system"
    except OSError:
        return "system"


def reexec_with_mimalloc() -> None:
    """Re-execute this process with mimalloc preloaded, unless turned off, unavailable or already done.

    Returns only when nothing is done. Call it first thing in a console script's entry point."""
    choice = os.environ.get(ENV_SWITCH, "mimalloc").strip().lower() or "mimalloc"
    if choice not in ("mimalloc", "system"):
        raise SystemExit(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not supported; use 'mimalloc' (default) or 'system'")
    if choice == "system" or os.environ.get(_MARK):
        return
    if not sys.platform.startswith("linux") or not getattr(sys, "orig_argv", None):
        return
    lib = mimalloc_path()
    if lib is None or lib in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    for key, value in MIMALLOC_DEFAULTS.items():
        env.setdefault(key, value)
    env[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
