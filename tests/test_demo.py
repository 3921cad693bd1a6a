"""Demo dataset: determinism, held-out pairs, caption noise, manifest/ensure behaviour, layout."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hetclip.data import demo
from hetclip.data.tokenizers import load_tokenizer

SMALL = dict(num_train=240, shard_size=100, eval_per_class=3, eval_per_combo=1, image_size=32)


def _samples(paths: demo.DemoPaths):
    """All train samples as {key: {ext: bytes}} read back with tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in paths.train_shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _tree(root: str) -> dict[str, bytes]:
    files = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            files[os.path.relpath(p, root)] = Path(p).read_bytes()
    return files


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "noisy"
    # every kind of scene and caption in 240 samples (the defaults have no multi-object scenes)
    return demo.ensure_demo(root, noise_prob=0.5, small_prob=0.25, faded_prob=0.25, multi_prob=0.1,
                            shape_only_prob=0.3, color_only_prob=0.05, **SMALL)


def test_layout_loads(noisy):
    m = json.loads(Path(noisy.manifest).read_text())
    assert m["params"]["num_train"] == 240 and m["format"] == demo.FORMAT_VERSION
    sizes = json.loads(Path(noisy.sizes).read_text())
    assert sizes == {"00000.tar": 100, "00001.tar": 100, "00002.tar": 40}
    assert noisy.train_pattern.endswith("train/{00000..00002}.tar")
    samples = _samples(noisy)
    assert len(samples) == 240
    for key, s in list(samples.items())[:50]:
        assert set(s) == {"png", "txt", "json"}
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (32, 32)
        meta = json.loads(s["json"])
        assert meta["key"] == key and meta["caption"] == s["txt"].decode()
        assert meta["shape"] in demo.SHAPES and meta["color"] in demo.COLORS and meta["count"] in (1, 2, 3)
    for task, n_cls, per in (("shape", 8, 3), ("color", 8, 3), ("shape_color", 64, 1)):
        d = Path(noisy.eval_dirs[task])
        folders = sorted(p.name for p in d.iterdir() if p.is_dir())
        names = (d / "classnames.txt").read_text().splitlines()
        assert len(folders) == len(names) == n_cls
        assert names == [f.replace("_", " ") for f in folders]  # line k = sorted folder k
        assert all(len(list((d / f).glob("*.png"))) == per for f in folders)
        templates = (d / "templates.txt").read_text().splitlines()
        assert templates and all("{c}" in t for t in templates)
        rows = [json.loads(line) for line in (d / "meta.jsonl").read_text().splitlines()]
        assert len(rows) == n_cls * per
        for r in rows:  # each image's attributes agree with its class folder
            folder = r["path"].split("/")[0]
            assert folders.index(folder) == r["label"]
            want = {"shape": r["shape"], "color": r["color"], "shape_color": f"{r['color']}_{r['shape']}"}[task]
            assert folder == want
    held = (Path(noisy.eval_dirs["shape_color"]) / "heldout.txt").read_text().splitlines()
    assert held == [f"{p['color']} {p['shape']}" for p in m["heldout_pairs"]] and len(held) == 8


def test_heldout_pairs_absent_from_train(noisy):
    m = json.loads(Path(noisy.manifest).read_text())
    held = {(p["shape"], p["color"]) for p in m["heldout_pairs"]}
    assert len({s for s, _ in held}) == len({c for _, c in held}) == 8
    for s in _samples(noisy).values():
        meta = json.loads(s["json"])
        assert (meta["shape"], meta["color"]) not in held  # never rendered
        assert (meta["caption_shape"], meta["caption_color"]) not in held  # never captioned, even when corrupted
        caption = s["txt"].decode()
        for shape, color in held:
            plural = demo.PLURALS[shape]
            for noun in (shape, plural):
                assert f"{color} {noun}" not in caption and f"{noun} colored {color}" not in caption
                assert f"{noun} shape in {color}" not in caption
        # the caption names the caption attributes (partial captions name only one of them)
        assert meta["caption_shape"] in caption or meta["caption_color"] in caption


def test_heldout_pair_selection_errors():
    assert demo.heldout_pairs(3, 0) == []
    assert demo.heldout_pairs(3, 5) == demo.heldout_pairs(3, 5) != demo.heldout_pairs(4, 5)
    with pytest.raises(ValueError, match="num_heldout=9"):
        demo.heldout_pairs(0, 9)


