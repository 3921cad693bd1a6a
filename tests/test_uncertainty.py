"""Per-image uncertainty and selective prediction: known answers for the scores, the AUROC and the
risk–coverage numbers, the per-image file round trip, the HET-XL noise size from the real model, and the
zero-shot command's outputs with and without the head."""
import csv
import itertools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetclip import noise as noise_lib
from hetclip.model import DualEncoder, Encoders, init_params, preset
from hetclip.zero_shot import cli, plots, uncertainty

from test_zero_shot_data import ColourTokenizer, colour_encoders, colour_tree, image_embeddings


def test_per_image_scores_known_answer():
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    out = uncertainty.per_image_scores(np.log(p), [0, 0], prefix="mc_")
    assert out["mc_pred"].tolist() == [0, 2] and out["mc_correct"].tolist() == [True, False]
    np.testing.assert_allclose(out["mc_confidence"], [0.7, 0.5])
    np.testing.assert_allclose(out["mc_entropy"], -(p * np.log(p)).sum(1))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        uncertainty.per_image_scores(np.log(p), [0])


def _auroc_by_pairs(correct, score):
    pos = [s for c, s in zip(correct, score) if c]
    neg = [s for c, s in zip(correct, score) if not c]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        correct = rng.random(n) < 0.6
        score = rng.integers(0, 5, n).astype(float)  # many ties
        if correct.all() or not correct.any():
            assert uncertainty.auroc(correct, score) is None
            continue
        assert uncertainty.auroc(correct, score) == pytest.approx(_auroc_by_pairs(correct, score))
    assert uncertainty.auroc([True, False], [1.0, 0.0]) == 1.0
    assert uncertainty.auroc([True, False], [0.0, 1.0]) == 0.0
    assert uncertainty.auroc([True, True], [0.0, 1.0]) is None


def test_selective_prediction_known_answer():
    rep = uncertainty.selective_prediction([True, False, True, True], [0.9, 0.8, 0.7, 0.1], points=4)
    # kept most certain first: T F T T -> accuracy 1, 1/2, 2/3, 3/4; the ideal order: 1, 1, 1, 3/4
    assert rep["aurc"] == pytest.approx(np.mean([0, 1 / 2, 1 / 3, 1 / 4]))
    assert rep["aurc_optimal"] == pytest.approx(0.25 / 4)
    assert rep["accuracy_at"] == {"0.5": 0.5, "0.8": pytest.approx(3 / 4), "0.9": pytest.approx(3 / 4), "1": 0.75}
    assert rep["curve"]["accuracy"] == pytest.approx([1.0, 0.5, 2 / 3, 0.75])
    assert rep["auroc"] == pytest.approx(1 / 3)   # only 0.9 of the right ones beats the wrong 0.8
    with pytest.raises(ValueError, match="non-finite"):
        uncertainty.selective_prediction([True, False], [0.5, np.nan])
    with pytest.raises(ValueError, match="one score per image"):
        uncertainty.selective_prediction([True, False], [0.5])


def test_selective_report_uses_each_score_with_its_sign():
    per = {"correct": np.array([True, False, True]), "confidence": np.array([0.9, 0.2, 0.8]),
           "noise": np.array([0.1, 0.9, 0.2]),
           "mc_correct": np.array([False, False, True]), "mc_confidence": np.array([0.3, 0.2, 0.8])}
    rep = uncertainty.selective_report(per)
    assert set(rep) == {"confidence", "mc_confidence", "noise"}
    assert rep["confidence"]["auroc"] == 1.0 and rep["noise"]["auroc"] == 1.0   # large noise = the mistake
    assert rep["mc_confidence"]["auroc"] == 1.0                                   # judged on the MC prediction
    only_det = uncertainty.describe({"confidence": per["confidence"]}, het=False)
    assert only_det["scores"] == ["confidence"] and "no HET-XL head" in only_det["missing"]["noise"]


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_per_image_file_round_trip(tmp_path, ext):
    per = {"name": np.array(["a/0.png", "b/1.png"]), "label": np.array([0, 1]),
           **uncertainty.per_image_scores(np.log([[0.6, 0.4], [0.9, 0.1]]), [0, 1]),
           "noise": np.array([0.01, 0.2], np.float32), "classnames": ["cat", "dog"]}
    path = uncertainty.write_per_image(str(tmp_path / f"x{ext}"), per)
    with open(path) as f:
        rows = list(csv.DictReader(f)) if ext == ".csv" else [json.loads(line) for line in f]
    assert [r["name"] for r in rows] == ["a/0.png", "b/1.png"]
    assert [r["label_name"] for r in rows] == ["cat", "dog"] and [r["pred_name"] for r in rows] == ["cat", "cat"]
    assert [float(r["confidence"]) for r in rows] == pytest.approx([0.6, 0.9])
    assert [float(r["noise"]) for r in rows] == pytest.approx([0.01, 0.2])
    assert [str(r["correct"]) for r in rows] == ["True", "False"]
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        uncertainty.write_per_image(str(tmp_path / "x.txt"), per)


