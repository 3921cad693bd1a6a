"""Results other tools read: CLIP_benchmark's JSON layout from both CLIs, and reliability diagrams
(``--plot``) checked by the numbers they draw."""
import builtins
import json
import sys

import numpy as np
import pytest

from hetclip.model import preset
from hetclip.zero_shot import cli, plots, report
from hetclip.zero_shot.metrics import ClassificationMeter, log_softmax, retrieval_recall

from test_zero_shot_data import COLOURS, ColourTokenizer, colour_encoders, colour_tree, png_bytes, write_tar

# CLIP_benchmark's names (clip_benchmark/cli.py `dump`, metrics/zeroshot_classification.py and
# metrics/zeroshot_retrieval.py)
CB_RECORD_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}
CB_CLASSIFICATION = {"acc1", "acc5", "mean_per_class_recall"}


def fake_checkpoint(encoders=None, cfg=None):
    enc = encoders or colour_encoders()
    if cfg is not None:
        enc.config = cfg
    return {"encoders": enc, "tokenizer": ColourTokenizer(), "image_size": 16, "resize_size": None,
            "model_id": "fake@7", "info": {"checkpoint": "/ck/run", "step": 7}}


def test_zero_shot_out_is_a_clip_benchmark_record(tmp_path, monkeypatch):
    root = colour_tree(tmp_path / "colours", per_class=2)
    cfg = preset("tiny", het={"enabled": True})
    monkeypatch.setattr(cli.ev, "load_model", lambda path, step=None: fake_checkpoint(cfg=cfg))
    out = tmp_path / "res" / "{dataset}_{pretrained}_{model}_{language}_{task}.json"
    result = cli.run(["--checkpoint", "/ck/run", "--data", str(root), "--templates", "clip7", "--batch-size", "4",
                       "--mc-samples", "2", "--out", str(out), "--no-progress"])
    stem = "colours__ck_run@7_hetclip-tiny-HET-XL_en_zeroshot_classification"
    assert sorted(f.name for f in (tmp_path / "res").iterdir()) == [f"{stem}.json", f"{stem}_per_image.csv"]
    rec = json.loads((tmp_path / "res" / f"{stem}.json").read_text())
    assert CB_RECORD_KEYS <= set(rec)
    assert (rec["dataset"], rec["task"], rec["pretrained"], rec["model"]) == (
        "colours", "zeroshot_classification", "/ck/run@7", "hetclip-tiny-HET-XL")
    m = rec["metrics"]
    assert CB_CLASSIFICATION - {"acc5"} <= set(m) and "acc5" not in m   # 3 classes: no top-5
    assert m["acc1"] == result["metrics"]["top1"] == 1.0
    assert m["mean_per_class_recall"] == result["metrics"]["mean_per_class_recall"]
    # ours beside them, MC predictive included
    for key in ("nll", "ece", "mc_acc1", "mc_nll", "mc_ece", "mc_samples", "num_images"):
        assert key in m
    assert m["nll"] == result["metrics"]["nll"] and m["mc_acc1"] == result["metrics"]["mc_top1"]
    assert rec["hetclip"]["text"]["templates"] == "clip7" and "metrics" not in rec["hetclip"]


def test_retrieval_out_uses_clip_benchmark_directions(tmp_path, monkeypatch):
    d = tmp_path / "flickr"
    d.mkdir()
    samples = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        samples += [(f"p{i}.png", png_bytes(rgb)), (f"p{i}.txt", f"a {name} square\n{name} {name}\n".encode())]
    write_tar(d / "0.tar", samples)
    monkeypatch.setattr(cli.ev, "load_model", lambda path, step=None: fake_checkpoint())
    out = tmp_path / "ret.json"
    result = cli.retrieval_run(["--checkpoint", "/ck/run", "--data", str(d / "0.tar"), "--batch-size", "2",
                                 "--out", str(out), "--no-progress"])
    rec = json.loads(out.read_text())
    assert CB_RECORD_KEYS <= set(rec) and rec["task"] == "zeroshot_retrieval" and rec["dataset"] == "flickr"
    for k in (1, 5, 10):
        assert rec["metrics"][f"image_retrieval_recall@{k}"] == result["metrics"][f"text_to_image_R@{k}"]
        assert rec["metrics"][f"text_retrieval_recall@{k}"] == result["metrics"][f"image_to_text_R@{k}"]
    assert rec["metrics"]["num_texts"] == 6


