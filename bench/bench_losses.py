"""Benchmark of the contrastive losses: forward+backward time and compile-time peak temp memory.

DET (CLIP) and HET-XL losses, chunked (``hetclip.losses.clip_loss``/``hetxl_loss``) vs naive
(``*_naive``, which materialise the ``[N, N]`` / ``[N, S, N]`` logits), for N ∈ {256, 1024, 4096},
S ∈ {1, 8, 32}, D = 512, on one device. For each case:

* ``temp_mib``: XLA's compile-time temp allocation of the jitted value-and-grad function
  (``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``), i.e. the peak
  scratch memory on top of the inputs and outputs;
* ``time_s``: median wall time of the jitted value-and-grad call after one warm-up call
  (fewer repeats when a call is slow), plus the process's peak RSS after the case.

Naive cases whose logits would need more than ``--naive-limit-gib`` are compiled (for their memory
figure) but not run. Writes ``bench_losses.json`` and ``bench_losses.md`` to ``--out``.

    python bench/bench_losses.py            # full grid (several minutes on a shared 2-core CPU)
    python bench/bench_losses.py --quick    # N ∈ {256, 1024}, S ∈ {1, 8}
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from _common import RESULTS, machine
from hetclip import losses

MIB = 2 ** 20


def make_inputs(n: int, d: int, r: int, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 5)
    mean = jax.random.normal(k[0], (n, d))
    txt = jax.random.normal(k[1], (n, d))
    noise = {"d": 0.05 * jax.nn.softplus(jax.random.normal(k[2], (n, d))),
             "v": 0.05 * jax.random.normal(k[3], (n, d)),
             "C": jax.random.normal(k[4], (d, r)) / math.sqrt(r)}
    return mean, noise, txt, jnp.float32(1 / 0.07), jax.random.key(seed + 1)


def build(loss: str, impl: str, s: int, key, *, sample_chunk, class_chunk, matmul_dtype):
    """A jitted ``(mean, noise, txt, scale) -> (loss, grads)`` for one case."""
    if loss == "det":
        if impl == "naive":
            fn = lambda m, nz, t, sc: losses.clip_loss_naive(m, t, sc)[0]
        else:
            fn = lambda m, nz, t, sc: losses.clip_loss(m, t, sc, class_chunk=class_chunk,
                                                       matmul_dtype=matmul_dtype)[0]
        argnums = (0, 2, 3)
    else:
        if impl == "naive":
            fn = lambda m, nz, t, sc: losses.hetxl_loss_naive(m, nz, t, sc, key, mc_samples=s)[0]
        else:
            fn = lambda m, nz, t, sc: losses.hetxl_loss(m, nz, t, sc, key, mc_samples=s, sample_chunk=sample_chunk,
                                                        class_chunk=class_chunk, matmul_dtype=matmul_dtype)[0]
        argnums = (0, 1, 2, 3)
    return jax.jit(jax.value_and_grad(fn, argnums=argnums))


def run_case(loss, impl, n, s, args, ns):
    mean, noise, txt, scale, key = make_inputs(n, args.dim, args.rank)
    class_chunk = None if n <= args.class_chunk else args.class_chunk
    sample_chunk = min(args.sample_chunk, s)
    rec = {"loss": loss, "impl": impl, "N": n, "S": s, "D": args.dim, "R": args.rank,
           "sample_chunk": sample_chunk if (impl == "chunked" and loss == "hetxl") else None,
           "class_chunk": class_chunk if impl == "chunked" else None,
           "matmul_dtype": args.matmul_dtype if impl == "chunked" else "float32"}
    f = build(loss, impl, s, key, sample_chunk=sample_chunk, class_chunk=class_chunk, matmul_dtype=ns.matmul_dtype)
    t0 = time.perf_counter()
    compiled = f.lower(mean, noise, txt, scale).compile()
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    rec["temp_mib"] = round(mem.temp_size_in_bytes / MIB, 2) if mem is not None else None
    logits_gib = n * (s if loss == "hetxl" else 1) * n * 4 / 2 ** 30
    if impl == "naive" and logits_gib > args.naive_limit_gib:
        rec["status"] = f"not run: the naive logits alone are {logits_gib:.1f} GiB (> {args.naive_limit_gib} GiB)"
        return rec
    call = lambda: jax.block_until_ready(compiled(mean, noise, txt, scale))
    t0 = time.perf_counter()
    out = call()  # warm-up (the program is already compiled)
    first = time.perf_counter() - t0
    times = []
    if first >= args.slow_call_s:  # a slow call: the warm-up itself is the measurement
        times.append(first)
    for _ in range(args.repeats if first < args.slow_call_s else 0):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    rec.update(time_s=round(statistics.median(times), 4), times_s=[round(t, 4) for t in times],
               loss_value=float(out[0]), peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               status="ok")
    return rec


def markdown(records, meta) -> str:
    lines = [
        "# Contrastive loss benchmark (forward + backward, one device)",
        "",
        f"Command: `{meta['command']}`  ",
        f"{meta['date']}, {meta.get('cpu', meta['backend'])}, load {meta.get('loadavg', '?')}, JAX {meta['jax']}, "
        f"{meta['backend']} ({meta['cpus']} CPUs visible, shared machine), "
        f"D={meta['dim']}, R={meta['rank']}, sample_chunk={meta['sample_chunk']}, class_chunk={meta['class_chunk']} "
        f"(for N > class_chunk), chunked matmul dtype {meta['matmul_dtype']}.",
        "",
        "`temp MiB` is XLA's compile-time temp allocation of the jitted value-and-grad (peak scratch memory "
        "besides inputs/outputs). `time s` is the median fwd+bwd wall time after a warm-up; `time/S` the "
        "time per Monte-Carlo sample.",
        "",
        "| loss | impl | N | S | temp MiB | time s | time/S s | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        t = r.get("time_s")
        per_s = "" if t is None or r["loss"] == "det" else f"{t / r['S']:.4f}"
        note = "" if r["status"] == "ok" else r["status"]
        s = r["S"] if r["loss"] == "hetxl" else "—"
        lines.append(f"| {r['loss']} | {r['impl']} | {r['N']} | {s} | "
                     f"{'' if r['temp_mib'] is None else r['temp_mib']} | {'' if t is None else f'{t:.4f}'} | "
                     f"{per_s} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N ∈ {256, 1024}, S ∈ {1, 8}")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="batch sizes N (default 256 1024 4096)")
    p.add_argument("--samples", type=int, nargs="*", default=None, help="MC samples S (default 1 8 32)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sample-chunk", type=int, default=4)
    p.add_argument("--class-chunk", type=int, default=1024)
    p.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slow-call-s", type=float, default=15.0,
                   help="when the warm-up call is slower than this, it is the only timed call")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing bench_losses.json in --out (same cases are replaced)")
    p.add_argument("--naive-limit-gib", type=float, default=0.5)
    p.add_argument("--impls", nargs="*", default=["chunked", "naive"], choices=["chunked", "naive"])
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    sizes = args.sizes or ([256, 1024] if args.quick else [256, 1024, 4096])
    samples = args.samples or ([1, 8] if args.quick else [1, 8, 32])
    ns = argparse.Namespace(matmul_dtype=None if args.matmul_dtype == "float32" else jnp.bfloat16)

    meta = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
            "backend": f"{jax.default_backend()} {platform.processor() or platform.machine()}",
            "cpus": os.cpu_count(), "dim": args.dim, "rank": args.rank, "sample_chunk": args.sample_chunk,
            "class_chunk": args.class_chunk, "matmul_dtype": args.matmul_dtype, **machine()}
    records = []
    json_path = os.path.join(args.out, "bench_losses.json")
    if args.append and os.path.exists(json_path):
        with open(json_path) as fh:
            old = json.load(fh)
        records = old["records"]
        meta["command"] = old["meta"]["command"] + "; " + meta["command"]
    case_key = lambda r: (r["loss"], r["impl"], r["N"], r["S"])
    cases = []
    for n in sizes:
        for impl in args.impls:
            cases.append(("det", impl, n, 1))
            cases += [("hetxl", impl, n, s) for s in samples]
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    for loss, impl, n, s in cases:
        rec = run_case(loss, impl, n, s, args, ns)
        records = [r for r in records if case_key(r) != case_key(rec)] + [rec]
        records.sort(key=lambda r: (r["N"], r["impl"], r["loss"], r["S"]))
        print(json.dumps(rec), flush=True)
        meta["run_s"] = round(time.perf_counter() - t_start, 1)
        with open(json_path, "w") as fh:  # after every case, so a long run can be stopped
            json.dump({"meta": meta, "records": records}, fh, indent=1)
        table = markdown(records, meta)
        with open(os.path.join(args.out, "bench_losses.md"), "w") as fh:
            fh.write(table)
    print(table)


if __name__ == "__main__":
    main()
