"""bench/evidence_supervised.py through its command line: the report written from saved JSON (paired
intervals against hand computations, split-level checks, training length as the regime axis), argument
checks, and a 2-step run of every arm whose label-noise audit shows what the generator did."""
import json
import math

import pytest


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


def _render(run_bench, tmp_path, rep, *extra, env=None, placed=True):
    """Write ``rep`` as the saved JSON and render it with ``--from-json``; ``placed`` records the reference
    model's confidences (otherwise the script derives them from the recorded arguments)."""
    if placed:
        rep["data"].update(ref_conf_hard=0.6, ref_conf_easy=0.9)
    src, out = tmp_path / "r.json", tmp_path / "R.md"
    src.write_text(json.dumps(rep))
    proc = run_bench("evidence_supervised", "--from-json", "--json", src, "--out", out, *extra, env=env)
    return proc, (out.read_text() if out.exists() else "")


def test_report_from_json(run_bench, tmp_path):
    proc, text = _render(run_bench, tmp_path, _report(), "--figure", "", placed=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert text.startswith("# My table\n")
    assert "`python bench/evidence_supervised.py X`" in text and "test box" in text and "hand text" in text
    assert "| HET-XL | 300 | 130 |" in text
    assert "## 5 steps, flip probability p = 0.4 (3 training labels flipped on average)" in text
    assert "| DET | 0.800 ± 0.020 | 1.000 ± 0.100 |" in text
    # top1 differences 0.05, 0.04, 0.06: mean 0.05, sd 0.01, half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert "| HET-XL | top1 | +0.0500 | [+0.0252, +0.0748] | **better** (interval excludes 0) |" in text
    # nll differences -0.2 each: zero spread, an interval of one point below zero -> better (lower)
    assert "| HET-XL | nll | -0.2000 | [-0.2000, -0.2000] | **better** (interval excludes 0) |" in text
    # derived from the recorded arguments: how sure the clean reference model is on hard vs other images
    assert "A clean reference model (logistic regression, out-of-fold) gives the true label" in text


def test_paired_interval_of_five_seeds_matches_a_hand_computation(run_bench, tmp_path):
    rep = _report()
    a = [0.80, 0.82, 0.78, 0.81, 0.79]
    b = [0.83, 0.82, 0.80, 0.85, 0.80]
    d = [0.03, 0.00, 0.02, 0.04, 0.01]
    mean = sum(d) / 5                                              # 0.02
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)           # 0.0158114
    half = 2.7764451051977987 * sd / math.sqrt(5)                 # t_{0.975, 4} from tables
    rep["args"]["seeds"] = 5
    rep["results"] = {"0.4": {"DET": [_res(v, 1.0) for v in a], "HET-XL": [_res(v, 1.0) for v in b]}}
    proc, text = _render(run_bench, tmp_path, rep, "--figure", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"| HET-XL | top1 | {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] | **better**" in text
    # the same differences, judged for a metric where lower is better
    assert f"| HET-XL | nll | +0.0000 | [+0.0000, +0.0000] | no difference shown (interval contains 0) |" in text


def test_one_seed_gives_no_interval_and_unpaired_runs_are_refused(run_bench, tmp_path):
    rep = _report()
    rep["args"]["seeds"] = 1
    rep["results"] = {"0.4": {"DET": [_res(0.8, 1.0)], "HET-XL": [_res(0.9, 1.0)]}}
    proc, text = _render(run_bench, tmp_path, rep, "--figure", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| HET-XL | top1 | +0.1000 | [+nan, +nan] | one seed: no interval |" in text
    rep = _report()
    rep["results"]["0.4"]["HET-XL"].pop()
    proc, _ = _render(run_bench, tmp_path, rep, "--figure", "")
    assert proc.returncode != 0 and "equal-length" in proc.stderr


def test_split_means_group_pairs_split_major(run_bench, tmp_path):
    rep = _report()
    rep["args"]["seeds"] = 2
    rep["data"]["splits"] = [0, 1]
    det = [_res(v, 1.0) for v in (0.80, 0.82, 0.70, 0.74)]
    het = [_res(v, 1.0) for v in (0.81, 0.85, 0.70, 0.78)]
    rep["results"] = {"0.4": {"DET": det, "HET-XL": het}}
    proc, text = _render(run_bench, tmp_path, rep, "--figure", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # split 0: differences +0.01, +0.03 -> +0.02; split 1: 0.00, +0.04 -> +0.02
    assert "- HET-XL: +0.0200, +0.0200; interval [+0.0200, +0.0200], **better**" in text
    assert "2 train/test splits (seeds 0, 1) × 2 seeds = 4 pairs per arm" in text
    rep["data"]["splits"] = [0, 1, 2]
    proc, _ = _render(run_bench, tmp_path, rep, "--figure", "")
    assert proc.returncode != 0 and "do not split into 3 splits" in proc.stderr


def test_plot_without_matplotlib_names_the_extra(run_bench, tmp_path, without_matplotlib):
    proc, text = _render(run_bench, tmp_path, _report(), "--figure", tmp_path / "f.png", env=without_matplotlib)
    assert proc.returncode != 0 and 'pip install -e ".[plot]"' in proc.stderr
    assert not text and not (tmp_path / "f.png").exists()


def test_training_length_as_a_regime_axis(run_bench, tmp_path):
    pytest.importorskip("matplotlib")  # the optional `plot` extra
    rep = _report()
    runs = rep["results"].pop("0.4")
    rep["results"] = {"100 steps, p=0.4": runs, "400 steps, p=0.4": runs}
    rep["regimes"] = {"100 steps, p=0.4": {"steps": 100, "p": 0.4}, "400 steps, p=0.4": {"steps": 400, "p": 0.4}}
    rep["config"]["steps"] = [100, 400]
    proc, text = _render(run_bench, tmp_path, rep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## 100 steps, flip probability p = 0.4" in text and "## 400 steps, flip probability p = 0.4" in text
    assert "batch 8, 100, 400 steps" in text and "![clean-test metrics against label noise](R.png)" in text
    assert (tmp_path / "R.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_two_steps_every_arm(run_bench, tmp_path):
    out, js, png = tmp_path / "R.md", tmp_path / "r.json", tmp_path / "f.png"
    # 2 splits x 1 seed: (split, seed) is the pairing unit, so every interval has 2 pairs
    data_args = ["--split-seed", "0,1", "--flip-probs", "0,0.4", "--steps", "2", "--batch-size", "16"]
    small = ["--widths", "8", "--num-factors", "2", "--train-samples", "2", "--eval-samples", "3"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = run_bench("evidence_supervised", "--seeds", 1, *data_args, *small, "--arms", "DET,HET,HET-XL,DET-T",
                     "--out", out, "--json", js, "--figure", "", env=env)
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
    # the label-noise audit: flips only among the hard images and only to the partner class, at the asked
    # rate; the hard images are the asked fraction of every class
    hard = rep["data"]["hard_per_class"]
    assert hard == [round(0.5 * n) for n in rep["data"]["train_per_class"]] and sum(hard) == rep["data"]["hard_train"]
    for p, audits in rep["data"]["label_noise"].items():
        assert len(audits) == 2
        for a in audits:
            assert a["outside_hard"] == 0 and a["not_to_partner"] == 0 and a["changed"] == a["flipped"]
            n = rep["data"]["hard_train"]
            assert abs(a["hard_flip_rate"] - float(p)) <= 4 * math.sqrt(float(p) * (1 - float(p)) / n) + 1e-12
    # the draw depends on (split, seed) alone: another run with other arms and two seeds repeats seed 0's
    # labels and draws other ones for seed 1
    js2 = tmp_path / "r2.json"
    proc = run_bench("evidence_supervised", "--seeds", 2, *data_args, *small, "--arms", "DET",
                     "--out", tmp_path / "R2.md", "--json", js2, "--figure", "", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(js2.read_text())["data"]["label_noise"]["0.4"]  # split-major: (0, 0), (0, 1), (1, 0), (1, 1)
    first = rep["data"]["label_noise"]["0.4"]
    assert [again[0], again[2]] == first
    assert again[1]["labels_sha1"] != again[0]["labels_sha1"]
    text = out.read_text()
    assert "| HET-XL | top1 |" in text and "2 train/test splits (seeds 0, 1) × 1 seeds = 2 pairs per arm" in text
    # the figure is re-rendered from the saved JSON (matplotlib is the optional `plot` extra)
    pytest.importorskip("matplotlib")
    proc = run_bench("evidence_supervised", "--from-json", "--json", js, "--out", out, "--figure", png, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![clean-test metrics" in out.read_text()


def test_cli_rejects_bad_arguments_before_running(run_bench, tmp_path):
    proc = run_bench("evidence_supervised", "--arms", "DET,HETX", "--out", tmp_path / "R.md",
                     "--json", tmp_path / "r.json", "--figure", "", timeout=300)
    assert proc.returncode != 0 and "HETX" in proc.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "R.md").exists()
    for bad, name in ((["--flip-probs", "0.2,1.5"], "--flip-probs"), (["--hard-fraction", "0"], "--hard-fraction")):
        proc = run_bench("evidence_supervised", *bad, "--out", tmp_path / "R.md", "--json", tmp_path / "r.json",
                         "--figure", "", timeout=300)
        assert proc.returncode != 0 and name in proc.stderr and not (tmp_path / "r.json").exists()
