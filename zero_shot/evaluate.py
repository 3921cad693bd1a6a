"""Zero-shot classification and retrieval evaluation against plain encoder callables.

* deterministic prediction: ``p = softmax(scale · μ̂ · Wᵀ)`` with ``μ̂`` the normalised mean embedding;
* HET-XL MC prediction (``mc_samples = S > 0`` and a ``sample_image(images, key, S) -> [B, S, D]`` of
  normalised noisy embeddings): ``log p = logsumexp_s log_softmax(scale · ẑ_s · Wᵀ) − log S`` (log space).
  Batch ``i`` (starting at example ``g0``) uses ``fold_in(key, g0)``, so results do not depend on how
  many batches ran before, only on the batch size.

Encoding goes through ``BatchedEncoder``: every call has the same batch size (the last batch is padded by
repeating its first row, outputs are sliced back) so a jitted encoder compiles once, and the batch is
sharded over ``jax.devices()`` when it divides evenly.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hetclip.noise import l2_normalize
from hetclip.zero_shot.classifier import encode_texts
from hetclip.zero_shot.metrics import ClassificationMeter, retrieval_recall


class BatchedEncoder:
    """Wrap ``fn(x [B, ...], *args) -> [B, ...]``: pad to ``batch_size``, shard over devices, unpad."""

    def __init__(self, fn: Callable, batch_size: int, *, shard: Optional[bool] = None, devices=None):
        self.fn = fn
        self.batch_size = int(batch_size)
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
            return jnp.concatenate([self(x[s:s + self.batch_size], *args)
                                    for s in range(0, x.shape[0], self.batch_size)], 0)
        n = x.shape[0]
        if n < self.batch_size:
            x = np.concatenate([x, np.repeat(x[:1], self.batch_size - n, axis=0)], 0)
        x = jax.device_put(x, self.sharding) if self.sharding is not None else jnp.asarray(x)
        return self.fn(x, *args)[:n]


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
    images, labels = batch
    return images, labels


def evaluate_zero_shot(encode_image: Callable, classifier, batches: Iterable, logit_scale: float, *,
                       sample_image: Optional[Callable] = None, mc_samples: int = 0, key=None,
                       batch_size: Optional[int] = None, shard: Optional[bool] = None,
                       progress=None, topk: Sequence[int] = (1, 5), reliability: Optional[dict] = None
                       ) -> Dict[str, float]:
    """Metrics over ``batches`` of ``(images, labels)`` (or dicts with ``image``/``label``).

    ``classifier`` is ``[C, D]`` with unit rows. With ``batch_size`` given, encoders are wrapped in
    ``BatchedEncoder`` (fixed shapes, sharding); otherwise they are called on each batch as is.
    Returns ``top1``, ``top5``, ``mean_per_class_recall``, ``nll``, ``ece`` (deterministic) and, with
    ``mc_samples > 0``, the same keys prefixed ``mc_``; plus ``num_images`` and ``images_per_second``.
    A ``reliability`` dict is filled with the reliability diagrams (``ClassificationMeter.reliability``)
    under ``"deterministic"`` and, with MC samples, ``"mc"``.
    """
    weights = jnp.asarray(classifier, jnp.float32)
    num_classes = int(weights.shape[0])
    topk = tuple(k for k in topk if k <= num_classes) or (1,)
    if mc_samples > 0:
        if sample_image is None:
            raise ValueError("mc_samples > 0 needs sample_image (the model has no HET-XL head?)")
        if key is None:
            key = jax.random.PRNGKey(0)
    enc = BatchedEncoder(encode_image, batch_size, shard=shard) if batch_size else encode_image
    samp = (BatchedEncoder(sample_image, batch_size, shard=shard) if batch_size and sample_image else sample_image)
    det = ClassificationMeter(num_classes, topk)
    mc = ClassificationMeter(num_classes, topk) if mc_samples > 0 else None
    seen = 0
    start = time.perf_counter()
    for batch in batches:
        images, labels = _batch_parts(batch)
        labels = np.asarray(labels)
        step = batch_size or labels.shape[0]
        for c in range(0, labels.shape[0], step):  # MC key folded with each chunk's first example
            imgs, labs = images[c:c + step], labels[c:c + step]
            det.update(deterministic_log_probs(enc(imgs), weights, logit_scale), labs)
            if mc is not None:
                s = samp(imgs, jax.random.fold_in(key, seen + c), int(mc_samples))
                mc.update(mc_log_probs(s, weights, logit_scale), labs)
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
    out["num_images"] = seen
    out["images_per_second"] = seen / elapsed if elapsed > 0 else float("nan")
    return out


def evaluate_retrieval(encode_image: Callable, encode_text: Callable, tokenizer, batches: Iterable, *,
                       batch_size: Optional[int] = None, text_batch_size: int = 256,
                       shard: Optional[bool] = None, ks: Sequence[int] = (1, 5, 10),
                       progress=None) -> Dict[str, float]:
    """Recall@k both ways over ``batches`` of ``(images, captions)`` where ``captions[i]`` is a list
    of the captions of image ``i`` (or a single string)."""
    enc = BatchedEncoder(encode_image, batch_size, shard=shard) if batch_size else encode_image
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
