"""Input pipeline: shard patterns, resumable stream, decoding/augmentation, loader, bad input."""

from __future__ import annotations

import gc
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from hetclip.data import decode, shards
from hetclip.data.loader import BadSampleWarning, TooManyBadSamples, make_train_loader
from hetclip.data.tools import ShardWriter
from hetclip.data.workers import DataWorkerError


class CharTokenizer:
    """Stand-in tokenizer following the interface: bytes of the text, EOS=1, PAD=0, L=12."""

    context_length, vocab_size, eos_token_id, pad_token_id, bos_token_id = 12, 258, 1, 0, None

    def __call__(self, texts):
        out = np.zeros((len(texts), self.context_length), np.int32)
        for i, t in enumerate(texts):
            b = list(t.encode()[: self.context_length - 1])
            out[i, : len(b)] = [x + 2 for x in b]
            out[i, len(b)] = self.eos_token_id
        return out

    def spec(self):
        return {"kind": "chars"}


def _jpeg(rng, h, w, fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_set(root, n_shards=4, per_shard=8, seed=0, bad=None):
    """Shards of random JPEGs with captions "c<i>"; ``bad`` maps sample index -> members override."""
    rng = np.random.default_rng(seed)
    with ShardWriter(str(root), per_shard) as w:
        for i in range(n_shards * per_shard):
            members = {"jpg": _jpeg(rng, int(rng.integers(24, 48)), int(rng.integers(24, 48))),
                       "txt": f"c{i}".encode()}
            if bad and i in bad:
                members = bad[i]
            w.write(members)
    return str(root) + "/{00000..%05d}.tar" % (n_shards - 1)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("shards"))


SPEC = {"image_size": 16, "shuffle_buffer": 6}


def _all(loader):
    with loader:
        return list(loader)


# ----------------------------------------------------------------------------- patterns and sources

def test_expand_pattern_braces_globs_and_no_match(tmp_path, shard_set):
    d = os.path.dirname(shard_set)
    urls = shards.expand_pattern(shard_set)
    assert [os.path.basename(u) for u in urls] == [f"{i:05d}.tar" for i in range(4)]
    assert shards.expand_pattern(d + "/*.tar") == urls
    assert shards.expand_pattern(d + "/{00001,00003}.tar") == [urls[1], urls[3]]
    with pytest.raises(shards.ShardError, match=r"matched no files.*nothing"):
        shards.expand_pattern(str(tmp_path / "nothing-{0..3}.tar"))
    with pytest.raises(shards.ShardError, match="matched no files"):
        make_train_loader({"shards": str(tmp_path / "x*.tar")}, CharTokenizer(), batch_size=2, seed=0,
                          num_workers=0)


def test_sources_weights_and_epoch_visits(shard_set):
    d = os.path.dirname(shard_set)
    a, b = d + "/{00000..00001}.tar", d + "/{00002..00003}.tar"
    s1 = shards.parse_sources(f"{a}::{b}", "2::0.5")
    s2 = shards.parse_sources([(a, 2), (b, 0.5)])
    s3 = shards.parse_sources([{"shards": a, "weight": 2}, {"shards": b, "weight": 0.5}])
    assert s1 == s2 == s3 and [s.weight for s in s1] == [2.0, 0.5]
    visits = shards.epoch_visits(s1, seed=3, epoch=0)
    urls = shards.expand_pattern(shard_set)
    # weight 2 on 2 shards -> 4 visits (each twice); weight 0.5 on 2 shards -> 1 visit
    assert sorted(visits[i] for i in range(len(visits)) if visits[i] in urls[:2]) == sorted(urls[:2] * 2)
    assert sum(v in urls[2:] for v in visits) == 1
    assert visits == shards.epoch_visits(s1, seed=3, epoch=0)
    assert visits != shards.epoch_visits(s1, seed=3, epoch=1) or visits != shards.epoch_visits(s1, seed=4, epoch=0)
    with pytest.raises(shards.ShardError, match="3 source weights given for 2"):
        shards.parse_sources(f"{a}::{b}", [1, 2, 3])
    with pytest.raises(shards.ShardError, match="not both"):
        shards.parse_sources([(a, 2)], [1])


