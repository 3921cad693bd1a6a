"""Zero-shot data sources, layouts, and end-to-end runs with encoders whose right answers are known."""
import io
import json
import os
import re
import tarfile
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hetclip.data import decode
from hetclip.data.loader import BadSampleWarning, TooManyBadSamples
from hetclip.data.shards import ShardError, ShardFailure
from hetclip.zero_shot import cli
from hetclip.zero_shot import datasets as ds
from hetclip.zero_shot import evaluate as ev
from hetclip.zero_shot.templates import imagenet_classnames, imagenet_wnids

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = ["red", "green", "blue"]
MEAN, STD = np.asarray(decode.CLIP_MEAN, np.float32), np.asarray(decode.CLIP_STD, np.float32)


# ------------------------------------------------------------------------------------------- fakes

class ColourTokenizer:
    """Words -> ids: red 1, green 2, blue 3, anything else 4; end-of-text 5; padding 0."""
    context_length = 12
    eos_token_id = 5

    def __call__(self, texts):
        out = np.zeros((len(texts), self.context_length), np.int32)
        for i, t in enumerate(texts):
            ids = [WORDS.index(w) + 1 if w in WORDS else 4 for w in re.findall(r"[a-z]+", t.lower())]
            ids = ids[: self.context_length - 1] + [5]
            out[i, :len(ids)] = ids
        return out

    def spec(self):
        return {"kind": "colour-words", "context_length": self.context_length}


def image_embeddings(images):
    """Mean RGB of the de-normalised image: red -> (1, 0, 0) etc."""
    rgb = jnp.asarray(images) * STD + MEAN
    e = jnp.mean(rgb, axis=(1, 2)) + 1e-3
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def text_embeddings(tokens):
    """Bag of colour words in RGB order."""
    t = jnp.asarray(tokens)
    e = jnp.stack([(t == k).sum(1) for k in (1, 2, 3)], 1).astype(jnp.float32) + 1e-3
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def colour_encoders():
    return types.SimpleNamespace(
        image_embeddings=image_embeddings, text_embeddings=text_embeddings, logit_scale=50.0,
        image_samples=lambda x, key, s: jnp.repeat(image_embeddings(x)[:, None], s, axis=1))


def png_bytes(colour, size=(10, 7)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def colour_tree(root, per_class=3, colours=COLOURS):
    for name, rgb in colours.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png_bytes(rgb, (10 + i, 7)))
    return root


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------- decoding

def test_eval_transform_shape_and_normalisation():
    x = decode.eval_transform(png_bytes((255, 0, 0), (40, 20)), 16)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], (np.array([1.0, 0, 0]) - MEAN) / STD, atol=2e-2)
    # centre crop of a left/right split image keeps both halves
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    y = decode.eval_transform(buf.getvalue(), 10) * STD + MEAN
    assert y[:, 0].mean() < 0.1 and y[:, -1].mean() > 0.9
    assert decode.eval_transform(buf.getvalue(), 10, resize_size=20).shape == (10, 10, 3)


# ------------------------------------------------------------------------------------------- folders

def test_imagefolder_labels_and_odd_files(tmp_path):
    root = colour_tree(tmp_path / "d", per_class=2)
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / ".DS_Store").write_bytes(b"\0")
    (root / "README.md").write_text("top-level files are ignored")
    (root / "green" / "broken.jpg").write_bytes(b"this is not a jpeg")
    src = ds.ImageFolder(str(root))
    assert src.classnames == ["blue", "green", "red"]
    assert src.ignored == 1 and len(src) == 7
    runs = {}
    for workers in (0, 2):   # batches do not depend on the number of decode processes
        batches = ds.eval_batches(src, 8, 4, workers=workers, max_bad_fraction=0.5)
        with pytest.warns(BadSampleWarning, match=r"broken\.jpg.*corrupt_image"):
            runs[workers] = out = list(batches)
        assert [b["image"].shape[0] for b in out] == [4, 2] and out[0]["image"].dtype == np.uint8
        labels = np.concatenate([b["label"] for b in out])
        assert labels.tolist() == [0, 0, 1, 1, 2, 2]
        skipped = ds.skipped_summary(batches)
        assert skipped["images_skipped"] == 1 and skipped["skipped_files"][0].endswith("broken.jpg")
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in runs[0]]),
                                  np.concatenate([b["image"] for b in runs[2]]))
    # the loader's pixels are the shared decoder's (resize + centre crop), uint8
    first = sorted(p for p, _ in src.files)[0]
    np.testing.assert_array_equal(runs[0][0]["image"][0], decode.eval_transform_uint8(open(first, "rb").read(), 8))
    limited = ds.eval_batches(src, 8, 4, workers=0, limit=3)   # stops before reaching green/broken.jpg
    assert sum(b["image"].shape[0] for b in limited) == 3 and ds.skipped_summary(limited)["images_skipped"] == 0
    # by default more than 1 % unusable images is an error that names the file
    with pytest.warns(BadSampleWarning), pytest.raises(TooManyBadSamples, match=r"1 of 7 .*broken\.jpg"):
        list(ds.eval_batches(src, 8, 4, workers=0))


