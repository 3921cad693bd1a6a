"""Zero-shot classification and retrieval: the evaluation API (the command lines in ``cli.py`` and the
training loop's periodic evaluation call it).

* ``load_model(path, step=None)``: encoders, tokenizer and preprocessing of a training run or an HF export;
* ``run_zero_shot(encoders, tokenizer, dataset, ...)`` / ``run_retrieval(...)``: a data set through the
  ``datasets`` loader (decode worker processes, uint8 batches) to metrics and a report dict;
* ``evaluate_zero_shot`` / ``evaluate_retrieval``: metrics over any iterable of batches, against plain
  encoder callables (``encode_image(images [B, S, S, 3] float, CLIP-normalised) -> [B, D]``).

* deterministic prediction: ``p = softmax(scale · μ̂ · Wᵀ)`` with ``μ̂`` the normalised mean embedding;
* HET-XL MC prediction (``mc_samples = S > 0`` and a ``sample_image(images, key, S) -> [B, S, D]`` of
  normalised noisy embeddings): ``log p = logsumexp_s log_softmax(scale · ẑ_s · Wᵀ) − log S`` (log space).
  Batch ``i`` (starting at example ``g0``) uses ``fold_in(key, g0)``, so results do not depend on how
  many batches ran before, only on the batch size.

Encoding goes through ``BatchedEncoder``: every call has the same batch size (the last batch is padded by
repeating its first row, outputs are sliced back) so a jitted encoder compiles once, and the batch is
sharded over ``jax.devices()`` when it divides evenly. uint8 batches are normalised on the device after the
transfer (``hetclip.model.normalize_images``), so encoders always see CLIP-normalised floats.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hetclip.data.decode import CLIP_MEAN, CLIP_STD
from hetclip.model import normalize_images
from hetclip.noise import l2_normalize
from hetclip.zero_shot import datasets as ds
from hetclip.zero_shot import uncertainty
from hetclip.zero_shot.classifier import build_classifier, classifier_info, encode_texts
from hetclip.zero_shot.metrics import ClassificationMeter, retrieval_recall
from hetclip.zero_shot.templates import load_templates

log = logging.getLogger(__name__)


class BatchedEncoder:
    """Wrap ``fn(x [B, ...], *args) -> [B, ...]``: pad to ``batch_size``, shard over devices, unpad.

    With ``mesh`` (training's device mesh) the batch is split over all of its axes, so the encoder runs
    where the parameters already live; across processes every process passes the same batch and gets
    the whole output back. Without it, the batch is split over ``devices`` (default: all) when it
    divides evenly (``shard=None``)."""

    def __init__(self, fn: Callable, batch_size: int, *, shard: Optional[bool] = None, devices=None, mesh=None):
        self.fn = fn
        self.batch_size = int(batch_size)
        if mesh is not None:
            if shard is False:
                self.sharding = None
            elif self.batch_size % mesh.devices.size:
                raise ValueError(f"evaluation batch size {self.batch_size} is not a multiple of the mesh's "
                                 f"{mesh.devices.size} devices")
            else:
                self.sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
            return
        devices = list(devices if devices is not None else jax.devices())
        if shard is None:
            shard = len(devices) > 1 and self.batch_size % len(devices) == 0
        if shard and self.batch_size % len(devices):
            raise ValueError(f"batch size {self.batch_size} is not divisible by {len(devices)} devices")
        self.sharding = NamedSharding(Mesh(np.array(devices), ("batch",)), P("batch")) if shard else None

    def __call__(self, x, *args):
        x = np.asarray(x)
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        if x.shape[0] > self.batch_size:  # larger inputs: fixed-size chunks
            parts = [self(x[s:s + self.batch_size], *args) for s in range(0, x.shape[0], self.batch_size)]
            return jax.tree.map(lambda *p: jnp.concatenate(p, 0), *parts)
        n = x.shape[0]
        if n < self.batch_size:
            x = np.concatenate([x, np.repeat(x[:1], self.batch_size - n, axis=0)], 0)
        out = self.fn(_model_input(put_batch(x, self.sharding)), *args)
        return jax.tree.map(lambda y: _whole(y)[:n], out)


def put_batch(x: np.ndarray, sharding):
    """A host batch on the devices of ``sharding`` (None: the default device); across processes every
    process holds the same ``x`` and places the rows of its own devices."""
    if sharding is None:
        return jnp.asarray(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _whole(y):
    """``y`` readable by this process: an array spread over several processes is gathered."""
    if isinstance(y, jax.Array) and not y.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(y, tiled=True)
    return y


_model_input = jax.jit(normalize_images)


def _normalising(fn: Optional[Callable]) -> Optional[Callable]:
    """``fn`` called on device-normalised images (for encoders used without ``BatchedEncoder``)."""
    if fn is None:
        return None
    return lambda x, *args: fn(_model_input(jnp.asarray(x)), *args)


@jax.jit
def _det_log_probs(emb, weights, scale):
    logits = scale * (l2_normalize(emb) @ weights.T)
    return jax.nn.log_softmax(logits, axis=-1)


@jax.jit
def _mc_log_probs(samples, weights, scale):
    logits = scale * jnp.einsum("bsd,cd->bsc", l2_normalize(samples), weights)
    per_sample = jax.nn.log_softmax(logits, axis=-1)
    return jax.nn.logsumexp(per_sample, axis=1) - jnp.log(samples.shape[1])


def deterministic_log_probs(embeddings, weights, logit_scale) -> np.ndarray:
    """``log softmax(scale · normalise(emb) · Wᵀ)``, ``[B, C]``."""
    return np.asarray(_det_log_probs(jnp.asarray(embeddings), jnp.asarray(weights), jnp.float32(logit_scale)))


def mc_log_probs(samples, weights, logit_scale) -> np.ndarray:
    """MC-averaged predictive from ``samples [B, S, D]``: ``logsumexp_s log_softmax(...) − log S``."""
    return np.asarray(_mc_log_probs(jnp.asarray(samples), jnp.asarray(weights), jnp.float32(logit_scale)))


def _batch_parts(batch):
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    images, labels = batch[:2]
    return images, labels


def _batch_names(batch, first: int, count: int) -> list:
    """The images' names (the loader's ``"name"``), or their positions in the evaluation order."""
    names = batch.get("name") if isinstance(batch, dict) else None
    return list(names) if names is not None else [str(i) for i in range(first, first + count)]


def evaluate_zero_shot(encode_image: Callable, classifier, batches: Iterable, logit_scale: float, *,
                       sample_image: Optional[Callable] = None, mc_samples: int = 0, key=None,
                       batch_size: Optional[int] = None, shard: Optional[bool] = None,
                       progress=None, topk: Sequence[int] = (1, 5), reliability: Optional[dict] = None,
                       encode_image_and_noise: Optional[Callable] = None, per_image: Optional[dict] = None,
                       mesh=None) -> Dict[str, float]:
    """Metrics over ``batches`` of ``(images, labels)`` (or dicts with ``image``/``label``).

    ``classifier`` is ``[C, D]`` with unit rows. With ``batch_size`` given, encoders are wrapped in
    ``BatchedEncoder`` (fixed shapes, sharding); otherwise they are called on each batch as is.
    Returns ``top1``, ``top5``, ``mean_per_class_recall``, ``nll``, ``ece`` (deterministic) and, with
    ``mc_samples > 0``, the same keys prefixed ``mc_``; plus ``num_images`` and ``images_per_second``.
    A ``reliability`` dict is filled with the reliability diagrams (``ClassificationMeter.reliability``)
    under ``"deterministic"`` and, with MC samples, ``"mc"``.

    A ``per_image`` dict is filled with one array per field over the evaluated images, in order: ``name``
    (the loader's names, else positions), ``label`` and ``uncertainty.per_image_scores`` of the deterministic
    predictive (and ``mc_``-prefixed of the MC one); with ``encode_image_and_noise`` (``images -> (embeddings,
    angle [B])``, used instead of ``encode_image``) also ``noise``, each image's HET-XL angular noise size.
    """
    weights = jnp.asarray(classifier, jnp.float32)
    num_classes = int(weights.shape[0])
    topk = tuple(k for k in topk if k <= num_classes) or (1,)
    if mc_samples > 0:
        if sample_image is None:
            raise ValueError("mc_samples > 0 needs sample_image (the model has no HET-XL head?)")
        if key is None:
            key = jax.random.PRNGKey(0)
    image_fn = encode_image_and_noise or encode_image
    enc = BatchedEncoder(image_fn, batch_size, shard=shard, mesh=mesh) if batch_size else _normalising(image_fn)
    samp = (BatchedEncoder(sample_image, batch_size, shard=shard, mesh=mesh) if batch_size and sample_image
            else _normalising(sample_image))
    det = ClassificationMeter(num_classes, topk)
    mc = ClassificationMeter(num_classes, topk) if mc_samples > 0 else None
    fields: Dict[str, list] = {}

    def keep(**arrays):
        if per_image is not None:
            for k, v in arrays.items():
                fields.setdefault(k, []).append(np.asarray(v))

    seen = 0
    start = time.perf_counter()
    for batch in batches:
        images, labels = _batch_parts(batch)
        labels = np.asarray(labels)
        step = batch_size or labels.shape[0]
        names = _batch_names(batch, seen, labels.shape[0]) if per_image is not None else None
        for c in range(0, labels.shape[0], step):  # MC key folded with each chunk's first example
            imgs, labs = images[c:c + step], labels[c:c + step]
            emb = enc(imgs)
            if encode_image_and_noise is not None:
                emb, angle = emb
                keep(noise=angle)
            lp = deterministic_log_probs(emb, weights, logit_scale)
            det.update(lp, labs)
            keep(name=names[c:c + step] if names is not None else None, label=labs,
                 **uncertainty.per_image_scores(lp, labs))
            if mc is not None:
                s = samp(imgs, jax.random.fold_in(key, seen + c), int(mc_samples))
                lp_mc = mc_log_probs(s, weights, logit_scale)
                mc.update(lp_mc, labs)
                keep(**uncertainty.per_image_scores(lp_mc, labs, prefix="mc_"))
        seen += labels.shape[0]
        if progress is not None:
            progress.update(labels.shape[0])
            elapsed = time.perf_counter() - start
            if hasattr(progress, "set_postfix") and elapsed > 0:
                progress.set_postfix(img_s=f"{seen / elapsed:.1f}", top1=f"{det.hits.get(1, 0) / max(det.count, 1):.3f}",
                                     refresh=False)
    elapsed = time.perf_counter() - start
    out = det.result()
    if mc is not None:
        out.update(mc.result(prefix="mc_"))
        out["mc_samples"] = int(mc_samples)
    if reliability is not None:
        reliability["deterministic"] = det.reliability()
        if mc is not None:
            reliability["mc"] = mc.reliability()
    if per_image is not None:
        per_image.update({k: np.concatenate(v) for k, v in fields.items()})
    out["num_images"] = seen
    out["images_per_second"] = seen / elapsed if elapsed > 0 else float("nan")
    return out


def evaluate_retrieval(encode_image: Callable, encode_text: Callable, tokenizer, batches: Iterable, *,
                       batch_size: Optional[int] = None, text_batch_size: int = 256,
                       shard: Optional[bool] = None, ks: Sequence[int] = (1, 5, 10),
                       progress=None, mesh=None) -> Dict[str, float]:
    """Recall@k both ways over ``batches`` of ``(images, captions)`` where ``captions[i]`` is a list
    of the captions of image ``i`` (or a single string)."""
    enc = BatchedEncoder(encode_image, batch_size, shard=shard, mesh=mesh) if batch_size else _normalising(encode_image)
    img_emb, texts, owner = [], [], []
    n = 0
    for batch in batches:
        images, captions = _batch_parts(batch)
        img_emb.append(l2_normalize(np.asarray(enc(images))))
        for caps in captions:
            caps = [caps] if isinstance(caps, str) else list(caps)
            texts.extend(caps)
            owner.extend([n] * len(caps))
            n += 1
        if progress is not None:
            progress.update(len(captions))
    if n == 0:
        raise ValueError("no images were evaluated")
    txt_emb = l2_normalize(encode_texts(encode_text, tokenizer, texts, text_batch_size))
    out = retrieval_recall(np.concatenate(img_emb, 0), txt_emb, np.asarray(owner), ks)
    out["num_images"] = n
    out["num_texts"] = len(texts)
    return out


# ---------------------------------------------------------------------------------------------- models

def load_model(path: str, step: Optional[int] = None) -> Dict[str, Any]:
    """``{"encoders", "tokenizer", "image_size", "resize_size", "model_id", "info"}`` from a training run
    (``hetclip.checkpoint.load_run``) or a directory written by ``hetclip-export --format hf``."""
    from hetclip.checkpoint import load_run
    from hetclip.model import Encoders

    if os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isfile(os.path.join(path, "model.safetensors")):
        return _load_hf_export(path)
    run = load_run(path, step)
    preprocess = run.preprocess
    image_size = int(preprocess.get("image_size", run.model_cfg.vision.image_size))
    info = {"checkpoint": run.meta["checkpoint"], "step": run.step, "preprocess_saved": preprocess}
    return {"encoders": Encoders(run.model_cfg, run.params), "tokenizer": run.tokenizer(), "image_size": image_size,
            "resize_size": preprocess.get("resize_size"),
            "model_id": f"{info['checkpoint']}@{info['step']}", "info": info}


def _load_hf_export(path: str) -> Dict[str, Any]:
    """A directory written by ``hetclip-export --format hf`` (or any HF CLIP directory with a fast tokenizer)."""
    from hetclip.data.tokenizers import load_tokenizer
    from hetclip.hf import params_from_hf
    from hetclip.model import Encoders

    params, cfg = params_from_hf(path)
    image_size = cfg.vision.image_size
    resize_size = None
    pre_path = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre_path):
        with open(pre_path, encoding="utf-8") as f:
            pre = json.load(f)
        crop = pre.get("crop_size", image_size)
        image_size = int(crop.get("height", image_size) if isinstance(crop, dict) else crop)
        size = pre.get("size")
        if isinstance(size, dict) and "shortest_edge" in size:
            resize_size = int(size["shortest_edge"])
    tok = load_tokenizer(path, context_length=cfg.text.context_length)
    info = {"checkpoint": os.path.abspath(path), "step": None, "format": "hf_export"}
    return {"encoders": Encoders(cfg, params), "tokenizer": tok, "image_size": image_size,
            "resize_size": resize_size, "model_id": f"hf:{info['checkpoint']}", "info": info}


# ---------------------------------------------------------------------------------------------- data sets

def _logit_scale(encoders) -> float:
    s = encoders.logit_scale
    return float(s() if callable(s) else s)


def _progress(total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)


def _source(dataset: str, classnames, imagenet: bool):
    if imagenet:
        if classnames is not None:
            raise ValueError("--imagenet uses the built-in ImageNet class names; do not pass --classnames")
        return ds.imagenet(dataset)
    source = ds.open_source(dataset, classnames)
    if len(source.classnames) < 2:
        log.warning("%s has %d class(es): zero-shot accuracy is meaningless with fewer than 2", dataset,
                    len(source.classnames))
    return source


def run_zero_shot(encoders, tokenizer, dataset_dir: str,
                  classnames: Union[None, str, Sequence[str]] = None,
                  templates: Union[str, Sequence[str]] = "clip80", image_size: int = 224, *,
                  imagenet: bool = False, canonicalize: bool = False, batch_size: int = 64,
                  text_batch_size: int = 256, limit: Optional[int] = None, mc_samples: int = 0,
                  seed: int = 0, workers: int = 2, resize_size: Optional[int] = None,
                  max_bad_fraction: float = 0.01,
                  model_id: Optional[str] = None, cache_dir: Optional[str] = None, memory_cache=None,
                  shard: Optional[bool] = None, progress: bool = False, per_image: bool = False,
                  mesh=None) -> Dict[str, Any]:
    """Zero-shot evaluation of ``encoders`` (``image_embeddings``, ``text_embeddings``, ``logit_scale``,
    optional ``image_samples``) on a class-folder tree, an ImageNet val folder or ``.cls`` shards.

    ``classnames``: a list, a file, ``"imagenet"``, or ``None`` (dataset's own: folder names or
    ``classnames.txt``). ``templates``: a list or a set name / file (``clip80``, ``clip7``, ``bare``).
    ``workers`` decode processes read the images (0: in this process); more than ``max_bad_fraction``
    unusable images is an error. Returns ``{"metrics": {...}, "dataset": {...}, "preprocess": {...},
    "text": {...}, "reliability": {...}, "selective": {...}, ...}`` (``reliability``: the diagrams of
    ``evaluate_zero_shot``; ``selective``: ``uncertainty.selective_report`` of the per-image scores, with
    the HET-XL noise size when the model has the head) and, with ``per_image``, the per-image fields
    (``evaluate_zero_shot``'s ``per_image``) under ``"per_image"``.
    """
    source = _source(dataset_dir, classnames, imagenet)
    names = source.classnames
    template_list = list(templates) if not isinstance(templates, str) else load_templates(templates)
    weights = build_classifier(encoders.text_embeddings, tokenizer, names, template_list,
                               canonical=canonicalize, batch_size=text_batch_size, model_id=model_id,
                               cache_dir=cache_dir, memory_cache=memory_cache)
    batches = ds.eval_batches(source, image_size, batch_size, workers=workers, limit=limit,
                              resize_size=resize_size, max_bad_fraction=max_bad_fraction)
    total = len(source) if hasattr(source, "__len__") else None
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    bar = _progress(total, "zero-shot", progress)
    sampler = getattr(encoders, "image_samples", None) if mc_samples > 0 else None
    reliability: Dict[str, Any] = {}
    images: Dict[str, np.ndarray] = {}
    cfg = getattr(encoders, "config", None)
    het = bool(cfg is not None and cfg.het.enabled)
    noise_fn = getattr(encoders, "image_embeddings_and_noise", None) if het else None
    try:
        metrics = evaluate_zero_shot(encoders.image_embeddings, weights, batches, _logit_scale(encoders),
                                     sample_image=sampler, mc_samples=mc_samples,
                                     key=jax.random.PRNGKey(seed), batch_size=batch_size, shard=shard,
                                     progress=bar, reliability=reliability, per_image=images,
                                     encode_image_and_noise=noise_fn, mesh=mesh)
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    text = classifier_info(names, template_list, tokenizer, canonicalize)
    text["templates"] = templates if isinstance(templates, str) else "list"
    return {
        "metrics": metrics,
        "dataset": dict(source.describe(), images_evaluated=metrics["num_images"], **ds.skipped_summary(batches),
                        limit=limit, classnames=classnames if isinstance(classnames, str) else
                        ("list" if classnames is not None else "dataset")),
        "preprocess": {"image_size": int(image_size), "resize_shortest_side": int(resize_size or image_size),
                       "crop": "center", "interpolation": "bicubic",
                       "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "normalised": "on the device"},
        "text": text,
        "logit_scale": _logit_scale(encoders),
        "mc_samples": int(mc_samples), "seed": int(seed), "batch_size": int(batch_size),
        "reliability": reliability,
        "selective": uncertainty.selective_report(images) if images else {},
        "uncertainty": uncertainty.describe(images, het),
        **({"per_image": dict(images, classnames=list(names))} if per_image else {}),
    }


def run_retrieval(encoders, tokenizer, shards: str, image_size: int = 224, *, batch_size: int = 64,
                  text_batch_size: int = 256, limit: Optional[int] = None, workers: int = 2,
                  resize_size: Optional[int] = None, shard: Optional[bool] = None,
                  max_bad_fraction: float = 0.01, progress: bool = False, mesh=None) -> Dict[str, Any]:
    """Image–text retrieval recall@{1,5,10} on webdataset shards (``KEY.jpg`` + ``KEY.txt``)."""
    source = ds.WdsRetrieval(shards)
    batches = ds.eval_batches(source, image_size, batch_size, workers=workers, limit=limit,
                              resize_size=resize_size, max_bad_fraction=max_bad_fraction)
    bar = _progress(limit, "retrieval", progress)
    try:
        metrics = evaluate_retrieval(encoders.image_embeddings, encoders.text_embeddings, tokenizer, batches,
                                     batch_size=batch_size, text_batch_size=text_batch_size, shard=shard,
                                     progress=bar, mesh=mesh)
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    skipped = ds.skipped_summary(batches)
    no_pair = sum(v for k, v in skipped["skipped_by_reason"].items() if k in ("missing_image", "missing_caption"))
    return {"metrics": metrics,
            "dataset": dict(source.describe(), **skipped, limit=limit, samples_without_image_or_caption=no_pair),
            "preprocess": {"image_size": int(image_size), "resize_shortest_side": int(resize_size or image_size),
                           "crop": "center", "interpolation": "bicubic"},
            "text": {"tokenizer": classifier_info([], [], tokenizer, False)["tokenizer"],
                     "context_length": getattr(tokenizer, "context_length", None)},
            "batch_size": int(batch_size)}
