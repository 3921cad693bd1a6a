"""XLA CPU flag defaults for hetclip (see ``configure_cpu_flags``), the CPU facts that hardware-dependent
choices read (``cpu_flags``, ``cpu_description``) and the choice they feed (``fast_bf16_matmul``)."""
from __future__ import annotations

import functools
import os
import platform
import sys

# flag -> value added by ``configure_cpu_flags``: a flag belongs here only with a measured gain over XLA's
# defaults (none has one; docs/PERFORMANCE.md lists the flags measured). Users' own XLA_FLAGS always win.
CPU_FLAGS: dict[str, str] = {}

# /proc/cpuinfo flags of CPUs with native bf16 dot products (bf16 x bf16 -> fp32 in hardware).
BF16_DOT_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


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


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """Fields of the first processor in ``/proc/cpuinfo`` (empty where that file does not exist)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> frozenset:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` does not exist)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_description() -> str:
    """``"<model name> (<arch>), <widest matmul ISA>, <n> cores"`` for benchmark and result headers."""
    model = _cpuinfo().get("model name") or platform.processor() or "unknown CPU"
    flags = cpu_flags()
    isa = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
           else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{model} ({platform.machine()}), {isa}, {os.cpu_count()} cores"


def fast_bf16_matmul() -> bool:
    """Whether bf16 matmuls with fp32 accumulation beat fp32 on JAX's default backend: always on
    GPU/TPU; on CPU only with native bf16 dot products, AMX (``amx_bf16``) or AVX-512 BF16
    (``avx512_bf16``). Measured in this project (bench/throughput.py, tiny training step): 3x faster
    than fp32 with AMX, 2.1x on an AVX-512 BF16 EPYC (Zen 5); on an AVX2-only CPU (no native bf16) a
    bf16 training step is about 10 % slower than fp32."""
    import jax  # here: setting the flags above must not need JAX

    if jax.default_backend() != "cpu":
        return True
    return bool(BF16_DOT_FLAGS & cpu_flags())
