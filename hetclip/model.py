"""Dual encoder (CLIP-style) with an optional HET-XL image-embedding head.

``ModelConfig`` describes the whole model (JSON round trip via ``to_dict``/``from_dict``);
``PRESETS``/``preset(name, **overrides)`` give the standard sizes; ``DualEncoder`` is the Flax module
(parameter tree in docs/ARCHITECTURE.md); ``embedding_functions`` are the deterministic encoders that
``Encoders`` (a jitted inference wrapper around params) and the StableHLO export use.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hetclip import noise as noise_lib
from hetclip.config import renamed_message
from hetclip.data.decode import NORM_SCALE, NORM_SHIFT
from hetclip.heads import HetConfig, HetXLEmbeddingHead, Temperature, TemperatureConfig
from hetclip.losses import LOSS_KINDS
from hetclip.suggest import did_you_mean
from hetclip.towers import (ATTENTION_IMPLEMENTATIONS, Dense, TextConfig, TextTransformer, VisionConfig,
                            VisionTransformer, compute_dtype)

SIGLIP_BIAS_INIT = -10.0


def normalize_images(images):
    """uint8 ``[..., 3]`` -> float32 ``(x / 255 - CLIP_MEAN) / CLIP_STD``, on the device (loaders ship uint8:
    4x less host->device traffic); float images are taken as already normalised."""
    if images.dtype != jnp.uint8:
        return images
    return images.astype(jnp.float32) * jnp.asarray(NORM_SCALE) - jnp.asarray(NORM_SHIFT)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Whole-model configuration. ``loss='sigmoid'`` adds a learned ``logit_bias`` (SigLIP)."""
    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    het: HetConfig = HetConfig()
    temperature: TemperatureConfig = TemperatureConfig()
    loss: str = "softmax"
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"  # jax.nn.dot_product_attention implementation: auto | xla | cudnn

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ValueError(f"ModelConfig: embed_dim={self.embed_dim} must be >= 1")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"ModelConfig: loss={self.loss!r} is not supported; choose one of {LOSS_KINDS}")
        compute_dtype(self.dtype)
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"ModelConfig: attention={self.attention!r} is not supported; choose one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        for name, cls in _NESTED.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"ModelConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of ``to_dict``; unknown keys raise a ``ValueError`` naming the key (with a suggestion)."""
        _check_keys(d, [f.name for f in dataclasses.fields(cls)], "ModelConfig")
        kwargs = dict(d)
        for name, sub in _NESTED.items():
            if name in kwargs and not isinstance(kwargs[name], sub):
                if not isinstance(kwargs[name], Mapping):
                    raise TypeError(f"ModelConfig.{name} must be a mapping, got {type(kwargs[name]).__name__}")
                _check_keys(kwargs[name], [f.name for f in dataclasses.fields(sub)], f"ModelConfig.{name}",
                            f"{name}.")
                kwargs[name] = sub(**kwargs[name])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


_NESTED = {"vision": VisionConfig, "text": TextConfig, "het": HetConfig, "temperature": TemperatureConfig}


def _check_keys(d: Mapping[str, Any], known, where: str, section: str = ""):
    """Refuse a key of ``d`` (the model config's ``section``, e.g. ``"het."``) that is not in ``known``,
    naming its new name if it was renamed, else the nearest known key."""
    known = list(known)
    for key in d:
        if key not in known:
            renamed = renamed_message(f"model.{section}{key}")
            hint = f"; {renamed}" if renamed else did_you_mean(key, known)
            raise ValueError(f"{where}: unknown key {key!r}{hint} (known keys: {', '.join(known)})")


def _clip(embed, vw, vl, vh, patch, tw, tl, th, act="quick_gelu"):
    return ModelConfig(
        embed_dim=embed,
        vision=VisionConfig(width=vw, layers=vl, heads=vh, patch_size=patch, image_size=224, activation=act),
        text=TextConfig(width=tw, layers=tl, heads=th, vocab_size=49408, context_length=77,
                        activation=act, eos_token_id=49407))


# CLIP dimensions (OpenAI for B/32, B/16, L/14; open_clip's ViT-S-16 for S/16). "tiny" is for CPU runs
# and tests; its vocabulary/eos are placeholders that the trainer overrides from the tokenizer.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        embed_dim=256,
        vision=VisionConfig(width=256, layers=6, heads=4, patch_size=8, image_size=64, activation="gelu"),
        text=TextConfig(width=256, layers=6, heads=4, vocab_size=8192, context_length=32,
                        activation="gelu", eos_token_id=8191)),
    "S/16": _clip(384, 384, 12, 6, 16, 384, 12, 6, act="gelu"),
    "B/32": _clip(512, 768, 12, 12, 32, 512, 12, 8),
    "B/16": _clip(512, 768, 12, 12, 16, 512, 12, 8),
    "L/14": _clip(768, 1024, 24, 16, 14, 768, 12, 12),
}


def _merge(base: dict, over: Mapping[str, Any], where: str, section: str = "") -> dict:
    _check_keys(over, base, where, section)
    out = dict(base)
    for k, v in over.items():
        if dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)
        if isinstance(base.get(k), dict) and isinstance(v, Mapping):
            out[k] = _merge(base[k], v, f"{where}.{k}", f"{section}{k}.")
        else:
            out[k] = v
    return out


def preset(name: str, **overrides) -> ModelConfig:
    """A preset with overrides; nested sections merge, e.g.
    ``preset("tiny", het={"enabled": True}, text={"vocab_size": 1000, "eos_token_id": 999})``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}{did_you_mean(name, PRESETS)} "
                         f"(choose one of {', '.join(PRESETS)})")
    return ModelConfig.from_dict(_merge(PRESETS[name].to_dict(), overrides, f"preset {name!r}"))


