"""bench/throughput.py through its command line: bad values stop the run before any worker starts, and a
tiny run of the hetclip side measures the library's preset."""
import json

import pytest

from hetclip.model import preset


@pytest.mark.parametrize("argv, message", [
    (["--block-warmup", "-1"], "--block-warmup: must be >= 0, got -1"),
    (["--dtypes", "float16"], "--dtypes: unknown dtype 'float16'"),
    (["--cases", "B/23"], "--cases: unknown model 'B/23'"),
])
def test_bad_arguments_are_named_and_nothing_is_written(run_bench, tmp_path, argv, message):
    out = tmp_path / "report"
    proc = run_bench("throughput", *argv, "--openclip-python", "", "--out", out, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_tiny_run_measures_the_library_preset(run_bench, tmp_path):
    out = tmp_path / "tp"
    proc = run_bench("throughput", "--cases", "tiny", "--modes", "image", "--dtypes", "float32", "--batch", "2",
                     "--rounds", "1", "--block-seconds", "0.01", "--openclip-python", "", "--out", out,
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "tp.json").read_text())
    (group,) = rep["groups"]
    cfg = preset("tiny")
    v, t = cfg.vision, cfg.text
    assert group["arch"] == {"embed": cfg.embed_dim, "vw": v.width, "vl": v.layers, "vh": v.heads, "patch": v.patch_size,
                             "image": v.image_size, "tw": t.width, "tl": t.layers, "th": t.heads,
                             "vocab": t.vocab_size, "ctx": t.context_length, "eos": t.eos_token_id,
                             "act": v.activation, "batch": 64}
    # the parameter count the worker measured is the preset's image+text towers, projections, temperature
    n_patch = (v.image_size // v.patch_size) ** 2
    layer = lambda w: 4 * (w * w + w) + 2 * (4 * w * w) + 4 * w + w + 4 * w  # noqa: E731  attn, mlp, 2 LNs
    vision = v.patch_size ** 2 * 3 * v.width + v.width + (n_patch + 1) * v.width + 4 * v.width \
        + v.layers * layer(v.width) + v.width * cfg.embed_dim
    text = t.vocab_size * t.width + t.context_length * t.width + t.layers * layer(t.width) + 2 * t.width \
        + t.width * cfg.embed_dim
    assert group["params"] == vision + text + 1
    (row,) = group["results"]
    assert row["framework"] == "hetclip" and row["stats"]["n"] >= 1 and row["stats"]["median_s"] > 0
    assert "| tiny | image | float32 | 2 | hetclip |" in (tmp_path / "tp.md").read_text()