def test_retrieval_names_match_clip_benchmark_definition():
    """CLIP_benchmark: scores = texts @ imagesᵀ; image_retrieval_recall@k = for each text, its image in the
    top k images; text_retrieval_recall@k = for each image, any of its texts in the top k texts."""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 4))
    txt = rng.normal(size=(12, 4))
    owner = np.repeat(np.arange(6), 2)
    scores = txt @ img.T
    got = report.retrieval_metrics(retrieval_recall(img, txt, owner, ks=(1, 2)))
    for k in (1, 2):
        top_images = np.argsort(-scores, axis=1)[:, :k]
        want_image = np.mean([owner[t] in top_images[t] for t in range(12)])
        top_texts = np.argsort(-scores.T, axis=1)[:, :k]
        want_text = np.mean([np.any(owner[top_texts[i]] == i) for i in range(6)])
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(want_image)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(want_text)
    assert want_image != want_text  # the two directions really differ in this example


def test_record_helpers():
    assert report.classification_metrics({"top1": 0.5, "top5": 0.9, "mc_top1": 0.6, "mc_top5": 0.95, "ece": 0.1}) \
        == {"acc1": 0.5, "acc5": 0.9, "mc_acc1": 0.6, "mc_acc5": 0.95, "ece": 0.1}
    assert report.dataset_name("/data/imagenet/val", imagenet=True) == "imagenet1k"
    assert report.dataset_name("/data/cifar10/{000..009}.tar") == "cifar10"
    assert report.dataset_name("/data/flowers/") == "flowers"
    assert report.model_name(preset("B/32")) == "hetclip-B/32"
    assert report.model_name(preset("tiny", vision={"width": 64, "heads": 2})) == "hetclip-ViT-W64-P8"
    with pytest.raises(ValueError, match="unknown placeholder"):
        report.output_path("{datset}.json", {k: "x" for k in report.PLACEHOLDERS})


def test_bad_out_placeholder_fails_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.ev, "load_model", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    with pytest.raises(SystemExit, match="unknown placeholder"):
        cli.main(["--checkpoint", "x", "--data", str(tmp_path), "--out", "{modle}.json"])


# ------------------------------------------------------------------------------------- reliability plots

def meter_with(rng, n=400, classes=5, sharp=3.0):
    logits = rng.normal(size=(n, classes)) * sharp
    labels = np.where(rng.random(n) < 0.7, logits.argmax(1), rng.integers(0, classes, n))
    m = ClassificationMeter(classes)
    m.update(log_softmax(logits), labels)
    return m


def _panel_numbers(ax):
    acc = [p.get_height() for p in ax.patches if p.get_gid() == "accuracy"]
    return np.array(acc), ax.get_title()


def test_reliability_diagram_draws_the_bins():
    rng = np.random.default_rng(1)
    det, mc = meter_with(rng), meter_with(rng, sharp=1.0)
    diagrams = {"deterministic": det.reliability(), "mc": mc.reliability()}
    # the diagram's ECE is the metric's ECE
    assert plots.ece_of(diagrams["deterministic"]) == pytest.approx(det.result()["ece"], abs=1e-12)
    fig = plots.reliability_figure(diagrams, "colours")
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax, meter, label in zip(axes, (det, mc), ("deterministic", "MC-averaged")):
        heights, title = _panel_numbers(ax)
        assert len(heights) == 15
        filled = meter.bin_count > 0
        np.testing.assert_allclose(heights[filled], meter.bin_correct[filled] / meter.bin_count[filled])
        assert np.all(heights[~filled] == 0)
        assert title.startswith(label) and f"ECE {meter.result()['ece']:.4f}" in title
    one = plots.reliability_figure({"deterministic": diagrams["deterministic"]})
    assert len(one.get_axes()) == 1


def test_zero_shot_plot_writes_a_png_per_task(tmp_path, monkeypatch):
    root = colour_tree(tmp_path / "colours", per_class=2)
    monkeypatch.setattr(cli.ev, "load_model", lambda path, step=None: fake_checkpoint())
    result = cli.run(["--checkpoint", "/ck/run", "--data", str(root), "--templates", "clip7", "--batch-size", "4",
                       "--mc-samples", "2", "--plot", str(tmp_path / "plots"), "--no-progress"])
    png = tmp_path / "plots" / "reliability_colours.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rel = result["reliability"]
    assert set(rel) == {"deterministic", "mc"} and sum(rel["deterministic"]["count"]) == 6
    assert plots.ece_of(rel["mc"]) == pytest.approx(result["metrics"]["mc_ece"], abs=1e-9)


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(cli.ev, "load_model", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    with pytest.raises(SystemExit, match=r"hetclip\[plot\]"):
        cli.main(["--checkpoint", "x", "--data", str(tmp_path), "--plot", str(tmp_path / "p")])
