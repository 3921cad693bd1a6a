"""Evaluators (``hetclip.evals``): the config entries, the old ``eval`` group, a plug-in evaluator run by the
trainer without a trainer edit on the training mesh's sharded parameters, and the held-out loss against
the loss computed by hand."""
import io
import json
import os
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from hetclip import config as config_lib
from hetclip import distributed as dist
from hetclip import evals
from hetclip import losses
from hetclip import workdir as workdir_lib
from hetclip.model import Encoders, init_params, normalize_images, preset

PLUGIN = '''
import jax
from jax.sharding import NamedSharding

DEFAULTS = {"offset": 0.0}
CALLS = []


class Evaluator:
    def __init__(self, spec, ctx):
        self.spec, self.ctx = spec, ctx

    def run(self, encoders):
        leaves = jax.tree.leaves(encoders.params)
        on_mesh = all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
                      and x.sharding.mesh.devices.size == self.ctx.mesh.devices.size for x in leaves)
        CALLS.append(on_mesh)
        return {"metrics": {"loss": float(encoders.logit_scale) + self.spec["offset"], "on_mesh": float(on_mesh)}}
'''


class _Ctx:
    def __init__(self, model_cfg):
        self.model_cfg = model_cfg


def test_entries_are_resolved_and_checked():
    spec = evals.resolve({"kind": "zero_shot", "dir": "d"})
    assert spec["name"] == "zero_shot" and spec["every_steps"] == 0 and spec["at_end"] and spec["batch_size"] == 256
    assert {"zero_shot", "retrieval", "contrastive"} <= set(evals.kinds())
    with pytest.raises(config_lib.ConfigError, match=r"evals.0.kind='zero-shot' is not an evaluator.*zero_shot"):
        evals.resolve({"kind": "zero-shot"}, "evals.0")
    with pytest.raises(config_lib.ConfigError, match=r"unknown key evals.1.templtes .*templates"):
        evals.resolve({"kind": "zero_shot", "templtes": "x"}, "evals.1")
    with pytest.raises(config_lib.ConfigError, match="every_steps=-1"):
        evals.resolve({"kind": "retrieval", "every_steps": -1})
    ctx = evals.Context(preset("tiny"), tokenizer=None)
    with pytest.raises(config_lib.ConfigError, match=r"names \['a'\] appear more than once"):
        evals.Suite([{"kind": "retrieval", "name": "a", "dir": "x"}, {"kind": "retrieval", "name": "a", "dir": "y"}], ctx)
    with pytest.raises(config_lib.ConfigError, match=r"evaluator 'imagenet' has no data: set --config.evals.0.dir"):
        evals.Suite([{"kind": "zero_shot", "name": "imagenet", "layout": "imagenet"}], ctx)
    with pytest.raises(config_lib.ConfigError, match="needs the HET-XL head"):
        evals.Suite([{"kind": "zero_shot", "dir": "x", "mc_samples": 4}], ctx)
    suite = evals.Suite([{"kind": "retrieval", "name": "r", "dir": "x", "every_steps": 3, "at_end": False},
                         {"kind": "retrieval", "name": "s", "dir": "x"}], ctx)
    assert [[ev.spec["name"] for ev in suite.due(s, 9)] for s in (3, 4, 6, 9)] == [["r"], [], ["r"], []]
    assert [ev.spec["name"] for ev in suite.at_end()] == ["s"]


