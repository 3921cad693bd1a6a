"""The console scripts re-execute once with mimalloc preloaded (hetclip/allocator.py)."""
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hetclip import allocator

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import os; from hetclip import allocator; allocator.reexec_with_mimalloc(); "
         "print(allocator.loaded_allocator(), os.environ.get('MIMALLOC_PURGE_DELAY'), os.getpid())")


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._MARK, allocator.ENV_SWITCH)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_mimalloc_is_installed_where_the_wheel_exists():
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert allocator.mimalloc_path() is not None, "cmeel-mimalloc is a dependency on Linux x86_64"
    else:
        pytest.skip(f"no mimalloc wheel is required on {platform.system()} {platform.machine()}")


def test_reexec_preloads_mimalloc_once_and_can_be_turned_off():
    if allocator.mimalloc_path() is None:
        pytest.skip("mimalloc is not installed on this platform")
    name, purge, _ = _run({})
    assert name == "mimalloc" and purge == "-1"
    name, purge, _ = _run({allocator.ENV_SWITCH: "system"})
    assert name == "system" and purge in ("None",)
    # a user's own mimalloc settings win over the defaults
    name, purge, _ = _run({"MIMALLOC_PURGE_DELAY": "10"})
    assert name == "mimalloc" and purge == "10"


def test_heavy_console_scripts_go_through_the_allocator_entry_points():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("hetclip-train", "hetclip-zero-shot", "hetclip-retrieval", "hetclip-export"):
        assert scripts[name].startswith("hetclip.cli:"), name
    from hetclip import cli
    assert {cli.train.__name__, cli.retrieval.__name__} == {"train_main", "cli_retrieval_main"}


def test_python_dash_m_is_kept_on_reexecution(tmp_path):
    """``python -m hetclip.train`` re-executes as ``python -m hetclip.train`` (not as a script path)."""
    if allocator.mimalloc_path() is None:
        pytest.skip("mimalloc is not installed on this platform")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._MARK, allocator.ENV_SWITCH)}
    out = subprocess.run([sys.executable, "-m", "hetclip.train", "--config", "no_such_recipe"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0 and "no_such_recipe" in out.stderr, out.stderr[-2000:]


def test_unknown_allocator_name_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._MARK)}
    env[allocator.ENV_SWITCH] = "jemalloc"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "HETCLIP_ALLOCATOR='jemalloc' is not supported" in out.stderr