def test_process_split_is_disjoint_and_needs_enough_shards(shard_set):
    src = shards.parse_sources(shard_set)
    for epoch in range(3):
        parts = [shards.process_visits(src, 0, epoch, p, 3) for p in range(3)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(src[0].urls) and len(set(flat)) == len(flat)
    with pytest.raises(shards.ShardError, match=r"4 shard\(s\) .* for 5 processes"):
        make_train_loader({"shards": shard_set}, CharTokenizer(), batch_size=2, seed=0,
                          process_index=0, process_count=5, num_workers=0)


def test_sizes_json_and_epoch_size(tmp_path, shard_set):
    src = shards.parse_sources(shard_set)
    assert shards.epoch_size(src) == 32
    assert shards.epoch_size(shards.parse_sources(shard_set, [0.5])) == 16
    assert shards.epoch_size(src, 1000) == 1000
    loader = make_train_loader({"shards": shard_set}, CharTokenizer(), batch_size=2, seed=0, num_workers=0)
    assert loader.epoch_size == 32
    loader.close()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "00000.tar").write_bytes(open(src[0].urls[0], "rb").read())
    with pytest.raises(shards.ShardError, match="sizes.json"):
        shards.epoch_size(shards.parse_sources(str(bare / "00000.tar")))


# ----------------------------------------------------------------------------- the stream

def _keys(stream, n=None):
    out = []
    for item in stream:
        out.append(item["__key__"] if isinstance(item, dict) else ("fail", item.url))
        if n is not None and len(out) == n:
            break
    return out


def test_stream_epochs_are_shuffled_permutations_and_deterministic(shard_set):
    src = shards.parse_sources(shard_set)
    keys = _keys(shards.SampleStream(src, seed=5, shuffle_buffer=6, epochs=2))
    assert len(keys) == 64
    e0, e1 = keys[:32], keys[32:]
    assert sorted(e0) == sorted(e1) and len(set(e0)) == 32  # each epoch: every sample once
    assert e0 != e1 and e0 != sorted(e0)  # shuffled, differently per epoch
    assert keys == _keys(shards.SampleStream(src, seed=5, shuffle_buffer=6, epochs=2))
    assert keys != _keys(shards.SampleStream(src, seed=6, shuffle_buffer=6, epochs=2))
    # without any shuffling the stream is the shard order
    plain = _keys(shards.SampleStream(src, seed=5, shuffle_buffer=0, shuffle_shards=False, epochs=1))
    assert plain == sorted(plain)


@pytest.mark.parametrize("buffer", [0, 5, 50])
def test_stream_restore_at_every_position(shard_set, buffer):
    src = shards.parse_sources(shard_set)
    ref = _keys(shards.SampleStream(src, seed=1, shuffle_buffer=buffer, epochs=2))
    st = shards.SampleStream(src, seed=1, shuffle_buffer=buffer, epochs=2)
    got = []
    for i in range(len(ref)):
        state = json.loads(json.dumps(st.state()))
        st.close()
        st = shards.SampleStream(src, seed=1, shuffle_buffer=buffer, epochs=2, state=state)
        got.append(next(st)["__key__"])
    st.close()
    assert got == ref
    with pytest.raises(shards.ShardError, match="seed=1"):
        shards.SampleStream(src, seed=2, state=state)


def test_pipe_source_matches_local(shard_set):
    urls = shards.expand_pattern(shard_set)
    pipe = "::".join(f"pipe:cat {u}" for u in urls)
    kw = dict(seed=2, shuffle_buffer=4, epochs=1)
    local = _keys(shards.SampleStream(shards.parse_sources("::".join(urls)), **kw))
    piped = _keys(shards.SampleStream(shards.parse_sources(pipe), **kw))
    assert local == piped
    failing = shards.parse_sources(f"pipe:cat {urls[0]}::pipe:false")
    got = _keys(shards.SampleStream(failing, seed=0, shuffle_buffer=0, shuffle_shards=False, epochs=1))
    assert got[-1] == ("fail", "pipe:false") and len(got) == 9


# ----------------------------------------------------------------------------- decoding

def test_to_rgb_modes_and_alpha_on_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))        # fully transparent red -> white
    rgba.putpixel((1, 0), (255, 0, 0, 128))      # half red on white
    out = np.asarray(decode.to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]
    a = 128 / 255
    np.testing.assert_allclose(out[0, 1], [255, 255 * (1 - a), 255 * (1 - a)], atol=1.5)
    assert np.asarray(decode.to_rgb(rgba, background=(0, 0, 0)))[0, 0].tolist() == [0, 0, 0]
    gray = Image.fromarray(np.array([[10, 200]], np.uint8), "L")
    assert np.asarray(decode.to_rgb(gray)).tolist() == [[[10] * 3, [200] * 3]]
    i16 = Image.fromarray(np.array([[0, 65535, 256 * 100]], np.uint16))
    assert np.asarray(decode.to_rgb(i16))[0, :, 0].tolist() == [0, 255, 100]
    cmyk = decode.to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[0, 0].tolist() == [255, 0, 0]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 9, 9, 9])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1
    assert np.asarray(decode.to_rgb(pal)).tolist() == [[[0, 0, 255], [255, 255, 255]]]
    # each through encoded bytes too
    for img, fmt in ((rgba, "PNG"), (gray, "PNG"), (pal, "PNG"), (Image.new("CMYK", (3, 3)), "JPEG"),
                     (Image.new("LA", (3, 3)), "PNG"), (Image.new("1", (3, 3)), "PNG")):
        buf = io.BytesIO()
        img.save(buf, fmt, **({"transparency": 1} if img.mode == "P" else {}))
        assert decode.load_rgb(buf.getvalue()).mode == "RGB"
    with pytest.raises(decode.DecodeError, match="mode 'La'") as e:
        decode.to_rgb(Image.new("La", (2, 2)))
    assert e.value.reason == "mode"


