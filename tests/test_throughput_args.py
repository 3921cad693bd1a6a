"""bench/throughput.py's argument checks: bad values stop the run before any worker starts."""
import pytest


@pytest.mark.parametrize("argv, message", [
    (["--block-warmup", "-1"], "--block-warmup: must be >= 0, got -1"),
    (["--dtypes", "float16"], "--dtypes: unknown dtype 'float16'"),
])
def test_bad_arguments_are_named_and_nothing_is_written(bench_script, tmp_path, capsys, argv, message):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exc:
        bench_script("throughput").main(argv + ["--openclip-python", "", "--out", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
