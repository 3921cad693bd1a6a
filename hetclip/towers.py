"""Vision and text transformer towers (Flax linen) with the Hugging Face CLIP parameter layout.

The parameter names and shapes follow ``docs/ARCHITECTURE.md`` ("Parameter tree") so that
``hetclip.hf`` can map them one to one onto ``transformers.CLIPModel``. Both towers use pre-norm
encoder layers ``x + attn(ln1 x)``, ``x + mlp(ln2 x)`` with LayerNorm eps 1e-5.

Mixed precision: with ``dtype=jnp.bfloat16`` every matmul takes bf16 inputs and accumulates in fp32
(``preferred_element_type=float32``); parameters, the residual stream, LayerNorm and softmax stay fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hetclip.xla import fast_bf16_matmul

LN_EPS = 1e-5
ACTIVATIONS = ("quick_gelu", "gelu")


def quick_gelu(x):
    """OpenAI CLIP's activation ``x · sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x):
    """Exact (erf) GELU, HF ``hidden_act="gelu"``."""
    return jax.nn.gelu(x, approximate=False)


def activation_fn(name: str) -> Callable:
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return gelu_exact
    raise ValueError(f"activation={name!r} is not supported; choose one of {ACTIVATIONS}")


def compute_dtype(name: Any):
    """``'float32' | 'bfloat16' | 'auto'`` (or a dtype) -> jnp dtype. ``'auto'`` is bfloat16 where the
    hardware has fast bf16 matmuls (``hetclip.xla.fast_bf16_matmul``) and float32 elsewhere."""
    allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if isinstance(name, str):
        if name == "auto":
            return jnp.bfloat16 if fast_bf16_matmul() else jnp.float32
        if name not in allowed:
            raise ValueError(f"dtype={name!r} is not supported; choose one of {sorted(allowed) + ['auto']}")
        return allowed[name]
    dt = jnp.dtype(name)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={name!r} is not supported; choose float32 or bfloat16")
    return dt.type


class _TowerShape:
    """What both tower configs share (their ``width``, ``layers``, ``heads``, ``mlp_ratio``,
    ``activation`` fields): the checks of those fields and ``mlp_dim``."""

    def _check_shape(self):
        kind, width, heads = type(self).__name__, self.width, self.heads
        if width < 1 or self.layers < 1 or heads < 1:
            raise ValueError(f"{kind}: width, layers and heads must be >= 1, got width={width}, "
                             f"layers={self.layers}, heads={heads}")
        if width % heads:
            raise ValueError(f"{kind}: width={width} is not divisible by heads={heads}")
        if self.mlp_ratio <= 0 or self.mlp_dim < 1:
            raise ValueError(f"{kind}: mlp_ratio={self.mlp_ratio} must be > 0")
        activation_fn(self.activation)

    @property
    def mlp_dim(self) -> int:
        return int(round(self.width * self.mlp_ratio))


@dataclasses.dataclass(frozen=True)
class VisionConfig(_TowerShape):
    """ViT image tower. ``image_size`` must be a multiple of ``patch_size``."""
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 32
    image_size: int = 224
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"

    def __post_init__(self):
        self._check_shape()
        if self.patch_size < 1 or self.image_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig: image_size={self.image_size} must be a positive multiple "
                             f"of patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig(_TowerShape):
    """Causal text transformer pooled at the first ``eos_token_id`` of each row."""
    width: int = 512
    layers: int = 12
    heads: int = 8
    vocab_size: int = 49408
    context_length: int = 77
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    eos_token_id: int = 49407

    def __post_init__(self):
        self._check_shape()
        if self.vocab_size < 2 or self.context_length < 1:
            raise ValueError(f"TextConfig: vocab_size={self.vocab_size} must be >= 2 and "
                             f"context_length={self.context_length} >= 1")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"TextConfig: eos_token_id={self.eos_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _mm_bf16(x, kernel):
    return _dot(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), ((x.ndim - 1,), (0,)))


def _mm_bf16_fwd(x, kernel):
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    # zero-size arrays carry the input dtypes (residuals must be arrays)
    return _dot(xb, kb, ((x.ndim - 1,), (0,))), (xb, kb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))


def _mm_bf16_bwd(res, ct):
    # Backward matmuls also take bf16 inputs with fp32 accumulation (the cotangent is rounded to
    # bf16, as in usual mixed-precision training); without this JAX would run them in fp32.
    xb, kb, x_dtype, k_dtype = res
    cb = ct.astype(jnp.bfloat16)
    dx = _dot(cb, kb, ((ct.ndim - 1,), (1,)))
    batch = tuple(range(xb.ndim - 1))
    dk = _dot(xb, cb, (batch, batch))
    return dx.astype(x_dtype.dtype), dk.astype(k_dtype.dtype)


_mm_bf16.defvjp(_mm_bf16_fwd, _mm_bf16_bwd)