def test_decode_errors_bomb_and_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    data = _jpeg(rng, 40, 50)
    with pytest.raises(decode.DecodeError, match="2000 pixels exceeds the limit of 1999") as e:
        decode.load_rgb(data, max_pixels=1999)
    assert e.value.reason == "bomb"
    assert decode.load_rgb(data, max_pixels=2000).size == (50, 40)
    with pytest.raises(decode.DecodeError) as e:
        decode.load_rgb(b"not an image at all")
    assert e.value.reason == "corrupt_image"
    with pytest.raises(decode.DecodeError) as e:
        decode.eval_transform(data[: len(data) // 3], 16)
    assert e.value.reason == "corrupt_image"
    p = tmp_path / "x.png"
    Image.new("L", (5, 7), 3).save(p)
    assert decode.load_rgb(str(p)).size == (5, 7)


def test_normalize_and_eval_transform_reference():
    x = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    ref = (x.astype(np.float64) / 255 - np.array(decode.CLIP_MEAN)) / np.array(decode.CLIP_STD)
    np.testing.assert_allclose(decode.normalize(x), ref, atol=1e-5)
    assert decode.normalize(x).dtype == np.float32
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    # CLIP reference: resize shortest side to 24 (bicubic), then centre crop 24 x 24
    step = img.resize((32, 24), Image.Resampling.BICUBIC).crop((4, 0, 28, 24))
    want = decode.normalize(np.asarray(step))
    got = decode.eval_transform(img, 24)
    assert got.shape == (24, 24, 3) and got.dtype == np.float32
    assert np.abs(got - want)[2:-2, 2:-2].max() < 1e-5  # identical away from the crop border
    assert np.abs(got - want).mean() < 0.05


def test_jpeg_draft_close_to_full_decode():
    yy, xx = np.mgrid[0:480, 0:640]
    smooth = np.stack([xx * 255 / 640, yy * 255 / 480, (xx + yy) * 255 / 1120], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, "JPEG", quality=95)
    fast = decode.eval_transform_uint8(buf.getvalue(), 64).astype(float)
    full = decode.eval_transform_uint8(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 64).astype(float)
    assert np.abs(fast - full).mean() < 2.0


def _photo_jpeg(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 255 / (h + w)], -1)
    img = np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.skipif(decode._simplejpeg is None, reason="simplejpeg is a dependency on Linux x86_64 only")
def test_simplejpeg_matches_pillow_and_falls_back(monkeypatch):
    assert decode.jpeg_decoder() == "simplejpeg"
    for h, w in ((224, 300), (500, 620)):  # full-scale and DCT-downscaled (1/2) decoding
        data = _photo_jpeg(h, w)
        with monkeypatch.context() as m:  # simplejpeg's pixels, resampled by Pillow
            m.setattr(decode, "_cv2", None)
            fast = [decode.train_transform_uint8(data, 224 if h == 224 else 160, random.Random(i)) for i in range(3)]
            fast.append(decode.eval_transform_uint8(data, 112))
        with monkeypatch.context() as m:
            m.setattr(decode, "_simplejpeg", None)
            assert decode.jpeg_decoder() == "pillow"
            ref = [decode.train_transform_uint8(data, 224 if h == 224 else 160, random.Random(i)) for i in range(3)]
            ref.append(decode.eval_transform_uint8(data, 112))
        for a, b in zip(fast, ref):
            assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 2
    # simplejpeg refuses a truncated file; Pillow then names the error as before
    data = _photo_jpeg(224, 300)
    with pytest.raises(decode.DecodeError) as e:
        decode.train_transform_uint8(data[: len(data) // 2], 64, random.Random(0))
    assert e.value.reason == "corrupt_image"
    # CMYK and grayscale JPEGs go through Pillow
    buf = io.BytesIO()
    Image.new("L", (40, 30), 77).save(buf, "JPEG")
    assert (decode.eval_transform_uint8(buf.getvalue(), 16) == 77).all()


@pytest.mark.skipif(not decode.fast_path(), reason="simplejpeg and OpenCV are dependencies on Linux x86_64 only")
def test_fast_path_resampling_reference_and_agreement(monkeypatch):
    # a linear ramp: bicubic interpolation reproduces it and the low-pass keeps it, so away from the border the
    # resampled box is the ramp evaluated at the output pixel centres (x0 + (i + 0.5) * f - 0.5)
    yy, xx = np.mgrid[0:200, 0:300].astype(np.float64)
    ramp = np.stack([xx * 0.5 + 20, yy * 0.6 + 30, xx * 0.2 + yy * 0.3 + 10], -1)
    img = np.round(ramp).astype(np.uint8)
    for box, size in (((40, 20, 140, 120), 50), ((10, 30, 60, 80), 80), ((0, 0, 300, 200), 64)):
        out = np.zeros((size, size, 3), np.uint8)
        got = decode.resample(img, box, size, out)
        assert got is out
        fx, fy = (box[2] - box[0]) / size, (box[3] - box[1]) / size
        cx = box[0] + (np.arange(size) + 0.5) * fx - 0.5
        cy = box[1] + (np.arange(size) + 0.5) * fy - 0.5
        want = np.stack([cx[None, :] * 0.5 + 20 + 0 * cy[:, None], cy[:, None] * 0.6 + 30 + 0 * cx[None, :],
                         cx[None, :] * 0.2 + cy[:, None] * 0.3 + 10], -1)
        inner = (slice(4, -4), slice(4, -4))
        assert np.abs(got[inner] - want[inner]).max() <= 1.01, box
    # a box the size of the output: the crop itself
    np.testing.assert_array_equal(decode.resample(img, (7, 9, 71, 73), 64), img[9:73, 7:71])
    # the fast path against Pillow's decode + bicubic on photo-like JPEGs: same crop, close pixels, into out=
    for h, w, size in ((224, 300, 224), (500, 620, 160)):
        data = _photo_jpeg(h, w)
        out = np.zeros((size, size, 3), np.uint8)
        fast = [decode.train_transform_uint8(data, size, random.Random(i), out=out).copy() for i in range(3)]
        fast.append(decode.eval_transform_uint8(data, size, resize_size=size + 32, out=out).copy())
        with monkeypatch.context() as m:
            m.setattr(decode, "_cv2", None)
            assert not decode.fast_path()
            ref = [decode.train_transform_uint8(data, size, random.Random(i)) for i in range(3)]
            ref.append(decode.eval_transform_uint8(data, size, resize_size=size + 32))
        for a, b in zip(fast, ref):
            d = np.abs(a.astype(int) - b)
            assert d.mean() < 5.0 and np.percentile(d, 99) < 25, (h, d.mean())  # a box 1 px off: mean > 10
    # PNG (the demo recipe's 64-px scenes) keeps Pillow's decode and bicubic resize, pixel for pixel
    rgb = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    box = decode.random_resized_crop_box(64, 64, random.Random(5), scale=(0.8, 1.0))
    want = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BICUBIC, box=box))
    np.testing.assert_array_equal(decode.train_transform_uint8(buf.getvalue(), 64, random.Random(5),
                                                               scale=(0.8, 1.0)), want)
    # the pixel limit is checked on the header, before any decoding
    with pytest.raises(decode.DecodeError) as e:
        decode.train_transform_uint8(_photo_jpeg(224, 300), 64, random.Random(0), max_pixels=224 * 300 - 1)
    assert e.value.reason == "bomb"


def test_random_resized_crop_box_and_determinism():
    rng = random.Random(0)
    for scale in ((0.9, 1.0), (0.08, 1.0)):
        for _ in range(200):
            x0, y0, x1, y1 = decode.random_resized_crop_box(120, 80, rng, scale=scale)
            assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 80
            frac = (x1 - x0) * (y1 - y0) / (120 * 80)
            assert scale[0] * 0.9 <= frac <= 1.0 + 1e-9
            assert 3 / 4 * 0.9 <= (x1 - x0) / (y1 - y0) <= 4 / 3 * 1.1 or frac > 0.75
    data = _jpeg(np.random.default_rng(0), 60, 70)
    a = decode.train_transform(data, 16, random.Random(7))
    assert np.array_equal(a, decode.train_transform(data, 16, random.Random(7)))
    assert not np.array_equal(a, decode.train_transform(data, 16, random.Random(8), scale=(0.08, 1.0)))


# ----------------------------------------------------------------------------- loader

def _captions(batches):
    return [bytes(int(t) - 2 for t in row[: list(row).index(1)]).decode() for x in batches for row in x["text"]]


def test_loader_batches_are_uint8_and_depend_only_on_worker_count(shard_set):
    spec = {**SPEC, "shards": shard_set, "epochs": 1}
    inline = _all(make_train_loader(spec, CharTokenizer(), batch_size=5, seed=3, num_workers=0))
    assert len(inline) == 6  # 32 samples, last partial batch dropped
    b = inline[0]
    assert b["image"].shape == (5, 16, 16, 3) and b["image"].dtype == np.uint8
    assert b["text"].shape == (5, 12) and b["text"].dtype == np.int32
    captions = _captions(inline)
    assert len(set(captions)) == 30 and all(c.startswith("c") for c in captions)
    one = _all(make_train_loader(spec, CharTokenizer(), batch_size=5, seed=3, num_workers=1))
    for x, y in zip(inline, one, strict=True):  # the in-process producer is one worker
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["text"], y["text"])
    two = [_all(make_train_loader(spec, CharTokenizer(), batch_size=5, seed=3, num_workers=2)) for _ in range(2)]
    for x, y in zip(*two, strict=True):  # repeatable with the same worker count
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["text"], y["text"])
    # rows 0-2 from worker 0 (shards 0 and 2 of the epoch's order), rows 3-4 from worker 1: disjoint shards
    c2 = [_captions([{"text": x["text"][rows]}]) for x in two[0] for rows in (slice(0, 3), slice(3, 5))]
    shard_of = lambda c: int(c[1:]) // 8  # noqa: E731 - 8 samples per shard
    w0 = {shard_of(c) for part in c2[0::2] for c in part}
    w1 = {shard_of(c) for part in c2[1::2] for c in part}
    assert len(w0) == len(w1) == 2 and not w0 & w1
    all2 = [c for part in c2 for c in part]
    assert len(set(all2)) == len(all2) == 25  # worker 0: 16 samples -> 5 sub-batches of 3
    other = _all(make_train_loader(spec, CharTokenizer(), batch_size=5, seed=4, num_workers=0))
    assert not np.array_equal(other[0]["text"], inline[0]["text"])


