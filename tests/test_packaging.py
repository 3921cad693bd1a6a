"""pyproject.toml's pins and extras, and the CI check that the accelerator extras resolve."""
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_extras():
    spec = importlib.util.spec_from_file_location("check_extras", ROOT / ".ci" / "check_extras.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_accelerator_extras_pin_the_base_jax(check_extras, pyproject):
    import jax

    base = check_extras.base_jax_pin(pyproject)
    assert base == jax.__version__  # the venv the tests run in follows the pin
    for extra in ("cuda12", "tpu"):
        assert check_extras.extra_jax_pin(pyproject, extra) == base


def test_plot_extra_and_test_extra_have_matplotlib(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    for name in ("plot", "test"):
        assert any(re.match(r"matplotlib\b", d) for d in extras[name]), name


def _report(**versions):
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in versions.items()]}


def test_check_report_accepts_a_matching_resolution(check_extras):
    got = check_extras.check_report(_report(jax="0.10.2", jax_cuda12_plugin="0.10.2", jaxlib="0.10.2"),
                                    "cuda12", "0.10.2")
    assert got["jax-cuda12-plugin"] == "0.10.2"


@pytest.mark.parametrize("versions, extra, message", [
    ({"jax": "0.10.1", "libtpu": "0.0.42"}, "tpu", "resolves jax '0.10.1'"),
    ({"jax": "0.10.2", "jaxlib": "0.10.2"}, "tpu", "does not bring in libtpu"),
    ({"jax": "0.10.2", "jax-cuda12-plugin": "0.10.1"}, "cuda12", "resolves jax-cuda12-plugin 0.10.1"),
])
def test_check_report_names_the_mismatch(check_extras, versions, extra, message):
    with pytest.raises(check_extras.ExtrasError, match=re.escape(message)):
        check_extras.check_report(_report(**versions), extra, "0.10.2")


def test_unpinned_base_jax_is_refused(check_extras):
    with pytest.raises(check_extras.ExtrasError, match="do not pin jax exactly"):
        check_extras.base_jax_pin({"project": {"dependencies": ["jax>=0.10,<0.11", "flax"]}})


def test_unreachable_index_skips_with_a_reason(check_extras, monkeypatch):
    import subprocess

    class Proc:
        returncode = 1
        stderr = "ERROR: ... NewConnectionError('Failed to establish a new connection')\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Proc())
    status, reason = check_extras.resolve("tpu", timeout=5)
    assert status == "skip" and "not reachable" in reason


def test_resolution_failure_is_an_error(check_extras, monkeypatch):
    import subprocess

    class Proc:
        returncode = 1
        stderr = "ERROR: Could not find a version that satisfies the requirement jax-cuda12-plugin==9.9\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(check_extras.ExtrasError, match="cannot resolve"):
        check_extras.resolve("cuda12", timeout=5)
