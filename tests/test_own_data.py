"""Your own data on the small recipe: image files + captions.csv -> shards -> BPE -> ``--config demo`` with
``data.shards`` -> zero-shot -> export. The demo recipe given shards trains on them (never on its own
demo data), and the run records the shards and tokenizer its loader read."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hetclip import checkpoint as ckpt_lib
from hetclip import train as train_lib
from hetclip.data import bpe, tools

BIN = os.path.dirname(sys.executable)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
# The demo recipe made tiny: every override is an ordinary --config key a user could pass.
SMALL = ["--config.model.vision.width=32", "--config.model.vision.layers=1", "--config.model.vision.heads=2",
         "--config.model.vision.image_size=32", "--config.data.image_size=32", "--config.model.text.width=32",
         "--config.model.text.layers=1", "--config.model.text.heads=2", "--config.model.embed_dim=16",
         "--config.batch_size=16", "--config.data.num_workers=1", "--config.data.shuffle_buffer=32",
         "--config.optim.warmup_steps=1", "--config.total_steps=4", "--config.checkpoint.every_steps=0",
         "--config.log_every=1", "--no-progress"]


def _image(rng, colour):
    img = Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(200, 256, 3)))
    x, y = (int(v) for v in rng.integers(0, 20, 2))
    ImageDraw.Draw(img).rectangle([x, y, x + 18, y + 18], fill=COLOURS[colour])
    return img


def make_own_data(root, per_colour=12, eval_per_colour=3):
    """``root/images/*.png`` + ``root/captions.csv`` (filepath, caption) and a held-out class folder
    ``root/eval/<colour>/`` with ``classnames.txt`` and a CLIP-style (``{}``) templates file."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for i in range(per_colour):
            for colour in COLOURS:
                name = f"{colour}_{i}.png"
                _image(rng, colour).save(root / "images" / name)
                w.writerow([name, f"a {colour} square on a pale background"])
    for colour in COLOURS:
        (root / "eval" / colour).mkdir(parents=True)
        for i in range(eval_per_colour):
            _image(rng, colour).save(root / "eval" / colour / f"{i}.png")
    (root / "eval" / "classnames.txt").write_text("\n".join(sorted(COLOURS)) + "\n")
    (root / "templates.txt").write_text("a {} square.\na photo of a {} square on a pale background.\n")
    return root


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Own data made into shards (3 of 16 samples) and a BPE tokenizer, with the tools' own entry points."""
    root = make_own_data(tmp_path_factory.mktemp("own"))
    assert tools.main(["from-captions", str(root / "images"), str(root / "captions.csv"), str(root / "shards"),
                       "--shard-size", "16"]) == 0
    pattern = str(root / "shards" / "{00000..00002}.tar")
    assert bpe.main(["--shards", pattern, "--vocab-size", "600", "--min-frequency", "1", "--context-length", "24",
                     "--out", str(root / "tokenizer")]) == 0
    return {"root": root, "shards": pattern, "tokenizer": str(root / "tokenizer")}


def _loader_shards(monkeypatch):
    """Record the ``shards`` every training loader is built with."""
    from hetclip.data import loader

    seen = []
    original = loader.make_train_loader

    def spy(spec, *args, **kwargs):
        seen.append(spec["shards"])
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(loader, "make_train_loader", spy)
    return seen


def test_demo_recipe_with_named_shards_trains_on_them_and_records_them(own, tmp_path, monkeypatch, capsys):
    seen = _loader_shards(monkeypatch)
    work, demo_dir = tmp_path / "mine", tmp_path / "demo_data"
    rc = train_lib.main(["--config", "demo", "--workdir", str(work), f"--config.demo.dir={demo_dir}",
                         f"--config.data.shards={own['shards']}", f"--config.data.tokenizer.path={own['tokenizer']}",
                         *SMALL])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    said = [line for line in err.splitlines() if "data.shards is given" in line]
    assert len(said) == 1 and own["shards"] in said[0] and "without generating the demo data" in said[0]
    assert seen == [own["shards"]]                      # what the loader read ...
    assert not demo_dir.exists()                        # ... never the demo data
    assert "zero-shot" not in out                       # the demo's shape/colour tasks were not run
    config = json.loads((work / "config.json").read_text())
    _, meta = ckpt_lib.read_meta(str(work))
    for recorded in (config, meta["config"]):           # ... is what the run records
        assert recorded["data"]["shards"] == own["shards"] and not recorded["demo"]["enabled"]
        assert recorded["data"]["tokenizer"]["path"] == own["tokenizer"] and recorded["evals"] == []
    assert meta["tokenizer"]["path"] == "tokenizer"     # the tokenizer's files, copied into the run
    assert json.loads((work / "tokenizer" / "tokenizer.json").read_text()) == \
        json.loads((own["root"] / "tokenizer" / "tokenizer.json").read_text())
    # the same command again resumes: the recorded config is the one the command makes
    assert train_lib.main(["--config", "demo", "--workdir", str(work), f"--config.demo.dir={demo_dir}",
                           f"--config.data.shards={own['shards']}",
                           f"--config.data.tokenizer.path={own['tokenizer']}", *SMALL]) == 0


def test_demo_recipe_with_shards_but_no_tokenizer_is_refused_in_one_line(own, tmp_path, capsys):
    work = tmp_path / "mine"
    rc = train_lib.main(["--config", "demo", "--workdir", str(work), f"--config.data.shards={own['shards']}",
                         *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "data.tokenizer.path is empty" in err
    assert "hetclip-train-bpe" in err and not work.exists()


def test_demo_recipe_without_shards_records_the_demo_data_it_read(tmp_path, monkeypatch, capsys):
    seen = _loader_shards(monkeypatch)
    work, demo_dir = tmp_path / "demo_run", tmp_path / "demo_data"
    rc = train_lib.main(["--config", "demo", "--workdir", str(work), f"--config.demo.dir={demo_dir}",
                         "--config.demo.params.num_train=64", "--config.demo.params.shard_size=32",
                         "--config.demo.params.eval_per_class=1", "--config.demo.params.eval_per_combo=1",
                         "--config.evals=[]", *SMALL])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert len(seen) == 1 and seen[0].startswith(str(demo_dir))
    config = json.loads((work / "config.json").read_text())
    _, meta = ckpt_lib.read_meta(str(work))
    for recorded in (config, meta["config"]):
        assert recorded["data"]["shards"] == seen[0] and recorded["demo"]["enabled"]
        assert recorded["data"]["tokenizer"]["path"] == str(demo_dir / "tokenizer")


def command(name, *args, cwd):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", HF_HUB_OFFLINE="1")
    return subprocess.run([os.path.join(BIN, name), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_the_readme_small_recipe_path_end_to_end(tmp_path):
    """The README's own-data commands with the installed tools, relative paths as a user types them."""
    make_own_data(tmp_path)
    steps = [
        ("hetclip-shards", "from-captions", "images/", "captions.csv", "shards/", "--shard-size", "16"),
        ("hetclip-shards", "check", "shards/{00000..00002}.tar"),
        ("hetclip-train-bpe", "--shards", "shards/{00000..00002}.tar", "--vocab-size", "600", "--min-frequency", "1",
         "--context-length", "24", "--out", "tokenizer/"),
        ("hetclip-train", "--config", "demo", "--workdir", "runs/mine", "--config.data.shards=shards/{00000..00002}.tar",
         "--config.data.tokenizer.path=tokenizer/", *SMALL),
        ("hetclip-zero-shot", "--checkpoint", "runs/mine", "--data", "eval", "--classnames", "eval/classnames.txt",
         "--templates", "templates.txt", "--no-progress"),
        ("hetclip-export", "--checkpoint", "runs/mine", "--format", "hf", "--out", "export/mine_hf"),
    ]
    outputs = []
    for tool, *args in steps:
        res = command(tool, *args, cwd=tmp_path)
        assert res.returncode == 0, f"{tool} {args}: {res.stderr[-3000:]}"
        outputs.append(res)
    assert "no problems found" in outputs[1].stdout
    assert "trained runs/mine: step 4 of 4" in outputs[3].stdout and "exported (hf) to" in outputs[3].stdout
    assert not (tmp_path / "demo_data").exists()
    zero_shot = outputs[4]
    assert "top1" in zero_shot.stdout and zero_shot.stderr == ""       # results only: no warnings
    assert (outputs[5].stdout + outputs[5].stderr).strip() == "hetclip-export: wrote hf export to export/mine_hf"
    assert (tmp_path / "export" / "mine_hf" / "model.safetensors").is_file()