RESUME_CHILD = textwrap.dedent("""
    import json, sys, numpy as np
    sys.path.insert(0, {test_dir!r})
    from test_data_pipeline import CharTokenizer
    from hetclip.data.loader import make_train_loader
    state = json.load(open({state!r}))
    with make_train_loader({spec!r}, CharTokenizer(), batch_size=4, seed=11, num_workers=2, state=state) as L:
        batches = [next(L) for _ in range({n})]
    np.savez({out!r}, image=np.stack([b["image"] for b in batches]), text=np.stack([b["text"] for b in batches]))
""")


def test_exact_resume_in_a_new_process(tmp_path, shard_set):
    spec = {**SPEC, "shards": shard_set, "shuffle_buffer": 10}
    n, k = 14, 5  # 14 batches of 4 = 56 samples: crosses the epoch boundary at 32
    with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=2) as loader:
        straight = [next(loader) for _ in range(n)]
    with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=2) as loader:
        first = [next(loader) for _ in range(k)]
        state = loader.state()
    for x, y in zip(first, straight):
        assert np.array_equal(x["image"], y["image"])
    (tmp_path / "state.json").write_text(json.dumps(state))
    code = RESUME_CHILD.format(test_dir=os.path.dirname(__file__), state=str(tmp_path / "state.json"),
                               spec=spec, n=n - k, out=str(tmp_path / "rest.npz"))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    rest = np.load(tmp_path / "rest.npz")
    np.testing.assert_array_equal(rest["image"], np.stack([b["image"] for b in straight[k:]]))
    np.testing.assert_array_equal(rest["text"], np.stack([b["text"] for b in straight[k:]]))
    with pytest.raises(shards.ShardError, match=r"saved with 2 data worker\(s\) per process, this run uses 1 "
                                                r"\(data.num_workers=1\).*set data.num_workers=2"):
        make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=1, state=state)


