"""Training: the step (1 vs 8 devices, accumulation), optimizer pieces, guards, resume."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hetclip import config as config_lib
from hetclip import distributed as dist
from hetclip import optim as optim_lib
from hetclip import losses
from hetclip import runsetup
from hetclip import step as step_lib
from hetclip import train as train_lib
from hetclip.configs._base import base_config
from hetclip.data.bpe import train_bpe
from hetclip.data.tokenizers import load_tokenizer
from hetclip.model import normalize_images

WORDS = "a photo of the red green blue small large circle square triangle star on background".split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=6)) for _ in range(300)]
    train_bpe(texts, out, vocab_size=600, context_length=16)
    return str(out)


def tiny_config(tokenizer_dir, *, het=False, loss="softmax", batch=16, steps=6):
    c = base_config("tiny", het=het, vision=dict(width=32, layers=1, heads=2, patch_size=8, image_size=16),
                    text=dict(width=32, layers=1, heads=2, context_length=16), embed_dim=16, loss=loss)
    with c.unlocked():
        c.model.het.update(num_factors=3, mc_samples=4 if het else 0, sample_chunk=3)
        c.batch_size = batch
        c.total_steps = steps
        c.log_every = 1
        c.tensorboard = False
        c.optim.update(lr=1e-3, warmup_steps=2)
        c.data.update(image_size=16, synthetic=True, num_workers=0,
                      tokenizer=dict(kind="hf", path=tokenizer_dir, context_length=16, lower_case=True))
        c.checkpoint.update(every_steps=2, keep=2, async_save=False)
    c.lock()
    return c


def _batch(cfg, tok, n, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.data.image_size
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]
    return {"image": rng.standard_normal((n, s, s, 3)).astype(np.float32), "text": tok(texts)}


def _step_once(cfg, tok, devices, accum=1, seed=0, fsdp=1, batch=None, flops=False):
    mcfg = runsetup.model_config(cfg, tok)
    mesh = dist.make_mesh(-1, fsdp, devices=devices)
    from hetclip.model import init_params

    params = init_params(mcfg, jax.random.key(1))
    params = jax.device_put(params, dist.tree_shardings(mesh, params))
    opt, _ = optim_lib.make_optimizer(cfg, params, cfg.total_steps)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.asarray(0)}
    step = jax.jit(step_lib.make_train_step(mcfg, opt, mesh, accum, optim_lib.frozen_groups(cfg)))
    batch = dist.global_batch(_batch(cfg, tok, cfg.batch_size, seed) if batch is None else batch, mesh)
    if flops:
        return step.lower(state, batch, jax.random.key(7)).compile().cost_analysis()["flops"]
    new, metrics = step(state, batch, jax.random.key(7))
    return jax.device_get(new["params"]), jax.device_get(metrics)


def _close(a, b, rtol=2e-4, atol=2e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_a_frozen_tower_gets_no_gradient_no_backward_pass_and_no_share_of_the_clip(tokenizer_dir):
    """LiT: ``freeze.image`` keeps the image tower fixed, leaves it out of the gradient norm that the clipping
    and the logged ``grad_norm`` use (accumulated step), and compiles a step without the image backward pass."""
    from hetclip.model import DualEncoder, init_params, loss_embeddings

    cfg = tiny_config(tokenizer_dir)
    tok = load_tokenizer(cfg.data.tokenizer.to_dict())
    devices = jax.devices()[:2]
    full = _step_once(cfg, tok, devices, flops=True)
    with cfg.unlocked():
        cfg.freeze.image = True
    assert _step_once(cfg, tok, devices, flops=True) < 0.85 * full
    p_new, metrics = _step_once(cfg, tok, devices, accum=2)
    mcfg = runsetup.model_config(cfg, tok)
    p0 = jax.device_get(init_params(mcfg, jax.random.key(1)))
    image = {k for k in p0 if optim_lib.param_group((k,)) == "image"}
    assert image and all(np.array_equal(a, b) for k in image for a, b in
                         zip(jax.tree.leaves(p0[k]), jax.tree.leaves(p_new[k])))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0["text_projection"]),
                                                           jax.tree.leaves(p_new["text_projection"])))
    # reference: the full gradient of the same loss, the image tower's part dropped
    mesh = dist.make_mesh(-1, 1, devices=devices)
    model, loss_fn = DualEncoder(mcfg), losses.for_model(mcfg, mesh, dist.BATCH_AXES)
    batch = dist.global_batch(_batch(cfg, tok, cfg.batch_size), mesh)
    batch = dict(batch, image=normalize_images(batch["image"]))
    grads = jax.grad(lambda p: loss_fn(loss_embeddings(model, p, batch),
                                       model.apply({"params": p}, method=DualEncoder.loss_inputs),
                                       jax.random.key(7))[0])(p0)
    trainable = {k: v for k, v in grads.items() if k not in image}
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(trainable), rtol=1e-4)
    assert optax.tree.norm({k: grads[k] for k in image}) > 0.1 * optax.tree.norm(trainable)  # it would count


@pytest.mark.parametrize("het,loss", [(False, "softmax"), (True, "softmax"), (False, "sigmoid")])
def test_one_step_on_8_devices_equals_one_device(tokenizer_dir, het, loss):
    cfg = tiny_config(tokenizer_dir, het=het, loss=loss)
    tok = load_tokenizer(cfg.data.tokenizer.to_dict())
    p1, m1 = _step_once(cfg, tok, jax.devices()[:1])
    p8, m8 = _step_once(cfg, tok, jax.devices()[:8])
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    _close(p1, p8)


def test_uint8_batches_are_normalised_in_the_step_as_on_the_host(tokenizer_dir):
    from hetclip.data import decode

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    u8[0, 0, :2] = [[0, 0, 0], [255, 255, 255]]
    device = np.asarray(jax.jit(normalize_images)(u8))
    reference = (u8 / 255.0 - np.asarray(decode.CLIP_MEAN)) / np.asarray(decode.CLIP_STD)  # float64
    assert device.dtype == np.float32
    assert np.abs(device - reference).max() <= 1e-6
    assert np.abs(device - decode.normalize(u8)).max() <= 1e-6
    # a whole step on uint8 rows equals the step on the host-normalised float rows
    cfg = tiny_config(tokenizer_dir, het=True)
    tok = load_tokenizer(cfg.data.tokenizer.to_dict())
    rows = _batch(cfg, tok, cfg.batch_size)
    rows["image"] = rng.integers(0, 256, rows["image"].shape, dtype=np.uint8)
    p_u8, m_u8 = _step_once(cfg, tok, jax.devices()[:8], batch=rows)
    p_f32, m_f32 = _step_once(cfg, tok, jax.devices()[:8], batch=dict(rows, image=decode.normalize(rows["image"])))
    np.testing.assert_allclose(m_u8["loss"], m_f32["loss"], rtol=1e-6)
    _close(p_u8, p_f32, rtol=1e-5, atol=1e-6)  # Adam turns ulp-level gradient noise into ~lr*1e-4


def test_fsdp_mesh_step_equals_one_device(tokenizer_dir):
    cfg = tiny_config(tokenizer_dir, het=True)
    tok = load_tokenizer(cfg.data.tokenizer.to_dict())
    p1, m1 = _step_once(cfg, tok, jax.devices()[:1])
    p8, m8 = _step_once(cfg, tok, jax.devices()[:8], fsdp=4)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    _close(p1, p8)


def test_fsdp_rule_shards_large_params_only():
    from jax.sharding import PartitionSpec as P

    assert dist.fsdp_spec((512, 2048), 4) == P(None, "fsdp")
    assert dist.fsdp_spec((6, 4096), 4) == P(None, "fsdp")
    assert dist.fsdp_spec((10,), 4) == P()
    assert dist.fsdp_spec((4099, 3), 4) == P()
    assert dist.fsdp_spec((512, 2048), 1) == P()


@pytest.mark.parametrize("het", [False, True])
def test_gradient_accumulation_keeps_whole_batch_negatives(tokenizer_dir, het):
    cfg = tiny_config(tokenizer_dir, het=het)
    tok = load_tokenizer(cfg.data.tokenizer.to_dict())
    p1, m1 = _step_once(cfg, tok, jax.devices()[:2], accum=1)
    p4, m4 = _step_once(cfg, tok, jax.devices()[:2], accum=4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
    _close(p1, p4)


def test_micro_split_and_merge_are_inverse():
    x = jnp.arange(48).reshape(24, 2)
    y = step_lib._micro_split(x, 3, 4)
    assert y.shape == (3, 8, 2)
    # micro-batch 0 takes the first 2 rows of each of the 4 device shards
    np.testing.assert_array_equal(y[0, :, 0], [0, 2, 12, 14, 24, 26, 36, 38])
    np.testing.assert_array_equal(step_lib._micro_merge(y, 4), x)


def test_weight_decay_mask_groups_and_freezing(tokenizer_dir):
    cfg = tiny_config(tokenizer_dir)
    with cfg.unlocked():
        cfg.freeze.image = True
        cfg.optim.lr_mults.text = 0.0
    tok = load_tokenizer(cfg.data.tokenizer.to_dict())
    p0 = jax.device_get(__import__("hetclip.model", fromlist=["x"]).init_params(
        runsetup.model_config(cfg, tok), jax.random.key(1)))
    p1, _ = _step_once(cfg, tok, jax.devices()[:1])
    _close(p0["vision_model"], p1["vision_model"], rtol=0, atol=0)
    _close(p0["text_model"], p1["text_model"], rtol=0, atol=0)
    assert not np.array_equal(p0["temperature"]["log_scale"], p1["temperature"]["log_scale"])


def test_weight_decay_multiplier_per_group():
    """With zero gradients AdamW's update is the decay alone, ``-lr * wd * w`` on matrices: ``wd_mults.head=0``
    leaves the HET-XL head's matrices alone and still decays the text tower's."""
    from hetclip.configs._base import base_config
    from hetclip.model import init_params, preset

    cfg = config_lib.apply_overrides(base_config("tiny", het=True), [
        "optim.wd_mults.head=0.0", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=0.5",
        "optim.weight_decay=0.1", "optim.grad_clip=0.0"])
    params = jax.device_get(init_params(preset("tiny", het={"enabled": True}), jax.random.key(0)))
    opt, _ = optim_lib.make_optimizer(cfg, params, 10)
    updates, _ = opt.update(jax.tree.map(np.zeros_like, params), opt.init(params), params)
    head_kernel = updates["het_head"]["diag"]["kernel"]
    assert np.abs(head_kernel).max() == 0.0
    text_kernel = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_allclose(updates["text_model"]["embeddings"]["token_embedding"]["embedding"], -0.5 * 0.1 * text_kernel,
                               rtol=1e-5, atol=1e-8)


def test_schedule_warmup_then_cosine():
    o = ml_collections.ConfigDict(dict(lr=1.0, warmup_init_lr=0.1, warmup_steps=10, schedule="cosine",
                                       end_lr=0.0, rsqrt_timescale=10))
    s = optim_lib.make_schedule(o, 110)
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.5, abs=1e-3)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(config_lib.ConfigError, match="warmup_steps"):
        optim_lib.make_schedule(o, 5)


def test_bad_batch_for_mesh_is_a_clear_error(tokenizer_dir, tmp_path):
    cfg = tiny_config(tokenizer_dir, batch=12)
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        train_lib.train(cfg, str(tmp_path / "w"), progress=False)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_resume_and_config_guard(tokenizer_dir, tmp_path):
    cfg = tiny_config(tokenizer_dir, het=True, steps=6)
    straight = str(tmp_path / "straight")
    train_lib.train(cfg, straight, progress=False)
    resumed = str(tmp_path / "resumed")
    train_lib.train(cfg, resumed, progress=False, max_steps=4)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints")))[-1] == "4"
    train_lib.train(cfg, resumed, progress=False)
    a = {r["step"]: r["loss"] for r in _metrics(straight)}
    b = {r["step"]: r["loss"] for r in _metrics(resumed)}
    assert set(a) == set(b) == set(range(1, 7))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5), s
    changed = config_lib.apply_overrides(cfg, ["optim.lr=0.5"])
    with pytest.raises(config_lib.ConfigError, match="optim.lr: 0.001 -> 0.5"):
        train_lib.train(changed, resumed, progress=False)


def test_guard_keeps_the_first_non_finite_step():
    def fake_step(state, batch, key):
        return {"step": state["step"] + 1}, {"loss": batch[0], "grad_norm": batch[1], "param_norm": jnp.float32(2)}

    step = jax.jit(step_lib.guarded(fake_step), donate_argnums=(0, 1))
    state, guard = {"step": jnp.asarray(0, jnp.int32)}, step_lib.new_guard()
    for row in ((1.0, 1.0), (2.0, 1.0), (3.0, np.inf), (np.nan, 1.0), (4.0, 1.0)):
        step_lib.check_guard(jax.device_get(guard)) if int(state["step"]) < 2 else None
        state, guard, _ = step(state, guard, jnp.asarray(row, jnp.float32), jax.random.key(0))
    g = jax.device_get(guard)
    assert int(g["step"]) == 3
    with pytest.raises(train_lib.TrainingError, match=r"non-finite grad_norm \(inf\) at step 3;"):
        step_lib.check_guard(g)


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_with_step_and_keeps_checkpoint(tokenizer_dir, tmp_path, log_every):
    cfg = tiny_config(tokenizer_dir, steps=8)
    work = str(tmp_path / "w")
    train_lib.train(cfg, work, progress=False, max_steps=2)
    ckpt_dir = os.path.join(work, "checkpoints", "2")
    before = sorted(os.listdir(ckpt_dir))
    # with log_every=4 the metrics are first read at step 4 (a checkpoint step): the guard still names step 3
    bad = config_lib.apply_overrides(cfg, ["optim.lr=1e30", f"log_every={log_every}"])
    with pytest.raises(train_lib.TrainingError, match=r"non-finite .* at step 3"):
        train_lib.train(bad, work, progress=False, allow_config_change=True)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]
    assert sorted(os.listdir(ckpt_dir)) == before
    from hetclip.checkpoint import load_params

    step, params, _ = load_params(work)
    assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def _age_keys(d: dict, model_prefix: str = "") -> dict:
    """Rename the present keys back to the names they had before and drop the keys added since (as an
    older hetclip wrote them)."""
    for key in config_lib.ADDED_KEYS:
        if not key.startswith(model_prefix):
            continue
        *parents, last = key[len(model_prefix):].split(".")
        node = d
        for part in parents:
            node = node[part]
        node.pop(last)
    for old, new in config_lib.RENAMED_KEYS.items():
        if not new.startswith(model_prefix):
            continue
        *parents, last = new[len(model_prefix):].split(".")
        node = d
        for part in parents:
            node = node[part]
        node[old.rsplit(".", 1)[1]] = node.pop(last)
    return d


def test_a_run_written_with_old_key_names_resumes_and_loads(tokenizer_dir, tmp_path):
    from hetclip.checkpoint import load_run

    cfg = tiny_config(tokenizer_dir, het=True, steps=4)
    work = tmp_path / "old"
    train_lib.train(cfg, str(work), progress=False, max_steps=2)
    config_json = work / "config.json"
    config_json.write_text(json.dumps(_age_keys(json.loads(config_json.read_text()))))
    metas = [p for p in (work / "checkpoints").glob("*/meta/*") if p.is_file() and '"model"' in p.read_text()]
    assert metas
    for p in metas:
        meta = json.loads(p.read_text())
        _age_keys(meta["config"])
        _age_keys(meta["model"], "model.")
        assert "num_samples" in meta["model"]["het"] and "num_samples" in meta["config"]["data"]
        p.write_text(json.dumps(meta))
    old = load_run(str(work))  # evaluation / export of the old run
    assert old.step == 2 and old.model_cfg.het.mc_samples == 4
    assert old.meta["config"]["data"]["epoch_size"] == 0 and "num_samples" not in old.meta["config"]["data"]
    assert old.model_cfg.het.noise_space == "embedding"  # a key added since: the stored run's behaviour
    summary = train_lib.train(cfg, str(work), progress=False)  # resume (no --allow-config-change)
    assert summary["step"] == 4 and load_run(str(work)).model_cfg.het.mc_samples == 4
    last = summary["last_metrics"]  # the head's size is watched: in the summary and its printed form
    assert last["step"] == 4 and last["het/angular"] > 0 and last["het/angular_spread"] >= 0
    assert "HET-XL head at step 4: angular noise" in train_lib._summary_text(summary)
    rows = _metrics(str(work))
    assert all("het/angular" in r and "het/mean_norm" in r for r in rows if "loss" in r)
