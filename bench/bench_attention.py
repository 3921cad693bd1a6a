"""Attention on CPU: ``towers.SelfAttention`` with ``attention="xla"`` (``jax.nn.dot_product_attention``,
[b, t, heads, hd] operands) against ``attention="auto"`` (on CPU ``heads_major_attention``: einsums in
the [b, heads, t, hd] layout), forward + backward of the whole block (q/k/v/out projections
included), interleaved rounds so both see the same machine load.

    python bench/bench_attention.py [--rounds 5] [--out bench/results/attention]

Shapes: the demo recipe's towers (batch 128) and B/32's (batch 32); fp32 and bf16. Writes
``attention.json`` and ``attention.md`` (median seconds per call, ratio new / heads-major).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from hetclip import towers
from hetclip.xla import cpu_description

CASES = [  # name, batch, tokens, width, heads, causal
    ("demo image", 128, 17, 160, 5, False),
    ("demo text", 128, 24, 128, 2, True),
    ("B/32 image", 32, 50, 768, 12, False),
    ("B/32 text", 32, 77, 512, 8, True),
]


def step_fns(batch, tokens, width, heads, causal, dtype):
    x = jax.random.normal(jax.random.key(0), (batch, tokens, width), jnp.float32)
    fns, params = {}, None
    for label, attention in (("dot_product_attention", "xla"), ("heads_major", "auto")):
        mod = towers.SelfAttention(width, heads, layers=12, causal=causal, dtype=dtype, attention=attention)
        params = params or mod.init(jax.random.key(1), x)["params"]
        step = jax.jit(jax.grad(lambda p, x, m=mod: jnp.sum(m.apply({"params": p}, x) ** 2), argnums=(0, 1)))
        fns[label] = lambda step=step: jax.block_until_ready(step(params, x))
    return fns


def time_call(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    p.add_argument("--repeats", type=int, default=5, help="calls per round")
    p.add_argument("--out", default="bench/results/attention")
    args = p.parse_args(argv)
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for name, b, t, w, h, causal in CASES:
            fns = step_fns(b, t, w, h, causal, dtype)
            for f in fns.values():
                f()  # compile
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, f in fns.items():
                    times[k] += time_call(f, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"case": name, "dtype": jnp.dtype(dtype).name, "batch": b, "tokens": t, "width": w,
                         "heads": h, "causal": causal, "median_s": med,
                         "ratio": med["dot_product_attention"] / med["heads_major"]})
            print(f"{name:11s} {jnp.dtype(dtype).name:8s} dpa {med['dot_product_attention'] * 1e3:8.2f} ms  "
                  f"heads-major {med['heads_major'] * 1e3:8.2f} ms  ratio {rows[-1]['ratio']:.2f}", flush=True)
    meta = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "cpu": cpu_description(),
            "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
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
