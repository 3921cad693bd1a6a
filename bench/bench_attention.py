"""Attention on CPU: ``towers.SelfAttention`` with ``attention="xla"`` (``jax.nn.dot_product_attention``,
[b, t, heads, hd] operands) against ``attention="auto"`` (on CPU ``heads_major_attention``: einsums in
the [b, heads, t, hd] layout), forward + backward of the whole block (q/k/v/out projections
included), interleaved rounds so both see the same machine load.

    python bench/bench_attention.py [--models demo,B/32] [--rounds 5] [--out bench/results/attention]

Shapes: the towers of the ``demo`` recipe at its batch, and of ``hetclip.model`` presets at
``bench/throughput.py``'s batch; fp32 and bf16. Writes ``attention.json`` and ``attention.md``
(median seconds per call, ratio dot_product_attention / heads-major).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

import jax
import jax.numpy as jnp

from _common import RESULTS, machine, timed
from hetclip import towers
from hetclip.config import load_config
from hetclip.model import ModelConfig, preset
from throughput import arch


def cases(model: str) -> list[tuple]:
    """``(name, batch, tokens, width, heads, causal)`` of both towers of ``model``: ``demo`` (the recipe's
    model and batch) or a ``hetclip.model`` preset (throughput.py's batch)."""
    if model == "demo":
        recipe = load_config("demo")
        cfg, batch = ModelConfig.from_dict(recipe.model.to_dict()), recipe.batch_size
    else:
        cfg, batch = preset(model), arch(model)["batch"]
    v, t = cfg.vision, cfg.text
    return [(f"{model} image", batch, (v.image_size // v.patch_size) ** 2 + 1, v.width, v.heads, False),
            (f"{model} text", batch, t.context_length, t.width, t.heads, True)]


def step_fns(batch, tokens, width, heads, causal, dtype):
    x = jax.random.normal(jax.random.key(0), (batch, tokens, width), jnp.float32)
    fns, params = {}, None
    for label, attention in (("dot_product_attention", "xla"), ("heads_major", "auto")):
        mod = towers.SelfAttention(width, heads, layers=12, causal=causal, dtype=dtype, attention=attention)
        params = params or mod.init(jax.random.key(1), x)["params"]
        step = jax.jit(jax.grad(lambda p, x, m=mod: jnp.sum(m.apply({"params": p}, x) ** 2), argnums=(0, 1)))
        fns[label] = lambda step=step: jax.block_until_ready(step(params, x))
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    p.add_argument("--repeats", type=int, default=5, help="calls per round")
    p.add_argument("--models", default="demo,B/32", help="comma list: demo and/or hetclip.model presets")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default=os.path.join(RESULTS, "attention"))
    args = p.parse_args(argv)
    try:
        shapes = [c for m in args.models.split(",") if m for c in cases(m)]
        dtypes = [jnp.dtype(d) for d in args.dtypes.split(",") if d]
    except (ValueError, TypeError) as e:
        p.error(str(e))
    rows = []
    for dtype in dtypes:
        for name, b, t, w, h, causal in shapes:
            fns = step_fns(b, t, w, h, causal, dtype)
            for f in fns.values():
                f()  # compile
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, f in fns.items():
                    times[k] += timed(f, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"case": name, "dtype": jnp.dtype(dtype).name, "batch": b, "tokens": t, "width": w,
                         "heads": h, "causal": causal, "median_s": med,
                         "ratio": med["dot_product_attention"] / med["heads_major"]})
            print(f"{name:11s} {jnp.dtype(dtype).name:8s} dpa {med['dot_product_attention'] * 1e3:8.2f} ms  "
                  f"heads-major {med['heads_major'] * 1e3:8.2f} ms  ratio {rows[-1]['ratio']:.2f}", flush=True)
    meta = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), **machine(),
            "jax": jax.__version__, "python": platform.python_version(), "rounds": args.rounds,
            "repeats": args.repeats}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [f"# Attention block forward+backward: dot_product_attention vs heads-major einsums",
             "", f"{meta['cpu']}; load {meta['loadavg']}; jax {meta['jax']}; median of "
             f"{args.rounds}x{args.repeats} interleaved calls.", "",
             "| case | dtype | batch×tokens×width, heads | dot_product_attention ms | heads-major ms | ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['batch']}×{r['tokens']}×{r['width']}, {r['heads']} | "
                     f"{r['median_s']['dot_product_attention'] * 1e3:.2f} | {r['median_s']['heads_major'] * 1e3:.2f} | "
                     f"{r['ratio']:.2f} |")
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
