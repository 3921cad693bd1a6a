"""Contrastive training on cached image features: a locked image tower (LiT) runs once over the data, then the
text tower, temperature and (HET-XL) head train with the library's own step (``hetclip.step.make_train_step``
on ``{"features", "text"}`` batches: ``DualEncoder.project_image`` takes over after the tower). With the
tower out of the loop a 1000-step run of the demo model takes seconds to a minute on 2 CPU cores, so the
HET-XL studies (``evidence_collapse.py``, ``evidence_control.py``) can afford many settings and seeds.

What differs from ``hetclip-train`` with ``freeze.image``: no augmentation (each image has one cached view, the
evaluation crop) and batches drawn by a seeded permutation of the in-memory samples.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hetclip import config as config_lib
from hetclip import distributed as dist
from hetclip import noise as noise_lib
from hetclip.data import decode, shards
from hetclip.model import DualEncoder, init_params, normalize_images
from hetclip.optim import frozen_groups, make_optimizer
from hetclip.runsetup import model_config
from hetclip.step import make_train_step
from hetclip.zero_shot import uncertainty
from hetclip.zero_shot.classifier import build_classifier
from hetclip.zero_shot.evaluate import deterministic_log_probs, mc_log_probs
from hetclip.zero_shot.metrics import ClassificationMeter

IMAGE_GROUP = ("vision_model", "visual_projection")


@dataclasses.dataclass
class Tower:
    """A pretrained model whose image side (``IMAGE_GROUP``) is locked, and its tokenizer."""
    model_cfg: object
    params: dict
    tokenizer: object
    path: str


def use_compilation_cache(path: str) -> None:
    """Keep compiled programs in ``path`` across runs: arms that differ only in their seed compile once."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_tower(path: str) -> Tower:
    """A training run directory or an HF export (``hetclip.zero_shot.evaluate.load_model``)."""
    from hetclip.zero_shot.evaluate import load_model

    m = load_model(path)
    return Tower(m["encoders"].config, jax.device_get(m["encoders"].params), m["tokenizer"], os.path.abspath(path))


@dataclasses.dataclass
class Samples:
    """Images (uint8, the evaluation crop) with captions or labels and per-image metadata."""
    images: np.ndarray
    captions: Optional[list] = None
    labels: Optional[np.ndarray] = None
    meta: Optional[list] = None
    classnames: Optional[list] = None
    templates: Optional[list] = None


def read_train(data_dir: str, image_size: int) -> Samples:
    """The training shards of a demo data directory (``manifest.json`` lists them), in order."""
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    images, captions, meta = [], [], []
    for name in manifest["train"]["shards"]:
        for s in shards.iter_shard(os.path.join(data_dir, "train", name)):
            ext = next(e for e in s if shards.is_image_name("x." + e))
            images.append(decode.eval_transform_uint8(s[ext], image_size))
            captions.append(s["txt"].decode("utf-8"))
            meta.append(json.loads(s["json"]))
    return Samples(np.stack(images), captions=captions, meta=meta)


