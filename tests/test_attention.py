"""Both attention kernels (``attention="auto"``: heads-major einsums on CPU; ``"xla"``:
``jax.nn.dot_product_attention``) against the attention math written out below, the implementation
knob, and the accelerator matmul path of ``towers.mm``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetclip import towers
from hetclip.model import ModelConfig, preset


def reference_attention(params, x, heads, causal, dtype):
    """Multi-head attention written out: [b, heads, t, hd] layout, q scaled before the logits matmul,
    fp32 logits and softmax, masked logits at the most negative fp32, fp32 context."""
    b, t, w = x.shape
    hd = w // heads

    def proj(name, y):
        return towers.mm(y, params[name]["kernel"], dtype) + params[name]["bias"]

    def heads_major(y):
        return y.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)

    q, k, v = (heads_major(proj(n, x)) for n in ("q_proj", "k_proj", "v_proj"))
    logits = jnp.einsum("bhqd,bhkd->bhqk", (q * hd ** -0.5).astype(dtype), k.astype(dtype),
                        preferred_element_type=jnp.float32)
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
    return proj("out_proj", ctx.transpose(0, 2, 1, 3).reshape(b, t, w))


def _module_and_params(causal, dtype, width=32, heads=4, t=7, attention="auto"):
    mod = towers.SelfAttention(width, heads, layers=2, causal=causal, dtype=dtype, attention=attention)
    x = jax.random.normal(jax.random.key(1), (3, t, width), jnp.float32)
    params = mod.init(jax.random.key(0), x)["params"]
    # non-zero biases so they are checked too
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    return mod, params, x


@pytest.mark.parametrize("attention", ["auto", "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_attention_equals_reference(causal, attention):
    mod, params, x = _module_and_params(causal, jnp.float32, attention=attention)
    got = mod.apply({"params": params}, x)
    want = reference_attention(params, x, 4, causal, jnp.float32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    def loss(p, fn):
        return jnp.sum(jnp.sin(fn(p)))

    g_got = jax.grad(loss)(params, lambda p: mod.apply({"params": p}, x))
    g_want = jax.grad(loss)(params, lambda p: reference_attention(p, x, 4, causal, jnp.float32))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_got, g_want)


@pytest.mark.parametrize("attention", ["auto", "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_close_to_reference(causal, attention):
    mod, params, x = _module_and_params(causal, jnp.bfloat16, attention=attention)
    got = mod.apply({"params": params}, x)
    want = reference_attention(params, x, 4, causal, jnp.bfloat16)
    assert got.dtype == jnp.float32
    # both round the same operands to bf16; they differ in where the 1/sqrt(hd) scale is applied
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    fp32 = reference_attention(params, x, 4, causal, jnp.float32)
    assert float(jnp.abs(got - fp32).max()) > 0  # the bf16 path really rounds


@pytest.mark.parametrize("attention", ["auto", "xla"])
def test_causal_attention_ignores_later_tokens(attention):
    mod, params, x = _module_and_params(True, jnp.float32, attention=attention)
    changed = x.at[:, 4:].set(7.0)
    np.testing.assert_allclose(mod.apply({"params": params}, x)[:, :4],
                               mod.apply({"params": params}, changed)[:, :4], atol=1e-6)


def test_attention_knob_validation():
    with pytest.raises(ValueError, match="attention='flash' is not supported"):
        preset("tiny", attention="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU"):
            towers.attention_implementation("cudnn", jnp.bfloat16)
    assert towers.attention_implementation("xla", jnp.float32) == "xla"
    cfg = preset("tiny", attention="xla")
    assert ModelConfig.from_dict(cfg.to_dict()).attention == "xla"


def test_auto_attention_follows_the_backend(monkeypatch):
    assert towers.attention_implementation("auto", jnp.float32) == ("heads_major" if jax.default_backend() == "cpu"
                                                                    else None)
    monkeypatch.setattr(towers.jax, "default_backend", lambda: "tpu")
    assert towers.attention_implementation("auto", jnp.bfloat16) is None   # JAX's own choice off the CPU
    monkeypatch.setattr(towers.jax, "default_backend", lambda: "gpu")
    assert towers.attention_implementation("cudnn", jnp.bfloat16) == "cudnn"
    with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
        towers.attention_implementation("cudnn", jnp.float32)


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_accelerator_matmul_path(monkeypatch, lead):
    """Off the CPU, bf16 ``mm`` is a plain bf16 dot differentiated by JAX: same values as the CPU rule up to
    the bf16 rounding of the output, gradients in fp32 close to the fp32 ones."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=lead + (16,)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=lead + (4,)), jnp.float32)

    def run():
        y = towers.mm(x, k, jnp.bfloat16)
        g = jax.grad(lambda a, b: jnp.sum(towers.mm(a, b, jnp.bfloat16) * ct), argnums=(0, 1))(x, k)
        return y, g

    y_cpu, (dx_cpu, dk_cpu) = run()
    monkeypatch.setattr(towers, "cpu_matmul_rule", lambda: False)
    y_acc, (dx_acc, dk_acc) = run()
    assert y_acc.dtype == dx_acc.dtype == dk_acc.dtype == jnp.float32
    np.testing.assert_allclose(y_acc, y_cpu, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(y_acc, y_cpu.astype(jnp.bfloat16).astype(jnp.float32))
    for a, b in ((dx_cpu, dx_acc), (dk_cpu, dk_acc)):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 1e-2