def test_caption_noise_rate_and_input_dependence(noisy):
    metas = [json.loads(s["json"]) for s in _samples(noisy).values()]
    hard = [m for m in metas if m["hard"]]
    easy = [m for m in metas if not m["hard"]]
    assert len(hard) > 60 and len(easy) > 40
    assert not any(m["corrupted"] for m in easy)  # noise_prob_easy = 0
    rate = np.mean([m["corrupted"] for m in hard])
    assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / len(hard)), rate
    for m in metas:
        if m["corrupted"]:
            attr = m["corrupted_attribute"]
            assert m[f"caption_{attr}"] != m[attr]
            other = "color" if attr == "shape" else "shape"
            assert m[f"caption_{other}"] == m[other]
            # the attribute that is hard to see is the one that gets corrupted
            if m["hard_shape"] and not m["hard_color"]:
                assert attr == "shape"
            if m["hard_color"] and not m["hard_shape"]:
                assert attr == "color"
        else:
            assert (m["caption_shape"], m["caption_color"]) == (m["shape"], m["color"])
        assert m["hard_shape"] == (m["size"] == "small")
        assert m["hard_color"] == (m["contrast"] < 0.2)
    m = json.loads(Path(noisy.manifest).read_text())
    assert m["train"]["num_corrupted"] == sum(x["corrupted"] for x in metas)


def test_color_partner_noise_names_the_look_alike_on_warm_colours_only(tmp_path):
    paths = demo.ensure_demo(tmp_path / "partner", noise_rule="color_partner", noise_prob=0.6, **SMALL)
    metas = [json.loads(s["json"]) for s in _samples(paths).values()]
    heldout = {tuple(x) for x in demo.heldout_pairs(0, demo.DEFAULTS["num_heldout"])}
    assert set(demo.PARTNER_SHAPES) == set(demo.SHAPES) and set(demo.PARTNER_COLORS) < set(demo.COLORS)
    assert all(demo.PARTNER_SHAPES[demo.PARTNER_SHAPES[s]] == s != demo.PARTNER_SHAPES[s] for s in demo.SHAPES)
    warm = [m for m in metas if m["color"] in demo.PARTNER_COLORS]
    assert all(m["noise_selected"] == (m in warm) for m in metas)
    assert not any(m["corrupted"] for m in metas if m not in warm)  # noise_prob_easy = 0
    for m in metas:
        if m["corrupted"]:
            assert m["corrupted_attribute"] == "shape" and m["caption_color"] == m["color"]
            assert m["caption_shape"] == demo.PARTNER_SHAPES[m["shape"]]
            assert (m["caption_shape"], m["color"]) not in heldout  # no held-out pair is ever named
        else:
            assert (m["caption_shape"], m["caption_color"]) == (m["shape"], m["color"])
    possible = [m for m in warm if (demo.PARTNER_SHAPES[m["shape"]], m["color"]) not in heldout]
    rate = np.mean([m["corrupted"] for m in possible])
    assert len(possible) > 60 and abs(rate - 0.6) < 4 * np.sqrt(0.24 / len(possible)), rate
    with pytest.raises(ValueError, match="noise_rule='colour'.*color_partner"):
        demo.ensure_demo(tmp_path / "x", noise_rule="colour")


def test_contrast_measures_what_is_drawn():
    rng = np.random.default_rng(0)
    full, faded = [], []
    for i in range(40):
        _, a = demo.render_scene(np.random.default_rng([7, i]), 32, "square", "yellow", faded_prob=0.0)
        full.append(a["contrast"])
        _, b = demo.render_scene(np.random.default_rng([7, i]), 32, "square", "yellow", faded_prob=1.0)
        faded.append(b["contrast"])
        assert b["faded"] and 0.3 <= b["alpha"] <= 0.55
    assert np.mean(faded) < 0.6 * np.mean(full)
    img, a = demo.render_scene(rng, 32, "circle", "red", count=1, faded_prob=0.0)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and a["count"] == 1 and a["position"]


def test_captions_use_many_phrasings(noisy):
    caps = [s["txt"].decode() for s in _samples(noisy).values()]
    assert len(set(caps)) > 150
    assert any(c.startswith("a photo of") for c in caps) and any(c.startswith("two ") for c in caps)
    assert any("background" in c for c in caps)
    assert not any(" a orange" in c or c.startswith("a orange") for c in caps)  # articles agree


