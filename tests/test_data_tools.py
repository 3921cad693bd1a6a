"""hetclip-shards: writing train/eval shards (round trip) and stats/check reports."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from hetclip.data import tools
from hetclip.data.shards import iter_shard


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    names = []
    for i in range(7):
        ext = ["jpg", "png", "bmp"][i % 3]
        name = f"im{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(d / name)
        names.append(name)
    return d, names


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_from_captions_round_trip(tmp_path, images, fmt, capsys):
    d, names = images
    caps = tmp_path / f"caps.{fmt}"
    rows = [(n, f"a photo number {i}, \"quoted\"") for i, n in enumerate(names)]
    if fmt == "jsonl":
        caps.write_text("".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in rows))
    else:
        with open(caps, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow(["filepath", "caption"])
            w.writerows(rows)
    out = tmp_path / "out"
    assert tools.main(["from-captions", str(d), str(caps), str(out), "--shard-size", "3"]) == 0
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1}
    samples = [s for k in range(3) for s in iter_shard(str(out / f"{k:05d}.tar"))]
    assert [s["__key__"] for s in samples[:4]] == ["000000000", "000000001", "000000002", "000010000"]
    for s, (name, cap) in zip(samples, rows, strict=True):
        assert s["txt"].decode() == cap and json.loads(s["json"]) == {"caption": cap, "source": name}
        ext = "png" if name.endswith("bmp") else name.split(".")[1]
        assert set(s) == {"__key__", "__url__", ext, "txt", "json"}
        ref = np.asarray(Image.open(d / name).convert("RGB"))
        got = np.asarray(Image.open(io.BytesIO(s[ext])).convert("RGB"))
        if ext != "jpg":
            np.testing.assert_array_equal(got, ref)  # PNG and re-encoded BMP are lossless
        else:
            assert s[ext] == (d / name).read_bytes()  # JPEG bytes stored as they are
    assert tools.main(["check", str(out / "{00000..00002}.tar")]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_from_captions_reports_missing_images_and_captions(tmp_path, images, capsys):
    d, names = images
    caps = tmp_path / "caps.csv"
    caps.write_text("image,text\n" + f"{names[0]},ok\nmissing.jpg,gone\n{names[1]},\n")
    assert tools.main(["from-captions", str(d), str(caps), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "caps.csv:3: image" in err and "missing.jpg" in err and "caps.csv:4: empty caption" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    assert tools.main(["from-captions", str(d), str(bad), str(tmp_path / "o2")]) == 2
    assert "lacks an image column" in capsys.readouterr().err


def test_from_folders_layout(tmp_path, images):
    d, names = images
    root = tmp_path / "cls"
    for c in ("dog", "cat"):
        (root / c).mkdir(parents=True)
    for i, n in enumerate(names[:4]):
        (root / ("cat" if i < 3 else "dog") / n).write_bytes((d / n).read_bytes())
    readable = tmp_path / "names.txt"
    readable.write_text("a cat\na dog\n")
    assert tools.main(["from-folders", str(root), str(tmp_path / "ev"), "--classnames", str(readable)]) == 0
    assert (tmp_path / "ev" / "classnames.txt").read_text().splitlines() == ["a cat", "a dog"]
    labels = [int(s["cls"]) for s in iter_shard(str(tmp_path / "ev" / "00000.tar"))]
    assert labels == [0, 0, 0, 1]
    assert tools.main(["check", str(tmp_path / "ev/00000.tar"), "--label-key", "cls"]) == 0


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_stats_and_check_find_problems(tmp_path, capsys):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    good = buf.getvalue()
    _tar(tmp_path / "00000.tar", [("k0.jpg", good), ("k0.txt", b"fine"), ("k1.jpg", b"corrupt!"),
                                  ("k1.txt", b"bad image"), ("k2.jpg", good), ("k3.jpg", good),
                                  ("k3.txt", b"")])
    _tar(tmp_path / "00001.tar", [("j0.jpg", good), ("j0.txt", b"x")])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:700])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 5}))
    pattern = str(tmp_path / "0000{0..1}.tar")
    assert tools.main(["stats", pattern]) == 1
    out = capsys.readouterr().out
    assert "missing_caption" in out and "key " + str(tmp_path / "00000.tar") not in out
    assert f"{tmp_path / '00000.tar'} key k2: no txt" in out
    assert "empty_caption" in out and "size_mismatch" in out and "truncated_shard" in out
    assert "corrupt_image" not in out  # stats does not decode
    assert tools.main(["check", pattern, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    reasons = {(os.path.basename(p["shard"]), p["key"], p["reason"]) for p in report["problems"]}
    assert ("00000.tar", "k1", "corrupt_image") in reasons and ("00001.tar", None, "truncated_shard") in reasons
    assert report["samples"] == 4
    assert tools.main(["stats", str(tmp_path / "nope-{0..2}.tar")]) == 2
    assert "matched no files" in capsys.readouterr().err


def test_check_names_an_empty_shard(tmp_path, capsys):
    _tar(tmp_path / "00000.tar", [])
    assert tools.main(["check", str(tmp_path / "00000.tar")]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM empty_shard: {tmp_path / '00000.tar'}: the shard holds no sample" in out
    assert "no problems found" not in out


def test_console_script_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hetclip.data.tools", "stats", str(tmp_path / "none.tar")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "matched no files" in r.stderr and "Traceback" not in r.stderr