def test_unreadable_folder_file_is_named(tmp_path):
    root = colour_tree(tmp_path / "d", per_class=2)
    os.symlink(str(tmp_path / "gone.png"), str(root / "red" / "z.png"))   # listed, but cannot be opened
    src = ds.ImageFolder(str(root))
    with pytest.warns(BadSampleWarning, match=r"z\.png.*unreadable_file"):
        out = list(ds.eval_batches(src, 8, 8, workers=0, max_bad_fraction=0.5))
    assert sum(len(b["label"]) for b in out) == 6


def test_imagefolder_missing_extra_empty(tmp_path):
    root = colour_tree(tmp_path / "d", per_class=1)
    names = tmp_path / "names.txt"
    names.write_text("blue thing\ngreen thing\nred thing\nyellow thing\n")
    with pytest.raises(ValueError, match="3 class folders but 4 class names.*missing or extra"):
        ds.ImageFolder(str(root), str(names))
    names.write_text("blue thing\ngreen thing\n")
    with pytest.raises(ValueError, match="3 class folders but 2 class names"):
        ds.ImageFolder(str(root), str(names))
    os.makedirs(root / "white")
    names.write_text("b\ng\nr\nw\n")
    with pytest.warns(UserWarning, match="hold no images: white"):
        src = ds.ImageFolder(str(root), str(names))
    assert src.classnames == ["b", "g", "r", "w"] and src.empty == ["white"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ds.ImageFolder(str(tmp_path / "nowhere"))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(png_bytes((1, 2, 3)))
    with pytest.raises(ValueError, match="one sub-folder per class"):
        ds.ImageFolder(str(flat))
    only_empty = tmp_path / "e"
    os.makedirs(only_empty / "x")
    with pytest.raises(ValueError, match="no images"):
        ds.ImageFolder(str(only_empty))


def test_imagenet_layout_check(tmp_path):
    wnids = imagenet_wnids()
    root = tmp_path / "val"
    root.mkdir()
    for w in wnids:
        (root / w).mkdir()
    for k in (0, 5):
        (root / wnids[k] / "x.png").write_bytes(png_bytes((9, 9, 9)))
    ds.check_imagenet_layout(str(root))
    with pytest.warns(UserWarning, match="998 class folder"):
        src = ds.imagenet(str(root))
    assert src.classnames == imagenet_classnames()
    assert [label for _, label in src.files] == [0, 5]
    os.rmdir(root / wnids[7])
    (root / "val").mkdir()
    with pytest.raises(ValueError, match=rf"missing 1: {wnids[7]}.*unexpected 1: val.*hint"):
        ds.check_imagenet_layout(str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"missing 1000: n01440764, .*and 990 more"):
        ds.check_imagenet_layout(str(empty))


def _mixed_items(n=24, bad_every=3):
    """Evaluation items of coloured PNG bytes, every ``bad_every``-th undecodable (none if None), and a shard
    failure marker after item 10."""
    from hetclip.data.loader import eval_item

    colours = list(COLOURS.values())
    out = []
    for i in range(n):
        data = b"not an image" if bad_every and i % bad_every == 1 else png_bytes(colours[i % 3], (9 + i % 5, 7))
        if i % 4 == 2 and data != b"not an image":  # a JPEG photo-like crop: the simplejpeg + OpenCV path, written straight into the slot
            buf = io.BytesIO()
            noise = np.random.default_rng(i).integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(noise).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
        out.append(eval_item(f"k{i:02d}.png", "shard.tar", data, i))
        if i == 10:
            out.append(ShardFailure("shard.tar", "truncated_shard", "breaks off after k10", key="k10x"))
    return out


@pytest.mark.parametrize("chunk_size,prefetch", [(2, 1), (16, 2)])
def test_eval_loader_order_names_and_skips_do_not_depend_on_workers(chunk_size, prefetch):
    """Chunks go to the workers in turn through shared-memory slots; whatever the worker count, chunk size and
    number of slots (2 slots of 2 rows: a batch spans more chunks than there are slots), the batches are the
    items in order minus the bad ones, each with its name and label, and the bad ones are named."""
    from hetclip.data.loader import make_eval_loader

    items = _mixed_items()
    good = [it for it in items if isinstance(it, tuple) and it[3] != b"not an image"]
    runs = {}
    for workers in (0, 1, 3):
        loader = make_eval_loader(iter(items), batch_size=5, num_workers=workers, image_size=6, chunk_size=chunk_size,
                                  prefetch=prefetch, max_bad_fraction=0.5)
        with pytest.warns(BadSampleWarning, match=r"sample 'k01\.png' of shard\.tar: corrupt_image"):
            out = list(loader)
        runs[workers] = out
        assert [len(b["name"]) for b in out] == [5, 5, 5, 1]
        assert [n for b in out for n in b["name"]] == [f"shard.tar:{it[1]}" for it in good]
        assert np.concatenate([b["label"] for b in out]).tolist() == [it[4] for it in good]
        st = loader.stats()
        assert st["samples_ok"] == 16 and st["skipped"] == {"corrupt_image": 8, "truncated_shard": 1}
        assert st["samples_read"] == 25 and st["workers"] == workers
    for workers in (1, 3):
        for a, b in zip(runs[0], runs[workers]):
            np.testing.assert_array_equal(a["image"], b["image"])
    flat = np.concatenate([b["image"] for b in runs[3]])
    for k in (0, 1):  # a PNG and a JPEG: the decoder's own pixels
        assert good[k][3][:2] == (b"\x89P" if k == 0 else b"\xff\xd8")
        np.testing.assert_array_equal(flat[k], decode.eval_transform_uint8(good[k][3], 6))


def test_eval_loader_batches_stay_intact_whether_kept_or_dropped():
    """Batch buffers the caller let go of are filled again; ones it holds (or holds a view of) never are."""
    from hetclip.data.loader import make_eval_loader

    def run(keep):
        loader = make_eval_loader(iter(_mixed_items(n=60, bad_every=None)), batch_size=8, num_workers=1,
                                  image_size=6, chunk_size=3)
        out = []
        for b in loader:
            out.append(b["image"][2:] if keep else b["image"].copy())  # a view keeps the whole buffer
        return out, loader

    kept, _ = run(True)
    copied, loader = run(False)
    # two buffers in turn: the loop variable still holds the previous batch while the next one is made
    assert len(kept) == len(copied) == 8 and len(loader._outputs) == 2
    for a, b in zip(kept, copied):
        np.testing.assert_array_equal(a, b[2:])


def test_eval_loader_limit_and_close_stop_the_workers():
    from hetclip.data.loader import make_eval_loader

    loader = make_eval_loader(iter(_mixed_items(bad_every=None)), batch_size=4, num_workers=2, image_size=6,
                              limit=6, chunk_size=3, max_bad_fraction=0.5)
    pids = loader.worker_pids
    assert len(pids) == 2
    assert [len(b["image"]) for b in loader] == [4, 2]
    for pid in pids:  # reaped by the loader: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_eval_worker_death_names_the_worker_and_its_images(tmp_path):
    """An evaluation worker killed mid-run ends iteration with DataWorkerError naming it and what it decoded."""
    import signal

    from hetclip.data.loader import make_eval_loader
    from hetclip.data.workers import DataWorkerError

    items = _mixed_items(n=200, bad_every=None)
    loader = make_eval_loader(iter(items), batch_size=4, num_workers=2, image_size=6, chunk_size=4,
                              max_bad_fraction=0.5)
    next(loader), next(loader)  # the second batch is worker 1's first chunk
    pid = loader.worker_pids[1]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DataWorkerError, match=rf"data worker 1 \(pid {pid}\) of process 0 was killed by SIGKILL "
                                              r"while reading image shard\.tar:k\d+\.png .*; stopping the evaluation"):
        list(loader)
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