def test_determinism_same_seed_same_bytes(tmp_path, noisy):
    a = demo.generate_demo(tmp_path / "a", seed=1, **SMALL)
    b = demo.generate_demo(tmp_path / "b", seed=1, workers=2, **SMALL)  # worker count does not matter
    ta, tb = _tree(a.root), _tree(b.root)
    assert ta.keys() == tb.keys() and all(ta[k] == tb[k] for k in ta)
    c = demo.generate_demo(tmp_path / "c", seed=2, **SMALL)
    assert _tree(c.root)["train/00000.tar"] != ta["train/00000.tar"]
    assert ta["train/00000.tar"] != _tree(noisy.root)["train/00000.tar"]  # noise/seed change the data


def test_tokenizer_covers_captions(noisy):
    tok = load_tokenizer(noisy.tokenizer, context_length=32)
    m = json.loads(Path(noisy.manifest).read_text())
    assert tok.vocab_size == m["tokenizer"]["vocab_size"] <= 1024
    caps = [s["txt"].decode() for s in _samples(noisy).values()]
    ids = tok(caps)
    # every caption fits, and frequent words are whole tokens
    assert all(tok.eos_token_id in row[1:] for row in ids)
    for word in ("circle", "red", "photo"):
        assert len(tok.encode([word])[0]) == 1


def test_ensure_reuses_and_regenerates(tmp_path):
    root = tmp_path / "d"
    p1 = demo.ensure_demo(root, **SMALL)
    stamp = os.stat(p1.manifest).st_mtime_ns
    marker = root / "train" / "marker"
    marker.write_text("x")
    p2 = demo.ensure_demo(root, **SMALL)  # same parameters: reused as is
    assert p2 == p1 and marker.exists() and os.stat(p2.manifest).st_mtime_ns == stamp
    p3 = demo.ensure_demo(root, **{**SMALL, "num_train": 120})  # different parameters: regenerated
    assert not marker.exists() and json.loads(Path(p3.sizes).read_text()) == {"00000.tar": 100, "00001.tar": 20}
    assert len(p3.train_shards) == 2
    # a half-written directory without a manifest is replaced
    Path(p3.manifest).unlink()
    p4 = demo.ensure_demo(root, **{**SMALL, "num_train": 120})
    assert Path(p4.manifest).is_file()
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == []  # temporary directories were cleaned up
    with pytest.raises(FileExistsError, match="already exists"):
        demo.generate_demo(root, **SMALL)


def test_older_format_is_regenerated_not_mixed(tmp_path):
    """A directory written by another generator version (same parameters) is replaced as a whole."""
    root = tmp_path / "d"
    p1 = demo.ensure_demo(root, **SMALL)
    before = _tree(p1.root)
    manifest = json.loads(Path(p1.manifest).read_text())
    manifest["format"] = demo.FORMAT_VERSION - 1
    Path(p1.manifest).write_text(json.dumps(manifest))
    stale = root / "train" / "00009.tar"  # a file the current generator never writes
    stale.write_bytes(b"old")
    assert not demo._is_current(root, demo._check_params(SMALL))
    p2 = demo.ensure_demo(root, **SMALL)
    assert json.loads(Path(p2.manifest).read_text())["format"] == demo.FORMAT_VERSION
    assert not stale.exists() and _tree(p2.root) == before  # deterministic: the same bytes as a fresh run