def test_old_eval_group_is_converted_on_resume_and_refused_in_new_configs(tmp_path):
    old = {"every_steps": 100, "at_end": True, "batch_size": 64, "mc_samples": 8, "limit": 0,
           "tasks": [{"name": "imagenet", "dir": "/data/val", "classnames": "imagenet", "templates": "clip80"},
                     {"name": "shape", "dir": "d", "classnames": "d/classnames.txt", "templates": "d/t.txt"}]}
    cfg = config_lib.load_config("clip_b32")
    new = json.loads(config_lib.to_json(config_lib.apply_overrides(cfg, [
        "evals=[{'kind': 'zero_shot', 'name': 'imagenet', 'dir': '/data/val', 'layout': 'imagenet', "
        "'classnames': '', 'templates': 'clip80', 'every_steps': 100, 'at_end': True, 'batch_size': 64, "
        "'mc_samples': 8, 'limit': 0}, {'kind': 'zero_shot', 'name': 'shape', 'dir': 'd', 'layout': 'auto', "
        "'classnames': 'd/classnames.txt', 'templates': 'd/t.txt', 'every_steps': 100, 'at_end': True, "
        "'batch_size': 64, 'mc_samples': 8, 'limit': 0}]"])))
    stored = {k: v for k, v in new.items() if k != "evals"}
    stored["eval"] = old
    (tmp_path / "config.json").write_text(json.dumps(stored))
    workdir_lib.save_or_check_config(new, str(tmp_path), allow_change=False, write=False)  # the same run
    assert config_lib.upgrade_stored(stored)["evals"] == new["evals"]
    changed = dict(new, evals=[dict(new["evals"][0], every_steps=50), new["evals"][1]])
    with pytest.raises(config_lib.ConfigError, match=r"evals"):
        workdir_lib.save_or_check_config(changed, str(tmp_path), allow_change=False, write=False)
    with pytest.raises(config_lib.ConfigError, match="'eval' group became 'evals'"):
        config_lib.apply_overrides(cfg, ["eval.tasks.0.dir=/data/val"])
    path = tmp_path / "old_recipe.py"
    path.write_text("from hetclip.configs.clip_b32 import get_config as base\n\ndef get_config():\n"
                    "    c = base()\n    c.eval = dict(tasks=[])\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match="'eval' group became 'evals'"):
        config_lib.load_config(str(path))


def test_a_plugin_evaluator_runs_in_training_on_the_sharded_parameters(tmp_path, monkeypatch):
    from hetclip import train as train_lib
    from hetclip.configs._base import base_config
    from hetclip.data.bpe import train_bpe

    (tmp_path / "my_evals").mkdir()
    (tmp_path / "my_evals" / "__init__.py").write_text("")
    (tmp_path / "my_evals" / "probe.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    tok = tmp_path / "tok"
    train_bpe(["a red circle", "a blue square"] * 50, tok, vocab_size=600, context_length=16)
    c = base_config("tiny", vision=dict(width=32, layers=1, heads=2, patch_size=8, image_size=16),
                    text=dict(width=32, layers=1, heads=2, context_length=16), embed_dim=16)
    with c.unlocked():
        c.update(batch_size=16, total_steps=4, log_every=1, tensorboard=False)
        c.optim.update(lr=1e-3, warmup_steps=2)
        c.data.update(image_size=16, synthetic=True, num_workers=0,
                      tokenizer=dict(kind="hf", path=str(tok), context_length=16, lower_case=True))
        c.checkpoint.update(every_steps=0, async_save=False)
        c.mesh.fsdp = 2
        c.evals = [dict(kind="my_evals.probe", name="probe", every_steps=2, at_end=True, offset=1.0)]
    summary = train_lib.train(c, str(tmp_path / "run"), progress=False)
    from my_evals import probe

    assert probe.CALLS == [True, True]  # step 2 on the mesh; step 4 is the end (not run twice)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "my_evals.probe/probe/loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert summary["eval"]["probe"]["on_mesh"] == 1.0
    report = json.loads((tmp_path / "run" / "eval_step4.json").read_text())
    assert report["probe"]["metrics"]["loss"] == pytest.approx(summary["eval"]["probe"]["loss"])


def _pair_shards(path, n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "star"]
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            caption = " ".join(rng.choice(words, 3))
            for ext, data in (("png", buf.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_held_out_loss_equals_the_loss_by_hand(tmp_path):
    from hetclip.data.bpe import train_bpe
    from hetclip.data.tokenizers import load_tokenizer
    from hetclip.zero_shot import datasets as ds

    train_bpe(["red blue green circle square star"] * 30, tmp_path / "tok", vocab_size=600, context_length=8)
    tok = load_tokenizer({"kind": "hf", "path": str(tmp_path / "tok"), "context_length": 8, "lower_case": True})
    mcfg = preset("tiny", vision=dict(width=32, layers=1, heads=2, patch_size=8, image_size=16),
                  text=dict(width=32, layers=1, heads=2, context_length=8, vocab_size=tok.vocab_size,
                            eos_token_id=tok.eos_token_id), embed_dim=16)
    params = jax.device_get(init_params(mcfg, jax.random.key(0)))
    shards = _pair_shards(tmp_path / "pairs.tar", 20)
    mesh = dist.make_mesh(-1, 1, devices=jax.devices()[:4])
    ctx = evals.Context(mcfg, tok, mesh=mesh, workers=0)
    report = evals.build({"kind": "contrastive", "dir": str(shards), "batch_size": 8}, ctx).run(Encoders(mcfg, params))
    assert report["metrics"]["num_batches"] == 2 and report["metrics"]["images_left_out"] == 4
    with pytest.raises(ValueError, match=r"pairs.tar holds fewer than batch_size=32 usable samples"):
        evals.build({"kind": "contrastive", "name": "small", "dir": str(shards), "batch_size": 32}, ctx).run(
            Encoders(mcfg, params))
    enc = Encoders(mcfg, params)
    by_hand = []
    batches = ds.eval_batches(ds.WdsRetrieval(str(shards)), 16, 8, workers=0)
    for batch in list(batches)[:2]:
        img = enc.model.apply({"params": params}, normalize_images(jax.numpy.asarray(batch["image"])),
                              method=enc.model.encode_image)["mean"]
        txt = enc.model.apply({"params": params}, np.asarray(tok([c[0] for c in batch["label"]])),
                              method=enc.model.encode_text)
        by_hand.append(float(losses.clip_loss_naive(img, txt, enc.logit_scale)[0]))
    assert report["metrics"]["loss"] == pytest.approx(np.mean(by_hand), rel=1e-4)
