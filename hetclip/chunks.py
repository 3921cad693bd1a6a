"""One way to bound the memory of a traced computation: map a function over chunks of the leading
axis (``chunked_map``), used by the losses' class and sample passes and the supervised heads' Monte-Carlo
average."""
from __future__ import annotations

from typing import Callable, Optional

import jax


def chunked_map(fn: Callable, xs, chunk: Optional[int], *, remat: bool = True) -> list:
    """``fn`` applied to consecutive chunks of ``chunk`` rows of ``xs`` (an array or a pytree of arrays
    sharing the leading axis); ``chunk=None`` is one chunk of all rows.

    Returns one or two results (pytrees like ``fn``'s), each with a leading axis of chunks: the full
    chunks stacked by ``jax.lax.map``, then the remainder (a non-dividing tail, one smaller call).
    Concatenate them along axis 0 to get every chunk's result in order.

    ``remat=True`` recomputes each chunk in the backward pass (``jax.checkpoint``), so only one chunk's
    intermediates are alive at a time; a single chunk is never recomputed (nothing to save memory
    against, and it would cost one more pass)."""
    n = jax.tree.leaves(xs)[0].shape[0]
    c = n if chunk is None else min(chunk, n)
    if c < 1:
        raise ValueError(f"chunked_map: chunk={chunk} over {n} rows; need chunk >= 1 and at least one row")
    n_full, rem = divmod(n, c)
    stack = lambda tree: jax.tree.map(lambda y: y[None], tree)  # noqa: E731
    if n_full == 1 and not rem:
        return [stack(fn(xs))]
    # inside a loop CSE cannot merge the recomputation with the forward pass, so it may stay on
    single = jax.checkpoint(fn) if remat else fn
    looped = jax.checkpoint(fn, prevent_cse=False) if remat else fn
    out = []
    if n_full == 1:
        out.append(stack(single(jax.tree.map(lambda x: x[:c], xs))))
    elif n_full > 1:
        out.append(jax.lax.map(looped, jax.tree.map(lambda x: x[: n_full * c].reshape((n_full, c) + x.shape[1:]), xs)))
    if rem:
        out.append(stack(single(jax.tree.map(lambda x: x[n_full * c:], xs))))
    return out