def test_encoders_noise_size_is_the_heads_angular_size():
    cfg = preset("tiny", het={"enabled": True, "init_scale": 0.5})
    params = init_params(cfg, jax.random.key(0))
    enc = Encoders(cfg, params)
    x = jax.random.normal(jax.random.key(1), (3, cfg.vision.image_size, cfg.vision.image_size, 3))
    emb, angle = enc.image_embeddings_and_noise(x)
    np.testing.assert_allclose(emb, enc.image_embeddings(x), atol=1e-6)
    out = DualEncoder(cfg).apply({"params": params}, x, method=DualEncoder.encode_image)
    np.testing.assert_allclose(angle, noise_lib.per_example_sizes(out["mean"], out["noise"])["angular"], rtol=1e-5)
    assert angle.shape == (3,) and (np.asarray(angle) > 0).all()
    det = Encoders(preset("tiny"), init_params(preset("tiny"), jax.random.key(0)))
    with pytest.raises(ValueError, match="HET-XL head"):
        det.image_embeddings_and_noise(x)


def _checkpoint(encoders):
    return {"encoders": encoders, "tokenizer": ColourTokenizer(), "image_size": 16, "resize_size": None,
            "model_id": "fake@7", "info": {"checkpoint": "/ck/run", "step": 7}}


def _het_colour_encoders():
    """The colour model with a HET-XL config and a known noise size: the blue images are 'uncertain'."""
    enc = colour_encoders()
    enc.config = preset("tiny", het={"enabled": True})

    def with_noise(x):
        emb = image_embeddings(x)
        return emb, 0.05 + 0.5 * (jnp.argmax(emb, axis=-1) == 2)

    enc.image_embeddings_and_noise = with_noise
    return enc


def test_zero_shot_cli_writes_per_image_and_selective_report(tmp_path, monkeypatch, capsys):
    root = colour_tree(tmp_path / "colours", per_class=2)
    monkeypatch.setattr(cli.ev, "load_model", lambda path, step=None: _checkpoint(_het_colour_encoders()))
    out = tmp_path / "res" / "{dataset}.json"
    result = cli.run(["--checkpoint", "/ck/run", "--data", str(root), "--templates", "clip7", "--batch-size", "4",
                      "--mc-samples", "2", "--out", str(out), "--plot", str(tmp_path / "plots"), "--no-progress",
                      "--workers", "2"])
    assert set(result["selective"]) == {"confidence", "mc_confidence", "noise"}
    assert result["uncertainty"]["missing"] == {}
    with open(tmp_path / "res" / "colours_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["name"].endswith("blue/0.png") and rows[0]["label_name"] == "blue"
    assert [float(r["noise"]) for r in rows] == pytest.approx([0.55, 0.55, 0.05, 0.05, 0.05, 0.05])
    assert {"confidence", "entropy", "mc_confidence", "mc_entropy", "pred_name"} <= set(rows[0])
    assert (tmp_path / "plots" / "selective_colours.png").read_bytes()[:4] == b"\x89PNG"
    assert "misclassification detection: confidence AUROC" in capsys.readouterr().out
    rec = json.loads((tmp_path / "res" / "colours.json").read_text())
    assert rec["hetclip"]["selective"]["noise"]["accuracy_at"]["1"] == 1.0 and "per_image" not in rec["hetclip"]


def test_zero_shot_without_head_reports_confidence_only(tmp_path, monkeypatch, capsys):
    root = colour_tree(tmp_path / "colours", per_class=1)
    enc = colour_encoders()
    enc.config = preset("tiny")
    monkeypatch.setattr(cli.ev, "load_model", lambda path, step=None: _checkpoint(enc))
    per = tmp_path / "per.jsonl"
    result = cli.run(["--checkpoint", "/ck/run", "--data", str(root), "--templates", "clip7", "--batch-size", "4",
                      "--per-image", str(per), "--no-progress", "--workers", "0"])
    assert list(result["selective"]) == ["confidence"]
    assert "no HET-XL head" in result["uncertainty"]["missing"]["noise"]
    assert "no HET-XL head" in capsys.readouterr().out
    rows = [json.loads(line) for line in per.read_text().splitlines()]
    assert len(rows) == 3 and "noise" not in rows[0] and "mc_confidence" not in rows[0]
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        cli.run(["--checkpoint", "/ck/run", "--data", str(root), "--per-image", str(tmp_path / "p.txt")])


def test_selective_figure_draws_each_curve():
    per = {"correct": np.array([True, False, True, True]), "confidence": np.array([0.9, 0.8, 0.7, 0.1]),
           "noise": np.array([0.1, 0.3, 0.2, 0.4])}
    rep = uncertainty.selective_report(per)
    fig = plots.selective_figure(rep)
    lines = {ln.get_gid(): ln for ln in fig.get_axes()[0].get_lines()}
    assert set(lines) == {"confidence", "noise"}
    np.testing.assert_allclose(lines["noise"].get_ydata(), rep["noise"]["curve"]["accuracy"])
    with pytest.raises(ValueError):
        plots.selective_figure({})