def read_eval(task_dir: str, image_size: int) -> Samples:
    """A demo evaluation task (class folders, ``meta.jsonl``, ``classnames.txt``, ``templates.txt``)."""
    with open(os.path.join(task_dir, "meta.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    images = np.stack([decode.eval_transform_uint8(os.path.join(task_dir, r["path"]), image_size) for r in rows])

    def lines(name):
        with open(os.path.join(task_dir, name)) as f:
            return [x.strip() for x in f if x.strip()]

    return Samples(images, labels=np.asarray([r["label"] for r in rows], np.int32), meta=rows,
                   classnames=lines("classnames.txt"), templates=lines("templates.txt"))


def image_features(tower: Tower, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """The locked tower's pooled features ``h [N, W_v]`` (float32)."""
    model = DualEncoder(tower.model_cfg)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, normalize_images(x),
                                          method=lambda m, x: m.vision_model(x)).astype(jnp.float32))
    out = [np.asarray(fn(tower.params, images[s:s + batch])) for s in range(0, len(images), batch)]
    return np.concatenate(out, 0)


def cached_features(tower: Tower, samples: Samples, cache: Optional[str]) -> np.ndarray:
    """``image_features``, stored in ``cache`` (``.npy``) and read from there on the next call."""
    if cache and os.path.isfile(cache):
        h = np.load(cache)
        if h.shape[0] == samples.images.shape[0]:
            return h
    h = image_features(tower, samples.images)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        tmp = f"{cache}.tmp-{os.getpid()}.npy"
        np.save(tmp, h)
        os.replace(tmp, cache)
    return h


def run_config(recipe: str, overrides: Sequence[str], steps: int, seed: int):
    """The run config of one arm: ``recipe`` (``demo`` or ``demo:het``) with LiT's locked image group."""
    cfg = config_lib.load_config(recipe)
    cfg.unlock()
    cfg.demo.enabled = False
    cfg.lock()
    return config_lib.apply_overrides(cfg, [f"total_steps={steps}", f"seed={seed}", "freeze.image=True",
                                            *overrides])


@dataclasses.dataclass
class Trained:
    model_cfg: object
    params: dict
    history: list
    seconds: float


def train(cfg, tower: Tower, features: np.ndarray, captions: Sequence[str], *, log_every: int = 50,
          on_log: Optional[Callable] = None) -> Trained:
    """Train ``cfg`` (a ``run_config``) on cached ``features`` and their ``captions``: the image group comes
    from ``tower`` and stays locked; everything else starts from the recipe's initialisation (seed ``cfg.seed``)."""
    model_cfg = model_config(cfg, tower.tokenizer)
    if model_cfg.vision != tower.model_cfg.vision or model_cfg.embed_dim != tower.model_cfg.embed_dim:
        raise ValueError("the recipe's image tower differs from the pretrained one: "
                         f"{model_cfg.vision} / D={model_cfg.embed_dim} vs {tower.model_cfg.vision} / "
                         f"D={tower.model_cfg.embed_dim}")
    key = jax.random.key(cfg.seed)
    init_key, loop_key = jax.random.split(key)
    params = jax.device_get(init_params(model_cfg, init_key))
    params = {k: (tower.params[k] if k in IMAGE_GROUP else v) for k, v in params.items()}
    steps = int(cfg.total_steps)
    optimizer, _ = make_optimizer(cfg, params, steps)
    mesh = dist.make_mesh(-1, 1, devices=jax.devices()[:1])
    step_fn = make_train_step(model_cfg, optimizer, mesh, cfg.accum_steps, frozen_groups(cfg))
    feats = jnp.asarray(features)
    tokens = jnp.asarray(tower.tokenizer(list(captions)))
    n, b = feats.shape[0], int(cfg.batch_size)

    @jax.jit
    def one(state, feats, tokens, order, i, key):  # data and key are arguments, so the program has no
        idx = jax.lax.dynamic_slice_in_dim(order, (i % (n // b)) * b, b)  # large constants and seeds share it
        batch = {"features": feats[idx], "text": tokens[idx]}
        return step_fn(state, batch, jax.random.fold_in(key, i))

    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.asarray(0, jnp.int32)}
    history = []
    if model_cfg.het.enabled:  # the head's size at initialisation, on the first batch's images
        init = noise_sizes(model_cfg, params, features[:b])
        history.append({"step": 0, "het/angular": float(init.mean()), "het/angular_spread": float(init.std())})
    t0 = time.perf_counter()
    order = None
    for i in range(steps):
        if i % (n // b) == 0:  # a new epoch: a new permutation
            order = jnp.asarray(np.random.default_rng([cfg.seed, i // (n // b)]).permutation(n), jnp.int32)
        state, metrics = one(state, feats, tokens, order, i, loop_key)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row["step"] = i + 1
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite loss at step {i + 1}: {row}")
            history.append(row)
            if on_log is not None:
                on_log(row)
    return Trained(model_cfg, jax.device_get(state["params"]), history, time.perf_counter() - t0)


def noise_sizes(model_cfg, params, features: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Each image's HET-XL angular noise size (``hetclip.noise.per_example_sizes``) from cached features."""
    model = DualEncoder(model_cfg)

    @jax.jit
    def fn(p, f):
        out = model.apply({"params": p}, f, method=DualEncoder.project_image)
        return noise_lib.per_example_sizes(out["mean"], out["noise"])["angular"]

    return np.concatenate([np.asarray(fn(params, jnp.asarray(features[s:s + chunk])))
                           for s in range(0, features.shape[0], chunk)])


def evaluate(trained: Trained, tokenizer, features: np.ndarray, task: Samples, *, mc_samples: int = 0,
             seed: int = 0, chunk: int = 512) -> dict:
    """Zero-shot metrics of ``trained`` on one task's cached ``features`` (deterministic, and MC-averaged for a
    HET-XL model with ``mc_samples > 0``), its per-image uncertainty (``uncertainty.per_image_scores``,
    the head's angular noise) and the selective-prediction report."""
    model = DualEncoder(trained.model_cfg)
    params = trained.params
    het = trained.model_cfg.het.enabled

    project = jax.jit(lambda p, f: model.apply({"params": p}, f, method=DualEncoder.project_image))
    text = jax.jit(lambda p, t: noise_lib.l2_normalize(model.apply({"params": p}, t, method=DualEncoder.encode_text)))
    scale = float(model.apply({"params": params}, method=DualEncoder.logit_scale))
    weights = build_classifier(lambda t: text(params, jnp.asarray(t)), tokenizer, task.classnames, task.templates)

    @jax.jit
    def sample(p, f, key):
        out = model.apply({"params": p}, f, method=DualEncoder.project_image)
        return noise_lib.sample_embeddings(out["mean"], out["noise"], key, mc_samples)

    n_cls = len(task.classnames)
    det, mc = ClassificationMeter(n_cls, (1,)), ClassificationMeter(n_cls, (1,))
    fields: dict = {}

    def add(d):
        for k, v in d.items():
            fields.setdefault(k, []).append(np.asarray(v))

    key = jax.random.key(seed)
    for s in range(0, features.shape[0], chunk):
        f, y = jnp.asarray(features[s:s + chunk]), task.labels[s:s + chunk]
        out = project(params, f)
        lp = deterministic_log_probs(out["mean"], weights, scale)
        det.update(lp, y)
        add(uncertainty.per_image_scores(lp, y))
        if het:
            add({"noise": noise_lib.per_example_sizes(out["mean"], out["noise"])["angular"]})
            if mc_samples:
                lp_mc = mc_log_probs(sample(params, f, jax.random.fold_in(key, s)), weights, scale)
                mc.update(lp_mc, y)
                add(uncertainty.per_image_scores(lp_mc, y, prefix="mc_"))
    per_image = {k: np.concatenate(v) for k, v in fields.items()}
    metrics = det.result()
    if het and mc_samples:
        metrics.update(mc.result(prefix="mc_"))
    return {"metrics": metrics, "per_image": per_image, "selective": uncertainty.selective_report(per_image),
            "logit_scale": scale}
