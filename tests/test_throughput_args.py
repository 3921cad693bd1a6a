"""bench/throughput.py's argument checks: bad values stop the run before any worker starts."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _throughput():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, message", [
    (["--block-warmup", "-1"], "--block-warmup: must be >= 0, got -1"),
    (["--dtypes", "float16"], "--dtypes: unknown dtype 'float16'"),
])
def test_bad_arguments_are_named_and_nothing_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exc:
        _throughput().main(argv + ["--openclip-python", "", "--out", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
