"""XLA CPU flag defaults for hetclip (see ``configure_cpu_flags``)."""
from __future__ import annotations

import os
import sys

# flag -> value; chosen by bench/throughput.py measurements (see bench/results/throughput.md).
CPU_FLAGS: dict[str, str] = {}


def configure_cpu_flags(flags: dict[str, str] | None = None) -> list[str]:
    """Add hetclip's XLA CPU flags to ``XLA_FLAGS`` (returns the ones added).

    A flag the user already set in ``XLA_FLAGS`` is left alone. Only effective before JAX
    initialises its backends; afterwards nothing is changed and an empty list is returned."""
    if _backend_initialised():
        return []
    flags = CPU_FLAGS if flags is None else flags
    current = os.environ.get("XLA_FLAGS", "")
    present = {tok.lstrip("-").split("=", 1)[0] for tok in current.split()}
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
    return added


def _backend_initialised() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(xb is not None and getattr(xb, "_backends", None))
