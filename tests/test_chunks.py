"""``hetclip.chunks.chunked_map``: the same values and gradients as one call over all rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetclip.chunks import chunked_map


def _f(args):
    x, ids = args
    return jnp.tanh(x) @ jnp.ones((x.shape[1], 2)) + ids[:, None], jnp.sum(x ** 2, axis=1)


@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 7, 10, 50])
@pytest.mark.parametrize("remat", [True, False])
def test_chunks_concatenate_to_the_unchunked_result(chunk, remat):
    x = jax.random.normal(jax.random.key(0), (7, 5))
    ids = jnp.arange(7.0)
    parts = chunked_map(_f, (x, ids), chunk, remat=remat)
    c = 7 if chunk is None else min(chunk, 7)
    n_full, rem = divmod(7, c)
    assert len(parts) == (n_full > 0) + (rem > 0)
    assert all(p[0].ndim == 3 for p in parts)  # a leading axis of chunks on every result
    got = tuple(jnp.concatenate([p[i].reshape((-1,) + p[i].shape[2:]) for p in parts]) for i in range(2))
    want = _f((x, ids))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)

    def total(x):
        return sum(jnp.sum(p[0] ** 2) + jnp.sum(p[1]) for p in chunked_map(_f, (x, ids), chunk, remat=remat))

    np.testing.assert_allclose(jax.grad(total)(x), jax.grad(lambda x: jnp.sum(_f((x, ids))[0] ** 2)
                                                            + jnp.sum(_f((x, ids))[1]))(x), rtol=1e-5, atol=1e-6)


def test_bad_chunk_is_an_error():
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_map(lambda x: x, jnp.ones((3, 2)), 0)
