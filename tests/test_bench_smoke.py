"""The benchmark scripts still run against the library: each once through its command line with tiny
settings, checking what it wrote (never its speed)."""
import json

import pytest

from hetclip.config import load_config
from hetclip.model import ModelConfig

ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_attention_measures_the_demo_recipes_towers(run_bench, tmp_path):
    _ok(run_bench("bench_attention", "--models", "demo", "--dtypes", "float32", "--rounds", 1, "--repeats", 1,
                  "--out", tmp_path / "att", env=ONE_DEVICE))
    rows = json.loads((tmp_path / "att.json").read_text())["rows"]
    recipe = load_config("demo")
    m = ModelConfig.from_dict(recipe.model.to_dict())
    tokens = (m.vision.image_size // m.vision.patch_size) ** 2 + 1
    assert [(r["case"], r["batch"], r["tokens"], r["width"], r["heads"], r["causal"]) for r in rows] == [
        ("demo image", recipe.batch_size, tokens, m.vision.width, m.vision.heads, False),
        ("demo text", recipe.batch_size, m.text.context_length, m.text.width, m.text.heads, True)]
    assert all(r["ratio"] > 0 for r in rows)
    assert "| demo image | float32 |" in (tmp_path / "att.md").read_text()


def test_attention_rejects_an_unknown_model(run_bench, tmp_path):
    proc = run_bench("bench_attention", "--models", "B/23", "--out", tmp_path / "att", timeout=120)
    assert proc.returncode == 2 and "unknown model preset 'B/23'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_losses_one_tiny_case(run_bench, tmp_path):
    _ok(run_bench("bench_losses", "--sizes", 16, "--samples", 2, "--impls", "chunked", "--repeats", 1,
                  "--class-chunk", 8, "--dim", 8, "--rank", 2, "--out", tmp_path, env=ONE_DEVICE))
    rep = json.loads((tmp_path / "bench_losses.json").read_text())
    assert [(r["loss"], r["N"], r["S"], r["status"]) for r in rep["records"]] == [("det", 16, 1, "ok"),
                                                                                   ("hetxl", 16, 2, "ok")]
    assert rep["meta"]["cpu"] and rep["meta"]["loadavg"]
    assert "| hetxl | chunked | 16 | 2 |" in (tmp_path / "bench_losses.md").read_text()


@pytest.mark.slow
def test_zero_shot_tiny_preset(run_bench, tmp_path):
    _ok(run_bench("bench_zero_shot", "--model", "tiny", "--image-size", 64, "--images", 8, "--classes", 4,
                  "--templates", 2, "--batch-size", 4, "--text-batch-size", 8, "--out-dir", tmp_path, env=ONE_DEVICE))
    res = json.loads((tmp_path / "zero_shot.json").read_text())
    assert res["text_prompts"] == 8 and res["images"] == 8 and res["images_per_second"] > 0
    assert 0.0 <= res["top1_random_model"] <= 1.0 and res["cpu"]
    assert "| tiny | 64 | 4 | 8 | 0 |" in (tmp_path / "zero_shot.md").read_text()


@pytest.mark.slow
def test_data_loader_on_demo_shards(run_bench, tmp_path):
    _ok(run_bench("bench_data", "--before", "", "--cases", "demo", "--images", 16, "--batches", 2,
                  "--batch-size", 4, "--workers", 1, "--rounds", 1, "--tag", "t", "--out", tmp_path))
    rep = json.loads((tmp_path / "data_t.json").read_text())
    (row,) = rep["rows"]
    assert (row["case"], row["version"], row["workers"], row["image_dtype"]) == ("demo", "after", 1, "uint8")
    assert row["images_per_cpu_s"] > 0 and row["main_ms_per_image"] >= 0
    assert rep["decoders"][0]["case"] == "demo"


@pytest.mark.slow
def test_eval_loader_on_a_small_folder(run_bench, tmp_path):
    _ok(run_bench("bench_eval_data", "--before", "", "--images", 12, "--batch-size", 4, "--size", 32, "--workers",
                  "0,1", "--rounds", 1, "--tag", "t", "--out", tmp_path))
    rep = json.loads((tmp_path / "eval_data_t.json").read_text())
    assert [(r["version"], r["workers"], r["images"], r["image_dtype"]) for r in rep["rows"]] == [
        ("after", 0, 12, "uint8"), ("after", 1, 12, "uint8")]
    assert rep["rows"][1]["worker_ms_per_image"] > 0 and "| after | 1 |" in (tmp_path / "eval_data_t.md").read_text()


def test_feed_refuses_too_few_logging_windows(run_bench, tmp_path):
    proc = run_bench("bench_feed", "--steps", 4, "--log-every", 2, "--out", tmp_path, timeout=120)
    assert proc.returncode == 2 and "--steps 4: needs at least 3 logging windows" in proc.stderr
    assert list(tmp_path.iterdir()) == []
