"""bench/evidence_lit.py through its command line at a tiny size: the LiT wiring (locked pretrained image
tower, text tower from scratch, pretrained tokenizer), the report and JSON it writes, reuse of finished runs."""
import json

import numpy as np
import pytest

TINY = ["--pretrain-steps", 2, "--steps", 3, "--warmup", 1, "--seeds", 1, "--noise", 0.4, "--demo", "num_train=192",
        "--demo", "shard_size=96", "--demo", "eval_per_class=6", "--demo", "eval_per_combo=1", "--demo", "image_size=32",
        "--set", "model.vision.layers=1", "--set", "model.text.layers=1", "--set", "model.vision.image_size=32",
        "--set", "data.image_size=32", "--set", "batch_size=32", "--set", "data.num_workers=1"]


@pytest.mark.slow
def test_tiny_table_end_to_end_and_reuse(run_bench, tmp_path):
    import jax

    from hetclip import hf
    from hetclip.checkpoint import load_run

    root, out, js = tmp_path / "root", tmp_path / "R.md", tmp_path / "r.json"
    args = [*TINY, "--root", root, "--out", out, "--json", js]
    proc = run_bench("evidence_lit", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(js.read_text())
    runs = rep["runs"]["0.4"]
    assert [r["seed"] for r in runs["DET"]] == [0] == [r["seed"] for r in runs["HET-XL"]]
    for arm, rs in runs.items():
        for r in rs:
            assert {"shape", "color", "shape_color", "noisy_half", "clean_half"} <= set(r["eval"])
            halves = r["eval"]["noisy_half"]["num_images"] + r["eval"]["clean_half"]["num_images"]
            assert halves == r["eval"]["shape"]["num_images"] == 48
            assert ("mc_top1" in r["eval"]["shape"]) == (arm == "HET-XL")
    assert rep["data"]["0.4"]["num_corrupted"] > 0 and rep["pretrained"]["made_here"]
    text = out.read_text()
    assert "## Noise probability 0.4" in text and "| shape | top1 |" in text and "| shape, noisy half | nll |" in text
    assert "one seed: no interval" in text  # one seed here; paired_interval is tested in test_evidence_supervised
    assert "primary (shape top1) HET-XL − DET" in text and (tmp_path / "R.png").stat().st_size > 0
    # LiT: the trained image tower is the pretrained one, bit for bit; the text tower is not
    work = root / "color_partner_0.4" / "HET-XL_s0"
    cfg = json.loads((work / "config.json").read_text())
    export = str(root / "pretrain" / "export_hf")
    assert cfg["init_from_hf_groups"] == ["image"] and cfg["freeze"]["image"]
    assert cfg["data"]["tokenizer"]["path"] == export
    run = load_run(str(work))
    pretrained, _ = hf.params_from_hf(export)
    for group, changed in (("vision_model", False), ("visual_projection", False), ("text_projection", True)):
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pretrained[group]),
                                                     jax.tree.leaves(jax.device_get(run.params[group])))]
        assert (not all(same)) if changed else all(same), group
    # a second call reuses every finished run and writes the same numbers
    again = run_bench("evidence_lit", *args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(reused)") == 2

    def numbers(report):
        return [{task: {k: v for k, v in m.items() if k != "images_per_second"} for task, m in r["eval"].items()}
                for rs in report["runs"]["0.4"].values() for r in rs]

    assert numbers(json.loads(js.read_text())) == numbers(rep)
    # the report is a function of the JSON
    again_md = tmp_path / "again.md"
    proc = run_bench("evidence_lit", "--from-json", "--json", js, "--out", again_md, "--figure", "", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert again_md.read_text() == out.read_text()


@pytest.mark.parametrize("bad,message", [(["--demo", "num_train"], "expected KEY=VALUE"),
                                         (["--set", "batch_size"], "--set 'batch_size': expected KEY=VALUE"),
                                         (["--steps", 10, "--warmup", 50], "--steps > --warmup"),
                                         (["--noise-rule", "ink"], "invalid choice")])
def test_bad_arguments_are_refused_before_any_work(run_bench, tmp_path, bad, message):
    proc = run_bench("evidence_lit", *bad, "--root", tmp_path / "root", "--out", tmp_path / "R.md", timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "R.md").exists()