def test_more_workers_than_shards_uses_one_worker_per_shard(shard_set, caplog):
    spec = {**SPEC, "shards": shard_set, "epochs": 1}
    with caplog.at_level("WARNING", logger="hetclip.data"):
        with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=0, process_index=1, process_count=2,
                               num_workers=3) as loader:  # process 1 of 2 reads 2 of the 4 shards
            assert loader.num_workers == 2 and len(loader.worker_pids) == 2
            batches = list(loader)
            state = loader.state()
    assert "data.num_workers=3 but process 1 has 2 shard visit(s)" in caplog.text
    assert len(batches) == 4 and state["workers"] == 2  # 2 x 8 samples, 2 rows per worker and batch


def test_resume_from_a_single_stream_state(shard_set):
    """A state of the single-stream format (stream position at a chunk start + samples to skip)."""
    spec = {**SPEC, "shards": shard_set, "shuffle_buffer": 10}
    with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=0) as loader:
        straight = [next(loader) for _ in range(6)]
    stream = shards.SampleStream(shards.parse_sources(shard_set), seed=11, shuffle_buffer=10)
    for _ in range(9):  # chunk of 4 starting after 9 items; batch 3 ends with the 3rd item of that chunk
        next(stream)
    v1 = {"version": 1, "stream": stream.state(), "skip": 3, "stats": {}}
    stream.close()
    with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=1, state=v1) as loader:
        unmoved = loader.state()  # saved again before any batch: still the same position
    with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=1, state=unmoved) as loader:
        rest = [next(loader) for _ in range(3)]
    for x, y in zip(rest, straight[3:]):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["text"], y["text"])
    with pytest.raises(shards.ShardError, match="1 data stream per process, this run uses 2"):
        make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=2, state=v1)
    with pytest.raises(shards.ShardError, match=r"unsupported loader state version 7 \(this loader reads versions "
                                                r"1 and 2\)"):
        make_train_loader(spec, CharTokenizer(), batch_size=4, seed=11, num_workers=1, state={**v1, "version": 7})