def cpu_matmul_rule() -> bool:
    """Whether bf16 matmuls use the CPU rule (``_mm_bf16``: fp32 output, bf16 backward matmuls via a
    custom VJP). It was measured on CPUs only (bench/throughput.py), so it applies where JAX's
    default backend is the CPU; on GPUs and TPUs the matmul is the plain bf16 dot every Flax model
    uses there (bf16 output, accumulated in fp32 by the matmul unit, differentiated by JAX)."""
    return jax.default_backend() == "cpu"


def mm(x, kernel, dtype):
    """``x [..., in] @ kernel [in, out]`` with fp32 output. With ``dtype=bfloat16`` the inputs are
    cast to bf16 and the backward matmuls take bf16 inputs too: on CPU through ``_mm_bf16`` (fp32
    accumulation and output), elsewhere through a bf16 dot whose result is cast to fp32."""
    contract = ((x.ndim - 1,), (0,))
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        if cpu_matmul_rule():
            return _mm_bf16(x, kernel)
        xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
        return jax.lax.dot_general(xb, kb, (contract, ((), ()))).astype(jnp.float32)
    return _dot(x.astype(dtype), kernel.astype(dtype), contract)


class Dense(nn.Module):
    """Linear layer (``kernel [in, out]``, optional ``bias``) with mixed-precision matmul."""
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = mm(x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y


def layer_norm(name: str) -> nn.LayerNorm:
    """fp32 LayerNorm with HF CLIP's epsilon (params ``scale``/``bias``)."""
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_implementation(name: str, dtype) -> str | None:
    """``ModelConfig.attention`` -> ``"heads_major"`` (``heads_major_attention``) or the
    ``implementation`` argument of ``jax.nn.dot_product_attention``.

    ``"auto"``: on CPU ``heads_major_attention`` (measured faster there: bench/bench_attention.py),
    elsewhere JAX's choice (``None``: XLA's attention today); ``"xla"``: ``dot_product_attention``
    with XLA's implementation on any backend; ``"cudnn"``: cuDNN's fused (flash) attention, NVIDIA
    GPUs only, with bf16 compute."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is not supported; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if name == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention='cudnn' needs an NVIDIA GPU; JAX's backend is "
                             f"{jax.default_backend()!r} (use attention='auto')")
        if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
            raise ValueError(f"attention='cudnn' needs dtype='bfloat16' (or 'auto' on a GPU), got {jnp.dtype(dtype).name}")
    if name == "auto":
        return "heads_major" if jax.default_backend() == "cpu" else None
    return name


def heads_major_attention(q, k, v, *, causal: bool, dtype):
    """Softmax attention of ``q, k, v [b, t, heads, hd]`` computed in the ``[b, heads, t, hd]`` layout:
    XLA:CPU's batched dots are faster with the batch dimensions leading. ``q`` is scaled by
    ``hd^-0.5`` before the logits matmul; logits and softmax in fp32, both matmuls accumulate in
    fp32 from ``dtype`` operands. Returns ``[b, t, heads, hd]`` fp32."""
    hd = q.shape[-1]
    q, k, v = (y.transpose(0, 2, 1, 3) for y in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", (q * hd ** -0.5).astype(dtype), k.astype(dtype),
                        preferred_element_type=jnp.float32)
    if causal:
        t = logits.shape[-1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), dtype=bool))[None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
    return ctx.transpose(0, 2, 1, 3)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (with bias), scale head_dim^-0.5;
    ``attention`` picks the kernel (``attention_implementation``): ``heads_major_attention`` or
    ``jax.nn.dot_product_attention`` (XLA or cuDNN)."""
    width: int
    heads: int
    layers: int
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        hd = self.width // self.heads
        attn_std = self.width ** -0.5
        out_std = attn_std * (2 * self.layers) ** -0.5
        init = nn.initializers.normal(attn_std)
        implementation = attention_implementation(self.attention, self.dtype)

        def split_heads(y):  # [b, t, W] -> [b, t, heads, hd]
            return y.reshape(b, t, self.heads, hd)

        q = split_heads(Dense(self.width, dtype=self.dtype, kernel_init=init, name="q_proj")(x))
        k = split_heads(Dense(self.width, dtype=self.dtype, kernel_init=init, name="k_proj")(x))
        v = split_heads(Dense(self.width, dtype=self.dtype, kernel_init=init, name="v_proj")(x))
        if implementation == "heads_major":
            ctx = heads_major_attention(q, k, v, causal=self.causal, dtype=self.dtype)
        else:
            # fp32 logits and softmax (bf16 operands accumulate in fp32), probabilities cast to the
            # compute dtype for the second matmul
            ctx = jax.nn.dot_product_attention(q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype),
                                               scale=hd ** -0.5, is_causal=self.causal,
                                               implementation=implementation)
        ctx = ctx.reshape(b, t, self.width).astype(jnp.float32)
        return Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.normal(out_std),
                     name="out_proj")(ctx)