class DualEncoder(nn.Module):
    """Image tower + projection (+ HET-XL head), text tower + projection, temperature (+ SigLIP bias)."""
    config: ModelConfig

    def setup(self):
        c = self.config
        dt = compute_dtype(c.dtype)
        self.vision_model = VisionTransformer(c.vision, dtype=dt, remat=c.remat, attention=c.attention)
        self.visual_projection = Dense(c.embed_dim, use_bias=False, dtype=dt,
                                       kernel_init=nn.initializers.normal(c.vision.width ** -0.5))
        self.text_model = TextTransformer(c.text, dtype=dt, remat=c.remat, attention=c.attention)
        self.text_projection = Dense(c.embed_dim, use_bias=False, dtype=dt,
                                     kernel_init=nn.initializers.normal(c.text.width ** -0.5))
        self.temperature = Temperature(c.temperature)
        if c.het.enabled:
            self.het_head = HetXLEmbeddingHead(c.embed_dim, c.het, dtype=dt)
        if c.loss == "sigmoid":
            self._logit_bias = self.param("logit_bias", nn.initializers.constant(SIGLIP_BIAS_INIT), (), jnp.float32)

    def encode_image(self, images, *, train: bool = False):
        """``{"features": h [B, W_v], "mean": μ [B, D], "noise": None | noise dict}`` (``project_image`` of the
        image tower's pooled features).

        ``train`` is accepted for API symmetry; the towers have no dropout and the noise parameters
        are always returned (evaluation simply uses ``mean``)."""
        del train
        return self.project_image(self.vision_model(images))

    def project_image(self, h):
        """The image side after the tower, from pooled features ``h [B, W_v]``: the mean embedding ``μ``
        (unnormalised; unit-norm when the HET-XL head's ``noise_space`` is ``"sphere"``, where the noise is
        added to the unit mean) and the head's noise (or None)."""
        mean = self.visual_projection(h)
        noise = None
        if self.config.het.enabled:
            noise = self.het_head(h)
            if self.config.het.noise_space == "sphere":
                mean = noise_lib.l2_normalize(mean).astype(mean.dtype)
        return {"features": h, "mean": mean, "noise": noise}

    def encode_text(self, tokens):
        """Unnormalised text embeddings ``[B, D]`` from int tokens ``[B, L]``."""
        return self.text_projection(self.text_model(tokens))

    def logit_scale(self):
        """``1/τ`` (exponentiated/bounded and clamped), fp32 scalar."""
        return self.temperature()

    def logit_bias(self):
        """SigLIP's learned bias (``loss='sigmoid'`` only)."""
        if self.config.loss != "sigmoid":
            raise ValueError(f"logit_bias exists only with loss='sigmoid' (this model has loss={self.config.loss!r})")
        return self._logit_bias

    def loss_inputs(self):
        """The loss's inputs shared by the whole batch (``hetclip.losses.make_loss``'s ``shared``): ``scale``,
        SigLIP's ``bias`` and the parameter-efficient HET-XL head's ``C``."""
        out = {"scale": self.logit_scale()}
        if self.config.loss == "sigmoid":
            out["bias"] = self.logit_bias()
        if self.config.het.enabled and self.config.het.param_efficient:
            out["C"] = self.het_head.variables["params"]["C"]
        return out

    def __call__(self, images, tokens, *, train: bool = False):
        """Everything at once (used by ``init``; touches every parameter)."""
        out = {"image": self.encode_image(images, train=train), "text": self.encode_text(tokens),
               "logit_scale": self.logit_scale()}
        if self.config.loss == "sigmoid":
            out["logit_bias"] = self.logit_bias()
        return out


