"""bench/evidence_supervised.py: the input-dependent label-noise generator, the paired interval, the
report writer, and a 2-step run of every arm through the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "evidence_supervised.py"


@pytest.fixture(scope="module")
def es(bench_script):
    return bench_script("evidence_supervised")


def _toy(n_per_class=40, k=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    score = rng.normal(size=labels.shape)
    partner = np.array([(c + 1) % k for c in range(k)], np.int32)
    return labels, score, partner


def test_hard_mask_takes_the_most_partner_like_fraction_of_each_class(es):
    labels, score, _ = _toy()
    hard = es.hard_mask(labels, score, 0.25)
    for c in range(4):
        idx = np.flatnonzero(labels == c)
        assert hard[idx].sum() == 10
        # every hard image of the class scores at least as high as every easy one
        assert score[idx][hard[idx]].min() >= score[idx][~hard[idx]].max()
    with pytest.raises(ValueError, match="hard_fraction=1.5"):
        es.hard_mask(labels, score, 1.5)


def test_noise_is_input_dependent_and_deterministic_per_seed(es):
    labels, score, partner = _toy(n_per_class=2000)
    hard = es.hard_mask(labels, score, 0.5)
    y1, flip1 = es.noisy_labels(labels, hard, partner, 0.4, seed=3)
    y2, flip2 = es.noisy_labels(labels, hard, partner, 0.4, seed=3)
    y3, _ = es.noisy_labels(labels, hard, partner, 0.4, seed=4)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(flip1, flip2)
    assert (y1 != y3).any()
    assert not flip1[~hard].any() and (y1[~hard] == labels[~hard]).all()  # easy inputs stay clean
    np.testing.assert_array_equal(y1[flip1], partner[labels[flip1]])  # flips go to the partner class
    assert (y1 == labels).sum() + flip1.sum() == labels.size
    rate = flip1[hard].mean()
    assert abs(rate - 0.4) < 4 * math.sqrt(0.4 * 0.6 / hard.sum())
    # the generator's distribution q(y~|x): rows sum to one, mass 1-p / p on the label / partner when hard
    q = es.label_distribution(labels, hard, partner, 0.4, 4)
    np.testing.assert_allclose(q.sum(1), 1.0)
    rows = np.arange(labels.size)
    np.testing.assert_allclose(q[rows, labels], np.where(hard, 0.6, 1.0))
    np.testing.assert_allclose(q[rows, partner[labels]], np.where(hard, 0.4, 0.0))
    with pytest.raises(ValueError, match="flip_prob=-0.1"):
        es.noisy_labels(labels, hard, partner, -0.1, seed=0)


def test_partner_score_and_batch_order(es):
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    s = es.partner_score(probs, np.array([0, 2]), np.array([1, 2, 1]))
    np.testing.assert_allclose(s, [math.log(0.2 / 0.7), math.log(0.3 / 0.6)], rtol=1e-9)
    order = es.batch_order(10, 4, 6, seed=1)
    assert order.shape == (6, 4)
    flat = order.ravel()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # whole epochs
    np.testing.assert_array_equal(order, es.batch_order(10, 4, 6, seed=1))


def test_paired_interval_matches_a_hand_computation(es):
    a = [0.80, 0.82, 0.78, 0.81, 0.79]
    b = [0.83, 0.82, 0.80, 0.85, 0.80]
    d = [0.03, 0.00, 0.02, 0.04, 0.01]
    mean = sum(d) / 5                                              # 0.02
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)           # 0.0158114
    half = 2.7764451051977987 * sd / math.sqrt(5)                 # t_{0.975, 4} from tables
    iv = es.paired_interval(a, b)
    assert iv["n"] == 5
    assert iv["mean"] == pytest.approx(mean) and iv["std"] == pytest.approx(sd)
    assert iv["lo"] == pytest.approx(mean - half) and iv["hi"] == pytest.approx(mean + half)
    assert es.verdict(iv, higher_is_better=True).startswith("**better**")
    assert es.verdict(iv, higher_is_better=False).startswith("**worse**")
    assert es.verdict(es.paired_interval(a, a[::-1]), True).startswith("no difference")
    one = es.paired_interval([1.0], [2.0])
    assert one["mean"] == 1.0 and math.isnan(one["lo"]) and es.verdict(one, True) == "one seed: no interval"
    with pytest.raises(ValueError, match="equal-length"):
        es.paired_interval([1, 2], [1, 2, 3])


def _res(top1, nll):
    return {"top1": top1, "nll": nll, "ece": 0.05, "nll_noisy": nll + 0.2, "det_top1": top1, "det_nll": nll,
            "det_ece": 0.05, "flipped_fit": 0.5, "margin": 3.0, "seconds": 1.0}


def _report():
    return {
        "args": {"arms": ["DET", "HET-XL"], "primary": "top1", "seeds": 3, "hard_fraction": 0.5,
                 "json": "x.json", "title": "My table"},
        "config": {"widths": [16], "lr": 0.001, "batch_size": 8, "steps": 5, "weight_decay": 0.0, "num_factors": 2,
                   "param_efficient": True, "train_samples": 2, "eval_samples": 2, "init_scale": 0.1,
                   "tau_init": 1.0, "learn_tau": True},
        "command": "python bench/evidence_supervised.py X", "machine": "test box", "load_start": "1.0 1.0 1.0",
        "load_end": "2.0 2.0 2.0", "wall_seconds": 90.0, "interpretation": "hand text",
        "data": {"train": 10, "test": 5, "classes": 10, "partner": list(range(10)), "hard_train": 5,
                 "flipped_train": {"0.4": [2, 3, 4]}},
        "params": {"DET": {"head": 170, "extra": 0}, "HET-XL": {"head": 300, "extra": 130}},
        "results": {"0.4": {"DET": [_res(0.80, 1.0), _res(0.82, 1.1), _res(0.78, 0.9)],
                            "HET-XL": [_res(0.85, 0.8), _res(0.86, 0.9), _res(0.84, 0.7)]}},
    }


def test_report_from_json(es, tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_report()))
    out = tmp_path / "R.md"
    es.main(["--from-json", "--json", str(src), "--out", str(out), "--figure", ""])
    text = out.read_text()
    assert text.startswith("# My table\n")
    assert "`python bench/evidence_supervised.py X`" in text and "test box" in text and "hand text" in text
    assert "| HET-XL | 300 | 130 |" in text
    assert "## 5 steps, flip probability p = 0.4 (3 training labels flipped on average)" in text
    assert "| DET | 0.800 ± 0.020 | 1.000 ± 0.100 |" in text
    # top1 differences 0.05, 0.04, 0.06: mean 0.05, sd 0.01, half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert "| HET-XL | top1 | +0.0500 | [+0.0252, +0.0748] | **better** (interval excludes 0) |" in text
    # nll differences -0.2 each: zero spread, an interval of one point below zero -> better (lower)
    assert "| HET-XL | nll | -0.2000 | [-0.2000, -0.2000] | **better** (interval excludes 0) |" in text


def test_plot_without_matplotlib_names_the_extra(es, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[plot\]"'):
        es.plot(_report(), str(tmp_path / "f.png"))


@pytest.mark.slow
def test_cli_two_steps_every_arm(tmp_path):
    out, js, png = tmp_path / "R.md", tmp_path / "r.json", tmp_path / "f.png"
    # 2 splits x 1 seed: (split, seed) is the pairing unit, so every interval has 2 pairs
    cmd = [sys.executable, str(SCRIPT), "--seeds", "1", "--split-seed", "0,1", "--steps", "2", "--flip-probs", "0,0.4",
           "--arms", "DET,HET,HET-XL,DET-T", "--widths", "8", "--num-factors", "2", "--train-samples", "2",
           "--eval-samples", "3", "--batch-size", "16", "--out", str(out), "--json", str(js), "--figure", ""]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(js.read_text())
    assert set(rep["results"]) == {"0", "0.4"}
    for p in ("0", "0.4"):
        for arm in ("DET", "HET", "HET-XL", "DET-T"):
            runs = rep["results"][p][arm]
            assert len(runs) == 2
            for r in runs:
                assert 0.0 <= r["top1"] <= 1.0 and math.isfinite(r["nll"]) and math.isfinite(r["nll_noisy"])
    # paired: every arm of a seed saw the same labels, so p=0 has nothing flipped and p=0.4 does
    assert rep["data"]["flipped_train"]["0"] == [0, 0] and min(rep["data"]["flipped_train"]["0.4"]) > 0
    assert rep["params"]["DET"]["extra"] == 0 and rep["params"]["DET-T"]["extra"] == 1
    assert rep["params"]["HET"]["extra"] > 0 and rep["params"]["HET-XL"]["extra"] > 0
    for arm in ("HET", "HET-XL"):
        assert rep["results"]["0.4"][arm][0]["noise_std"] > 0 and rep["results"]["0.4"][arm][0]["tau"] > 0
    assert "noise_std" not in rep["results"]["0.4"]["DET-T"][0] and "tau" in rep["results"]["0.4"]["DET-T"][0]
    assert rep["data"]["splits"] == [0, 1] and set(rep["data"]["partner_by_split"]) == {"0", "1"}
    text = out.read_text()
    assert "| HET-XL | top1 |" in text and "2 train/test splits (seeds 0, 1) × 1 seeds = 2 pairs per arm" in text
    # the figure is re-rendered from the saved JSON (matplotlib is the optional `plot` extra)
    pytest.importorskip("matplotlib")
    es_main = [sys.executable, str(SCRIPT), "--from-json", "--json", str(js), "--out", str(out), "--figure", str(png)]
    proc = subprocess.run(es_main, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![clean-test metrics" in out.read_text()


def test_cli_rejects_bad_arguments_before_running(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arms", "DET,HETX", "--out", str(tmp_path / "R.md"),
                           "--json", str(tmp_path / "r.json"), "--figure", ""], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "HETX" in proc.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "R.md").exists()
    for bad, name in ((["--flip-probs", "0.2,1.5"], "--flip-probs"), (["--hard-fraction", "0"], "--hard-fraction")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *bad, "--out", str(tmp_path / "R.md"),
                               "--json", str(tmp_path / "r.json"), "--figure", ""], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0 and name in proc.stderr and not (tmp_path / "r.json").exists()


def test_training_length_as_a_regime_axis(es, tmp_path):
    rep = _report()
    runs = rep["results"].pop("0.4")
    rep["results"] = {"100 steps, p=0.4": runs, "400 steps, p=0.4": runs}
    rep["regimes"] = {"100 steps, p=0.4": {"steps": 100, "p": 0.4}, "400 steps, p=0.4": {"steps": 400, "p": 0.4}}
    rep["config"]["steps"] = [100, 400]
    src, out = tmp_path / "r.json", tmp_path / "R.md"
    src.write_text(json.dumps(rep))
    pytest.importorskip("matplotlib")  # the optional `plot` extra
    es.main(["--from-json", "--json", str(src), "--out", str(out)])
    text = out.read_text()
    assert "## 100 steps, flip probability p = 0.4" in text and "## 400 steps, flip probability p = 0.4" in text
    assert "batch 8, 100, 400 steps" in text and "![clean-test metrics against label noise](R.png)" in text
    assert (tmp_path / "R.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_means_group_pairs_split_major(es):
    det = [{"top1": v} for v in (0.80, 0.82, 0.70, 0.74)]
    het = [{"top1": v} for v in (0.81, 0.85, 0.70, 0.78)]
    # split 0: differences +0.01, +0.03 -> +0.02; split 1: 0.00, +0.04 -> +0.02
    assert es.split_means(det, het, "top1", 2) == pytest.approx([0.02, 0.02])
    with pytest.raises(ValueError, match="do not split into 3 splits"):
        es.split_means(det, het, "top1", 3)