# ------------------------------------------------------------------------------------------- webdataset

def test_wds_classification_shards(tmp_path):
    d = tmp_path / "wds"
    (d / "test").mkdir(parents=True)
    (d / "classnames.txt").write_text("red\ngreen\nblue\n")
    samples = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        samples += [(f"s{i:03d}.png", png_bytes(rgb)), (f"s{i:03d}.cls", str(i).encode())]
    samples += [("s100.txt", b"no image here")]
    write_tar(d / "test" / "0.tar", samples)
    src = ds.WdsClassification(str(d))
    assert src.classnames == WORDS
    items = list(src.items())
    assert [it[4] for it in items[:3]] == [0, 1, 2]
    assert isinstance(items[3], ShardFailure) and items[3].key == "s100" and items[3].reason == "missing_image"
    with pytest.warns(BadSampleWarning, match="s100"):
        out = list(ds.eval_batches(src, 8, 8, workers=0, max_bad_fraction=0.5))
    assert out[0]["label"].tolist() == [0, 1, 2]
    # brace pattern + explicit class names
    assert len(ds.shard_urls(str(d / "test" / "{0..0}.tar"))) == 1
    with pytest.raises(ShardError, match=r"1 of the 2 shards .* do not exist: \S+1\.tar"):
        ds.shard_urls(str(d / "test" / "{0..1}.tar"))
    bad = tmp_path / "bad"
    bad.mkdir()
    write_tar(bad / "0.tar", [("a.png", png_bytes((0, 0, 0))), ("a.cls", b"7")])
    with pytest.raises(ValueError, match=r"0\.tar: a\.cls = 7 is outside \[0, 3\)"):
        list(ds.WdsClassification(str(bad), WORDS).items())
    write_tar(bad / "0.tar", [("a.png", png_bytes((0, 0, 0))), ("a.cls", b"cat")])
    with pytest.raises(ValueError, match="not an integer label"):
        list(ds.WdsClassification(str(bad), WORDS).items())
    with pytest.raises(ValueError, match="no class names"):
        ds.WdsClassification(str(bad))


