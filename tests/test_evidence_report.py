"""bench/evidence.py through its command line: the report re-rendered from saved JSON, with differences
judged against the seed spread, its figure, and the missing-matplotlib error before any training."""
import json

import pytest


def _res(shape, color, nll=2.0):
    out = {}
    for task, top1 in (("shape", shape), ("color", color), ("shape_color", shape * color)):
        out[task] = {"top1": top1, "nll": nll, "ece": 0.1, "mc_top1": top1, "mc_nll": nll, "mc_ece": 0.1}
    return out


def _from_json(run_bench, tmp_path, results, out, *extra, env=None, **saved):
    src = tmp_path / "ev.json"
    src.write_text(json.dumps({"args": {"seeds": len(next(iter(results.values()))), "steps": 7, "noise": 0.5},
                               "command": "x", **saved, "results": results}))
    return run_bench("evidence", "--from-json", "--json", src, "--out", out, *extra, env=env)


def test_report_from_json(run_bench, tmp_path):
    results = {"DET": [_res(0.50, 0.90), _res(0.52, 0.92)],
               "HET-XL": [_res(0.70, 0.91, 1.5), _res(0.72, 0.90, 1.6)],
               "HET-XL fixed τ=0.1": [_res(0.60, 0.80)]}
    out = tmp_path / "R.md"
    proc = _from_json(run_bench, tmp_path, results, out, "--figure", "", command="python bench/evidence.py X",
                      machine="test box", interpretation="hand text")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "`python bench/evidence.py X`" in text and "Machine: test box" in text and "hand text" in text
    assert "| DET | 0.510 ± 0.014 |" in text
    # shape top1: +0.200, spread 0.014 -> beyond; colour top1 -0.005, spread 0.014 -> within
    assert "top1: HET-XL - DET = +0.200 (better for HET-XL), beyond" in text
    assert "top1: HET-XL - DET = -0.005 (worse for HET-XL), within" in text
    assert "nll: HET-XL - DET = -0.450 (better for HET-XL)" in text
    assert "14.45×" in text  # parameter table at JFT-4B scale


def test_figure_beside_the_report(run_bench, tmp_path):
    pytest.importorskip("matplotlib")  # the optional `plot` extra
    results = {"DET": [_res(0.50, 0.90), _res(0.52, 0.92)], "HET-XL": [_res(0.70, 0.91, 1.5), _res(0.72, 0.90, 1.6)]}
    out = tmp_path / "docs" / "R.md"
    out.parent.mkdir()
    proc = _from_json(run_bench, tmp_path, results, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "docs" / "R.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![zero-shot top-1 and NLL, DET vs HET-XL](R.png)" in out.read_text()


def test_missing_matplotlib_fails_before_training_and_names_the_extra(run_bench, tmp_path, without_matplotlib):
    js = tmp_path / "r.json"
    proc = run_bench("evidence", "--out", tmp_path / "R.md", "--json", js, "--demo-dir", tmp_path / "demo",
                     env=without_matplotlib, timeout=120)
    assert proc.returncode != 0
    assert 'pip install -e ".[plot]"' in proc.stderr
    # nothing was trained or written: no demo data, no results
    assert not js.exists() and not (tmp_path / "R.md").exists() and not (tmp_path / "demo").exists()


def test_reading_flags_an_unlearned_task(run_bench, tmp_path):
    out = tmp_path / "R.md"
    proc = _from_json(run_bench, tmp_path, {"DET": [_res(0.13, 0.9)], "HET-XL": [_res(0.12, 0.9)]}, out,
                      "--figure", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "shape: DET top1 0.130 vs chance 0.125 (at most 1.5x chance" in text
    assert "color: DET top1 0.900 vs chance 0.125\n" in text
    assert "no spread to compare with (one seed)" in text