def test_data_modules_import_one_way():
    """samples <- workers <- loader: the per-sample module and the worker processes never import the loader
    (a worker process imports ``hetclip.data.workers`` only)."""
    code = ("import sys; import hetclip.data.workers; "
            "print(sorted(m for m in sys.modules if m.startswith('hetclip.data.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'hetclip.data.loader'" not in out and "'hetclip.data.samples'" in out


def test_one_train_crop_default():
    """The recipes' crop default is the decoder's (``decode.DEFAULT_CROP_SCALE``), and so is the loader's."""
    from hetclip.configs import _base
    from hetclip.data.loader import TRAIN_DEFAULTS

    assert TRAIN_DEFAULTS["crop_scale"] == decode.DEFAULT_CROP_SCALE
    assert TRAIN_DEFAULTS["crop_ratio"] == decode.DEFAULT_CROP_RATIO
    assert tuple(_base.base_config().data.crop_scale) == decode.DEFAULT_CROP_SCALE


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


def test_close_leaves_no_fds_or_processes(shard_set):
    spec = {**SPEC, "shards": shard_set}
    make_train_loader(spec, CharTokenizer(), batch_size=4, seed=0, num_workers=0).close()  # warm imports
    gc.collect()
    before = _open_fds()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        loader = make_train_loader(spec, CharTokenizer(), batch_size=4, seed=0, num_workers=2)
        next(loader)
        next(loader)
        pids = loader.worker_pids
        assert len(pids) == 2
        loader.close()
        loader.close()  # idempotent
        with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=0, num_workers=1) as l2:
            next(l2)
        gc.collect()
    assert _open_fds() == before
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_a_killed_worker_ends_iteration_naming_worker_and_shard(shard_set):
    spec = {**SPEC, "shards": shard_set}
    loader = make_train_loader(spec, CharTokenizer(), batch_size=4, seed=0, num_workers=2)
    next(loader)
    pids = loader.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(DataWorkerError, match=rf"data worker 1 \(pid {pids[1]}\) of process 0 was killed by "
                                              r"SIGKILL while reading shard .*0000[0-3]\.tar; stopping"):
        for _ in range(20):  # sub-batches it wrote before dying are still delivered
            next(loader)
    with pytest.raises(ProcessLookupError):  # the other worker was stopped too
        os.kill(pids[0], 0)
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_a_worker_killed_before_reading_says_so(shard_set):
    loader = make_train_loader({**SPEC, "shards": shard_set}, CharTokenizer(), batch_size=4, seed=0, num_workers=2)
    os.kill(loader.worker_pids[1], signal.SIGKILL)  # still starting: no shard opened yet
    with pytest.raises(DataWorkerError, match=r"data worker 1 .* was killed by SIGKILL (before it opened a shard|"
                                              r"while reading shard \S+\.tar); stopping") as err:
        for _ in range(20):
            next(loader)
    assert "no shard" not in str(err.value)


def test_workers_leave_sigint_and_sigterm_to_the_parent(shard_set):
    with make_train_loader({**SPEC, "shards": shard_set}, CharTokenizer(), batch_size=4, seed=0,
                           num_workers=1) as loader:
        next(loader)
        pid = loader.worker_pids[0]
        os.kill(pid, signal.SIGINT)  # what a Ctrl-C in the terminal sends to the whole process group
        os.kill(pid, signal.SIGTERM)
        for _ in range(12):  # 48 samples: beyond what was decoded ahead before the signals
            next(loader)
        assert _alive(pid)


PARENT_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {test_dir!r})
    from test_data_pipeline import CharTokenizer
    from hetclip.data.loader import make_train_loader
    loader = make_train_loader({spec!r}, CharTokenizer(), batch_size=4, seed=0, num_workers=2)
    next(loader)
    print(*loader.worker_pids, flush=True)
    time.sleep(600)