def loss_embeddings(model: DualEncoder, params, batch, *, train: bool = True) -> dict:
    """Per-example loss inputs of both towers, fp32: ``{"mean", "txt"}`` and, with the HET-XL head, ``"noise"``
    (its per-example part ``d``, ``v`` or ``V``; the shared ``C`` is in ``DualEncoder.loss_inputs``). A batch
    with ``"features"`` (the image tower's pooled output, computed once for a locked tower) instead of
    ``"image"`` starts after the tower. Images are CLIP-normalised floats (``normalize_images``)."""
    if "features" in batch:
        img = model.apply({"params": params}, batch["features"], method=DualEncoder.project_image)
    else:
        img = model.apply({"params": params}, batch["image"], train=train, method=DualEncoder.encode_image)
    txt = model.apply({"params": params}, batch["text"], method=DualEncoder.encode_text)
    out = {"mean": img["mean"].astype(jnp.float32), "txt": txt.astype(jnp.float32)}
    if img["noise"] is not None:
        out["noise"] = {k: v.astype(jnp.float32) for k, v in img["noise"].items() if k != "C"}
    return out


def dummy_inputs(cfg: ModelConfig, batch: int = 1):
    s = cfg.vision.image_size
    return (jnp.zeros((batch, s, s, 3), jnp.float32),
            jnp.full((batch, cfg.text.context_length), cfg.text.eos_token_id, jnp.int32))


def init_params(cfg: ModelConfig, key) -> dict:
    """Initial parameters (the ``params`` collection) of ``DualEncoder(cfg)``."""
    images, tokens = dummy_inputs(cfg)
    return jax.jit(lambda k: DualEncoder(cfg).init(k, images, tokens)["params"])(key)