class MLP(nn.Module):
    width: int
    mlp_dim: int
    layers: int
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fc_std = (2 * self.width) ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        x = Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.normal(fc_std), name="fc1")(x)
        x = activation_fn(self.activation)(x)
        return Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.normal(proj_std), name="fc2")(x)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(ln1 x)`` then ``x + mlp(ln2 x)``."""
    width: int
    heads: int
    mlp_dim: int
    layers: int
    activation: str
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        x = x + SelfAttention(self.width, self.heads, self.layers, self.causal, self.dtype, self.attention,
                              name="self_attn")(layer_norm("layer_norm1")(x))
        x = x + MLP(self.width, self.mlp_dim, self.layers, self.activation, self.dtype,
                    name="mlp")(layer_norm("layer_norm2")(x))
        return x


class Encoder(nn.Module):
    """Stack of ``EncoderLayer``s named ``layers_{i}`` (optionally rematerialised)."""
    width: int
    heads: int
    mlp_dim: int
    layers: int
    activation: str
    causal: bool = False
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(self.layers):
            x = layer_cls(self.width, self.heads, self.mlp_dim, self.layers, self.activation,
                          self.causal, self.dtype, self.attention, name=f"layers_{i}")(x)
        return x


class PatchEmbedding(nn.Module):
    """Non-overlapping patch convolution without bias (``kernel [p, p, 3, W]``, HWIO) as a matmul."""
    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        b, h, w, ch = images.shape
        kernel = self.param("kernel", nn.initializers.normal((p * p * ch) ** -0.5),
                            (p, p, ch, self.width), jnp.float32)
        gh, gw = h // p, w // p
        patches = images.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * ch)
        return mm(patches, kernel.reshape(p * p * ch, self.width), self.dtype)


class VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        c = self.config
        p, w = c.patch_size, c.width
        b = images.shape[0]
        x = PatchEmbedding(p, w, self.dtype, name="patch_embedding")(images)
        cls = self.param("class_embedding", nn.initializers.normal(w ** -0.5), (w,), jnp.float32)
        pos = self.param("position_embedding", nn.initializers.normal(w ** -0.5),
                         (c.num_patches + 1, w), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)), x], axis=1)
        return x + pos[None]


class VisionTransformer(nn.Module):
    """ViT image tower; returns the ``post_layernorm``-ed class token ``[B, width]``.

    ``images``: float NHWC ``[B, image_size, image_size, 3]`` normalised with CLIP mean/std.
    """
    config: VisionConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, images):
        c = self.config
        if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"images must have shape [B, {c.image_size}, {c.image_size}, 3] (NHWC, RGB), "
                             f"got {tuple(images.shape)}")
        x = VisionEmbeddings(c, self.dtype, name="embeddings")(images.astype(jnp.float32))
        x = layer_norm("pre_layrnorm")(x)
        x = Encoder(c.width, c.heads, c.mlp_dim, c.layers, c.activation, False, self.dtype, self.remat,
                    self.attention, name="encoder")(x)
        return layer_norm("post_layernorm")(x[:, 0])


class TextEmbeddings(nn.Module):
    config: TextConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        tok = nn.Embed(c.vocab_size, c.width, embedding_init=nn.initializers.normal(0.02),
                       param_dtype=jnp.float32, name="token_embedding")(tokens)
        pos = self.param("position_embedding", nn.initializers.normal(0.01),
                         (c.context_length, c.width), jnp.float32)
        return tok + pos[None, :tokens.shape[1]]


def first_eos_index(tokens, eos_token_id: int):
    """Index of the first ``eos_token_id`` in each row (0 when absent, as HF CLIP)."""
    return jnp.argmax((tokens == eos_token_id).astype(jnp.int32), axis=-1)


class TextTransformer(nn.Module):
    """Causal text tower; returns the hidden state (after ``final_layer_norm``) at the first eos.

    ``tokens``: int ``[B, L]`` with ``L <= context_length``. With ``return_hidden=True`` the
    ``[B, L, width]`` hidden states are returned as well (tests, diagnostics).
    """
    config: TextConfig
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, tokens, return_hidden: bool = False):
        c = self.config
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= c.context_length:
            raise ValueError(f"tokens must have shape [B, L] with 1 <= L <= context_length={c.context_length}, "
                             f"got {tuple(tokens.shape)}")
        x = TextEmbeddings(c, name="embeddings")(tokens)
        x = Encoder(c.width, c.heads, c.mlp_dim, c.layers, c.activation, True, self.dtype, self.remat,
                    self.attention, name="encoder")(x)
        x = layer_norm("final_layer_norm")(x)
        idx = first_eos_index(tokens, c.eos_token_id)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return (pooled, x) if return_hidden else pooled