""")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed(shard_set):
    code = PARENT_CHILD.format(test_dir=os.path.dirname(__file__), spec={**SPEC, "shards": shard_set})
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        before = set(os.listdir("/dev/shm"))
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "decode workers outlived their parent"
    assert set(os.listdir("/dev/shm")) <= before  # nothing named was left behind


def test_spec_errors():
    with pytest.raises(KeyError, match="did you mean 'shuffle_buffer'"):
        make_train_loader({"shards": "x", "shuffle_bufer": 3}, CharTokenizer(), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="crop_scale"):
        make_train_loader({"shards": "x", "crop_scale": (0.5, 1.5)}, CharTokenizer(), batch_size=2, seed=0)


# ----------------------------------------------------------------------------- bad input

def _cmyk_jpeg():
    buf = io.BytesIO()
    Image.new("CMYK", (30, 30), (0, 255, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    pattern = write_set(tmp_path, n_shards=2, per_shard=8, bad={
        1: {"jpg": b"\xff\xd8 corrupt", "txt": b"x"},
        2: {"jpg": _jpeg(np.random.default_rng(0), 30, 30), "txt": b"   "},
        3: {"jpg": _jpeg(np.random.default_rng(0), 30, 30)},
        4: {"txt": b"no image"},
        5: {"jpg": _cmyk_jpeg(), "txt": b"cmyk is fine"},
        9: {"png": _jpeg(np.random.default_rng(0), 300, 300, "PNG"), "txt": b"too big"},
    })
    spec = {**SPEC, "shards": pattern, "epochs": 1, "max_bad_fraction": 0.5, "max_pixels": 200 * 200,
            "shuffle_buffer": 0, "shuffle_shards": False}
    with pytest.warns(BadSampleWarning) as rec:
        with make_train_loader(spec, CharTokenizer(), batch_size=3, seed=0, num_workers=1) as loader:
            batches = list(loader)
            stats = loader.stats()
    assert stats["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1,
                                "missing_image": 1, "bomb": 1}
    assert stats["samples_ok"] == 11 and len(batches) == 3
    msgs = "\n".join(str(w.message) for w in rec)
    assert "sample '000000001' of " in msgs and "00000.tar: corrupt_image" in msgs
    assert "'000010001'" in msgs and "bomb" in msgs  # sample 9 = shard 1, index 1


def _damaged_set(tmp_path):
    """Six shards: 00001 truncated inside a member, 00002 not a tar, 00003 an empty tar."""
    write_set(tmp_path, n_shards=6, per_shard=6)
    t1 = tmp_path / "00001.tar"
    t1.write_bytes(t1.read_bytes()[: 3 * 1024 + 700])
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar file" * 40)
    with tarfile.open(tmp_path / "00003.tar", "w"):
        pass
    return str(tmp_path / "{00000..00005}.tar")


def _png_header(w, h):
    """A PNG whose header claims ``w`` x ``h`` pixels (opening reads the header only)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_max_pixels_is_the_one_pixel_limit():
    big = _png_header(20_000, 20_000)  # 400 Mpx: over twice Pillow's own limit (an error there)
    assert decode.open_image(big, max_pixels=500_000_000).size == (20_000, 20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning from 179 Mpx up
        assert decode.open_image(_png_header(15_000, 15_000)).size == (15_000, 15_000)  # 225 Mpx < 2**28
    with pytest.raises(decode.DecodeError, match=r"400000000 pixels exceeds the limit of 268435456"):
        decode.open_image(big)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own setting is left as it was


def test_an_undecodable_folder_image_is_named_plainly(tmp_path):
    from hetclip.zero_shot import datasets as ds

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (20, 20)).save(tmp_path / c / "0.png")
    (tmp_path / "a" / "bad.png").write_bytes(b"not an image")
    with pytest.warns(BadSampleWarning):
        with pytest.raises(TooManyBadSamples) as err:
            list(ds.eval_batches(ds.ImageFolder(str(tmp_path)), 8, 8, workers=0))
    msg = str(err.value)
    assert "bad.png" in msg and "cannot identify image: not in a format Pillow reads" in msg
    assert "object at 0x" not in msg and "hetclip-shards" not in msg and "Check or remove the image files" in msg


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_missing_local_shards_are_refused_before_reading_all_named(tmp_path, shard_set, workers):
    d = os.path.dirname(shard_set)
    spec = {**SPEC, "shards": d + "/{00000,missing1,00001,missing2}.tar"}
    with pytest.raises(shards.ShardError, match=r"2 of the 4 shards of .* do not exist: .*missing1\.tar, "
                                                r".*missing2\.tar$"):
        make_train_loader(spec, CharTokenizer(), batch_size=2, seed=0, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_failed_shards_count_against_their_own_limit_and_are_listed(tmp_path, workers):
    pattern = _damaged_set(tmp_path)
    spec = {**SPEC, "shards": pattern, "epochs": 1, "max_bad_shard_fraction": 0.5}
    with pytest.warns(BadSampleWarning) as rec:
        with make_train_loader(spec, CharTokenizer(), batch_size=2, seed=0, num_workers=workers) as loader:
            batches = list(loader)
            stats = loader.stats()
    assert {os.path.basename(u): v["reason"] for u, v in stats["bad_shards"].items()} == {
        "00001.tar": "truncated_shard", "00002.tar": "unreadable_shard", "00003.tar": "empty_shard"}
    assert stats["skipped"] == {"truncated_shard": 1, "unreadable_shard": 1, "empty_shard": 1}
    # two workers stop with the first one whose shards run out
    assert stats["samples_ok"] >= (18 if workers < 2 else 6) and len(batches) == stats["samples_ok"] // 2
    msgs = "\n".join(str(w.message) for w in rec)
    assert "00003.tar: empty_shard" in msgs and "00002.tar: unreadable_shard" in msgs
    # the default limit (1% of the shards) stops at the first failed shard, whatever the worker count
    with pytest.raises(TooManyBadSamples, match=r"^[12] of 6 shards failed \(\d+\.\d% > max_bad_shard_fraction 1.0%\): "
                                                r".*0000[123]\.tar \((truncated|unreadable|empty)_shard\)\. Check"):
        with pytest.warns(BadSampleWarning):
            with make_train_loader({**spec, "max_bad_shard_fraction": 0.01}, CharTokenizer(), batch_size=2, seed=0,
                                   num_workers=workers) as loader:
                list(loader)


def test_nothing_readable_is_a_clear_error(tmp_path):
    _damaged_set(tmp_path)
    spec = {**SPEC, "shards": str(tmp_path / "0000{2..3}.tar"), "max_bad_shard_fraction": 1.0}
    with pytest.raises(shards.ShardError, match=r"no sample could be read .*0000[23].tar: (unreadable|empty)_shard"):
        with pytest.warns(BadSampleWarning):
            with make_train_loader(spec, CharTokenizer(), batch_size=2, seed=0, num_workers=0) as loader:
                next(loader)


def test_too_many_bad_samples_fails_clearly(tmp_path):
    bad = {i: {"jpg": b"garbage", "txt": b"x"} for i in range(0, 16, 3)}
    pattern = write_set(tmp_path, n_shards=2, per_shard=8, bad=bad)
    spec = {**SPEC, "shards": pattern, "max_bad_fraction": 0.1, "bad_check_after": 8, "warn_limit": 2}
    with pytest.warns(BadSampleWarning) as rec:
        with pytest.raises(TooManyBadSamples, match=r"skipped \(.*> max_bad_fraction 10.0%\).*corrupt_image"):
            with make_train_loader(spec, CharTokenizer(), batch_size=4, seed=0, num_workers=1) as loader:
                for _ in range(10):
                    next(loader)
    assert len(rec) == 2 and "suppressed" in str(rec[1].message)  # warn_limit=2


# ----------------------------------------------------------------------------- eval loader

def test_eval_loader_image_folder_and_cls_shards(tmp_path):
    """Class folders and the ``.cls`` shards ``from_folders`` writes from them give the same batches; a
    truncated evaluation shard is named and its intact samples kept."""
    from hetclip.data.tools import from_folders
    from hetclip.zero_shot import datasets as ds

    rng = np.random.default_rng(0)
    root = tmp_path / "folders"
    for c, n in (("n01", 3), ("n00", 2)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    folder = ds.ImageFolder(str(root))
    assert folder.classnames == ["n00", "n01"]
    with ds.eval_batches(folder, 8, 2, workers=0) as loader:
        batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    assert np.concatenate([b["label"] for b in batches]).tolist() == [0, 0, 1, 1, 1]
    n, problems = from_folders(str(root), str(tmp_path / "eval"), shard_size=2)
    assert n == 5 and not problems
    wds = ds.WdsClassification(str(tmp_path / "eval/{00000..00002}.tar"))
    assert wds.classnames == ["n00", "n01"]
    with ds.eval_batches(wds, 8, 4, workers=1) as loader:
        sb = list(loader)
    assert np.concatenate([b["label"] for b in sb]).tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in sb]),
                                  np.concatenate([b["image"] for b in batches]))
    victim = tmp_path / "eval" / "00001.tar"
    victim.write_bytes(victim.read_bytes()[:700])      # inside the first member of the middle shard
    with pytest.warns(BadSampleWarning, match=r"00001\.tar.*truncated_shard"):
        got = list(ds.eval_batches(ds.WdsClassification(str(tmp_path / "eval")), 8, 4, workers=0))
    assert np.concatenate([b["label"] for b in got]).tolist() == [0, 0, 1]   # shards 0 and 2 intact