# ------------------------------------------------------------------------------------------- end to end

def test_run_zero_shot_colour_folders(tmp_path):
    root = colour_tree(tmp_path / "colours", per_class=3)
    res = ev.run_zero_shot(colour_encoders(), ColourTokenizer(), str(root), None, "clip7", 16,
                            batch_size=4, mc_samples=2, workers=2)
    m = res["metrics"]
    assert m["top1"] == 1.0 and m["mean_per_class_recall"] == 1.0 and m["mc_top1"] == 1.0
    assert m["num_images"] == 9 and m["mc_nll"] == pytest.approx(m["nll"], abs=1e-5)
    assert res["text"]["num_templates"] == 7 and res["text"]["templates"] == "clip7"
    # shuffled class names: accuracy collapses, proving labels follow sorted folder order
    names = tmp_path / "names.txt"
    names.write_text("red\nblue\ngreen\n")
    res = ev.run_zero_shot(colour_encoders(), ColourTokenizer(), str(root), str(names), "bare", 16,
                            batch_size=4)
    assert res["metrics"]["top1"] == 0.0


def test_run_zero_shot_wds(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    (d / "classnames.txt").write_text("Blue.\nGREEN\nred\n")
    samples = []
    for i, name in enumerate(["blue", "green", "red", "red"]):
        samples += [(f"k{i}.png", png_bytes(COLOURS[name])), (f"k{i}.cls", str(["blue", "green", "red"].index(name)).encode())]
    write_tar(d / "000.tar", samples)
    res = ev.run_zero_shot(colour_encoders(), ColourTokenizer(), str(d), None, "clip80", 8,
                            canonicalize=True, batch_size=8, limit=3)
    assert res["metrics"]["top1"] == 1.0 and res["dataset"]["images_evaluated"] == 3
    assert res["dataset"]["kind"] == "wds" and res["text"]["canonicalize"] is True


def test_cli_main_writes_json(tmp_path, monkeypatch, capsys):
    root = colour_tree(tmp_path / "colours", per_class=2)
    (root / "red" / "bad.png").write_bytes(b"garbage")
    fake = {"encoders": colour_encoders(), "tokenizer": ColourTokenizer(), "image_size": 16, "resize_size": None,
            "model_id": "fake@1", "info": {"checkpoint": "/ck/fake", "step": 1}}
    monkeypatch.setattr(ev, "load_model", lambda path, step=None: fake)
    out = tmp_path / "r" / "results.json"
    with pytest.warns(UserWarning, match="bad.png"):
        cli.run(["--checkpoint", "/ck/fake", "--data", str(root), "--templates", "clip7", "--canonicalize",
                 "--max-bad-fraction", "0.2",
                  "--batch-size", "4", "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "c")])
    printed = capsys.readouterr().out
    assert "top1" in printed and "1.0000" in printed
    rec = json.loads(out.read_text())
    assert rec["task"] == "zeroshot_classification" and rec["dataset"] == "colours"
    assert rec["metrics"]["acc1"] == 1.0 and rec["metrics"]["num_images"] == 6
    res = rec["hetclip"]
    assert res["checkpoint"] == "/ck/fake" and res["step"] == 1
    assert res["dataset"]["root"] == str(root) and res["dataset"]["images_skipped"] == 1
    assert res["preprocess"]["image_size"] == 16 and res["preprocess"]["crop"] == "center"
    assert res["text"]["tokenizer"] == ColourTokenizer().spec() and res["text"]["context_length"] == 12
    assert res["text"]["canonicalize"] is True and res["text"]["templates"] == "clip7"
    assert len(os.listdir(tmp_path / "c")) == 1  # classifier cached
    with pytest.raises(ValueError, match="unknown template set"):
        cli.run(["--checkpoint", "x", "--data", str(root), "--templates", "nope"])
    assert cli.main(["--checkpoint", "x", "--data", str(root), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_retrieval_shards(tmp_path, monkeypatch):
    d = tmp_path / "ret"
    d.mkdir()
    samples = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        samples += [(f"p{i}.png", png_bytes(rgb)), (f"p{i}.txt", f"a {name} square\n{name} {name}\n".encode())]
    samples += [("p9.png", png_bytes((0, 0, 0))), ("p9.json", json.dumps({"captions": []}).encode())]
    write_tar(d / "0.tar", samples)
    with pytest.warns(UserWarning, match="p9"):
        res = ev.run_retrieval(colour_encoders(), ColourTokenizer(), str(d / "0.tar"), 8, batch_size=2,
                               max_bad_fraction=0.5, workers=0)
    m = res["metrics"]
    assert m["num_images"] == 3 and m["num_texts"] == 6
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0
    assert res["dataset"]["samples_without_image_or_caption"] == 1


def test_decode_resize_then_centre_crop_matches_a_reference():
    """``resize_size > size``: shortest side to ``resize_size`` (bicubic), then a centre ``size`` crop,
    checked against a two-step Pillow reference (resize the whole image, then crop)."""
    yy, xx = np.mgrid[0:60, 0:90]
    img = Image.fromarray(np.stack([xx * 2, yy * 4, (xx + yy) % 256], -1).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    got = decode.eval_transform(buf.getvalue(), 16, resize_size=20)
    ref_img = img.resize((30, 20), Image.BICUBIC)  # shortest side 60 -> 20
    left, top = (30 - 16) // 2, (20 - 16) // 2
    ref = np.asarray(ref_img.crop((left, top, left + 16, top + 16)), np.float32) / 255.0
    ref = (ref - MEAN) / STD
    assert got.shape == (16, 16, 3)
    # one-step box resize vs two-step reference: same geometry, small resampling differences only
    assert np.abs(got - ref).mean() < 0.05
    assert np.abs(got - decode.eval_transform(buf.getvalue(), 16)).mean() > 0.05  # the crop really differs
    with pytest.raises(ValueError, match="smaller than the crop"):
        decode.eval_transform(buf.getvalue(), 16, resize_size=8)


@pytest.mark.slow
def test_real_encoders_sharded_mc(tmp_path):
    """A tiny random ``hetclip.model.Encoders`` (HET-XL head on) through the sharded, padded path."""
    import jax
    from hetclip.model import Encoders, init_params, preset

    cfg = preset("tiny", embed_dim=16, het={"enabled": True, "num_factors": 2, "mc_samples": 2},
                 vision={"width": 32, "layers": 1, "heads": 2, "patch_size": 8, "image_size": 16},
                 text={"width": 32, "layers": 1, "heads": 2, "vocab_size": 8, "context_length": 12,
                       "eos_token_id": 5})
    enc = Encoders(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    root = colour_tree(tmp_path / "colours", per_class=3)
    kw = dict(batch_size=8, mc_samples=3, seed=1, workers=2)
    res = ev.run_zero_shot(enc, ColourTokenizer(), str(root), None, "clip7", 16, **kw)
    m = res["metrics"]
    assert m["num_images"] == 9 and 0.0 <= m["top1"] <= 1.0 and np.isfinite(m["mc_nll"])
    unsharded = ev.run_zero_shot(enc, ColourTokenizer(), str(root), None, "clip7", 16, shard=False, **kw)
    for k in ("nll", "mc_nll", "ece", "mc_ece"):
        assert unsharded["metrics"][k] == pytest.approx(m[k], rel=1e-4, abs=1e-5)
    assert res["logit_scale"] == pytest.approx(enc.logit_scale)
