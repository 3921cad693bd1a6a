"""Test-wide setup: 8 simulated CPU devices (set before JAX is imported) so sharding is testable."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_bench():
    """``run_bench("evidence", "--from-json", ...)`` runs ``bench/evidence.py`` as a user does (bench/ holds
    scripts, not a package) from the repository root; returns the ``CompletedProcess`` (text output).
    ``env`` entries are added to this process's environment."""
    def run(name, *args, env=None, timeout=600):
        return subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})

    return run


@pytest.fixture
def without_matplotlib(tmp_path):
    """Environment entries under which ``import matplotlib`` fails in a subprocess (as without the
    ``plot`` extra)."""
    blocker = tmp_path / "no_matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("matplotlib is blocked by the test")\n')
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))}