def test_small_objects_cover_a_patch():
    """A small object is about one patch of the demo recipe's ViT across or more (its outline is there to be
    seen), a medium or large one more."""
    from hetclip import config as config_lib

    vision = config_lib.load_config("demo").model.vision
    patch = vision.patch_size / vision.image_size  # of the image side
    for size_word, prob in (("small", 1.0), (None, 0.0)):
        attrs = [demo.render_scene(np.random.default_rng([6, i]), 64, "heart", "green", small_prob=prob,
                                   multi_prob=0.0)[1] for i in range(40)]
        assert size_word is None or {a["size"] for a in attrs} == {size_word}
        assert min(2 * a["radius"] for a in attrs) >= 0.9 * patch


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match=r"unknown demo parameter\(s\) \['num_images'\]"):
        demo.ensure_demo(tmp_path / "x", num_images=3)
    with pytest.raises(ValueError, match="noise_prob=1.5"):
        demo.ensure_demo(tmp_path / "x", noise_prob=1.5)
    with pytest.raises(ValueError, match="image_size=8"):
        demo.ensure_demo(tmp_path / "x", image_size=8)
    with pytest.raises(ValueError, match="image_format='gif'"):
        demo.ensure_demo(tmp_path / "x", image_format="gif")
    with pytest.raises(ValueError, match="num_train=0"):
        demo.ensure_demo(tmp_path / "x", num_train=0)
    with pytest.raises(ValueError, match="shard_size=2.5 must be an int"):
        demo.ensure_demo(tmp_path / "x", shard_size=2.5)
    with pytest.raises(ValueError, match="max_offset=0.7"):
        demo.ensure_demo(tmp_path / "x", max_offset=0.7)
    with pytest.raises(ValueError, match="max_rotation=200.0"):
        demo.ensure_demo(tmp_path / "x", max_rotation=200)
    with pytest.raises(ValueError, match="shape_only_prob \\+ color_only_prob = 1.5"):
        demo.ensure_demo(tmp_path / "x", shape_only_prob=0.9, color_only_prob=0.6)
    assert not (tmp_path / "x").exists()


def test_scene_knobs_do_what_they_say():
    attrs = [demo.render_scene(np.random.default_rng([3, i]), 64, "star", "red", small_prob=0.0, multi_prob=0.0,
                               max_offset=0.0)[1] for i in range(30)]
    assert {a["count"] for a in attrs} == {1} and "small" not in {a["size"] for a in attrs}
    assert {a["position"] for a in attrs} == {"center"}
    attrs = [demo.render_scene(np.random.default_rng([3, i]), 64, "star", "red", small_prob=1.0, multi_prob=1.0)[1]
             for i in range(30)]
    assert {a["size"] for a in attrs} == {"small"} and {a["count"] for a in attrs} == {2, 3}
    # a centred, unrotated circle on a solid background is mirror-symmetric; a turned square is not always
    for i in range(10):
        img, a = demo.render_scene(np.random.default_rng([4, i]), 64, "circle", "blue", small_prob=0.0,
                                   multi_prob=0.0, max_offset=0.0, faded_prob=0.0)
        if a["background"] == "solid":
            assert np.abs(img.astype(int) - img[:, ::-1].astype(int)).max() <= 2
    turned = [demo.render_scene(np.random.default_rng([5, i]), 64, "square", "blue", small_prob=0.0, multi_prob=0.0,
                                max_offset=0.0, faded_prob=0.0, max_rotation=40.0)[0] for i in range(10)]
    straight = [demo.render_scene(np.random.default_rng([5, i]), 64, "square", "blue", small_prob=0.0,
                                  multi_prob=0.0, max_offset=0.0, faded_prob=0.0, max_rotation=0.0)[0]
                for i in range(10)]
    assert any((t != s).any() for t, s in zip(turned, straight))


def test_captions_that_name_one_attribute():
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape_only = demo.make_caption(rng, "heart", "cyan", 1, "large", "gray", "center", shape_only_prob=1.0)
        assert "heart" in shape_only and "cyan" not in shape_only
        color_only = demo.make_caption(rng, "heart", "cyan", 2, "small", "gray", None, shape_only_prob=0.0,
                                       color_only_prob=1.0)
        assert "cyan" in color_only and "heart" not in color_only
        both = demo.make_caption(rng, "heart", "cyan", 1, "large", "gray", "center", shape_only_prob=0.0,
                                 color_only_prob=0.0)
        assert "heart" in both and "cyan" in both


def test_cli(tmp_path, capsys):
    rc = demo.main(["--out", str(tmp_path / "cli"), "--num-train", "50", "--shard-size", "25", "--image-size", "24",
                    "--eval-per-class", "1", "--eval-per-combo", "1", "--vocab-size", "600", "--workers", "1",
                    "--image-format", "jpg"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_pattern"].endswith("{00000..00001}.tar") and out["seconds"] >= 0
    with tarfile.open(out["train_shards"][0]) as tar:
        assert sum(n.endswith(".jpg") for n in tar.getnames()) == 25
    assert demo.main(["--out", str(tmp_path / "bad"), "--noise-prob", "2"]) == 2
    assert "noise_prob=2.0" in capsys.readouterr().err