def abstract_params(cfg: ModelConfig) -> dict:
    """Shapes/dtypes of the parameters (``jax.ShapeDtypeStruct`` tree) without allocating them."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def embedding_functions(cfg: ModelConfig):
    """``(image_fn(params, images), text_fn(params, tokens))``: pure functions returning the
    L2-normalised deterministic embeddings ``[B, D]`` in float32 (images: the mean ``μ``). ``Encoders``
    jits them; the StableHLO export closes them over the parameters."""
    model = DualEncoder(cfg)

    def image_fn(params, images):
        return noise_lib.l2_normalize(model.apply({"params": params}, images, method=DualEncoder.encode_image)["mean"])

    def text_fn(params, tokens):
        return noise_lib.l2_normalize(model.apply({"params": params}, tokens, method=DualEncoder.encode_text))

    return image_fn, text_fn


class Encoders:
    """Jitted inference around ``params``: deterministic normalised embeddings (``μ`` for images),
    plus MC samples of the HET-XL image embedding."""

    def __init__(self, cfg: ModelConfig, params):
        self.config = cfg
        self.params = params
        self.model = DualEncoder(cfg)
        apply = self.model.apply
        _image, _text = embedding_functions(cfg)

        def _samples(p, images, key, mc_samples):
            out = apply({"params": p}, images, method=DualEncoder.encode_image)
            return noise_lib.sample_embeddings(out["mean"], out["noise"], key, mc_samples)

        def _image_and_noise(p, images):
            out = apply({"params": p}, images, method=DualEncoder.encode_image)
            angle = noise_lib.per_example_sizes(out["mean"].astype(jnp.float32), out["noise"])["angular"]
            return noise_lib.l2_normalize(out["mean"].astype(jnp.float32)), angle

        self._image = jax.jit(_image)
        self._image_and_noise = jax.jit(_image_and_noise)
        self._text = jax.jit(_text)
        self._samples = jax.jit(_samples, static_argnums=3)
        self._scale = jax.jit(lambda p: apply({"params": p}, method=DualEncoder.logit_scale))

    def _check_images(self, images):
        s = self.config.vision.image_size
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[1:] != (s, s, 3):
            raise ValueError(f"images must be float NHWC [B, {s}, {s}, 3] (RGB, CLIP-normalised) for this "
                             f"model (image_size={s}), got shape {shape}")
        if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
            raise ValueError(f"images must be floating point (normalised), got dtype {jnp.asarray(images).dtype}")
        return jnp.asarray(images, jnp.float32)

    def _check_tokens(self, tokens):
        t = self.config.text
        arr = np.asarray(tokens)
        if arr.ndim != 2:
            raise ValueError(f"tokens must be int [B, L], got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
        if not 1 <= arr.shape[1] <= t.context_length:
            raise ValueError(f"tokens have length {arr.shape[1]} but the text tower's context_length is "
                             f"{t.context_length}; truncate (keeping the end-of-text token) or use a longer context")
        if arr.size and (arr.min() < 0 or arr.max() >= t.vocab_size):
            raise ValueError(f"token ids must lie in [0, {t.vocab_size}), got min {arr.min()} max {arr.max()}")
        missing = np.nonzero(~(arr == t.eos_token_id).any(axis=1))[0]
        if missing.size:
            raise ValueError(f"token rows {missing[:5].tolist()} contain no eos_token_id={t.eos_token_id}; the text "
                             "tower pools at the first end-of-text token")
        return jnp.asarray(arr, jnp.int32)

    def image_embeddings(self, images):
        """L2-normalised mean image embeddings ``[B, D]`` (deterministic)."""
        return self._image(self.params, self._check_images(images))

    def image_embeddings_and_noise(self, images):
        """``(image_embeddings(images), angle [B])``: with the HET-XL head, each image's angular noise size in
        radians (``hetclip.noise.per_example_sizes``), from the same forward pass."""
        if not self.config.het.enabled:
            raise ValueError("image_embeddings_and_noise needs the HET-XL head, but this model has het.enabled=False")
        return self._image_and_noise(self.params, self._check_images(images))

    def text_embeddings(self, tokens):
        """L2-normalised text embeddings ``[B, D]``."""
        return self._text(self.params, self._check_tokens(tokens))

    def image_samples(self, images, key, mc_samples: int):
        """``[B, S, D]`` normalised noisy HET-XL samples ``(μ + ε_s)/‖μ + ε_s‖``."""
        if not self.config.het.enabled:
            raise ValueError("image_samples needs the HET-XL head, but this model has het.enabled=False")
        if not isinstance(mc_samples, (int, np.integer)) or mc_samples < 1:
            raise ValueError(f"mc_samples={mc_samples!r} must be an integer >= 1 to draw HET-XL samples")
        return self._samples(self.params, self._check_images(images), key, int(mc_samples))

    @property
    def logit_scale(self) -> float:
        """``1/τ`` as a Python float."""
        return float(self._scale(self.params))
