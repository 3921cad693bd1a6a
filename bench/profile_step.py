"""Where a hetclip training step spends its time: a per-op profile grouped by kind, next to this CPU's
matmul ceiling measured in the same run.

    python bench/profile_step.py [--model tiny] [--dtype float32] [--het 0] [--batch 64] [--steps 3]

The step is the one ``bench/throughput.py`` times (``hetclip.step.make_train_step``, base-recipe AdamW,
donated state). It is compiled once; the optimised HLO names every op XLA:CPU runs, and a JAX profiler
trace of ``--steps`` steps gives each op's time. Ops are grouped by what they compute:

- ``dense matmul``: dots without batch dimensions (projections, MLP, patch embedding, and their gradients);
- ``attention matmul``: batched dots (``q·kᵀ``, ``p·v`` and their gradients);
- ``layout copy``: fusions that only move data (transpose / copy / reshape / concatenate / slice ...);
- ``reduction``: fusions with a reduce (softmax, LayerNorm, loss, bias gradients, norms);
- ``elementwise``: the rest (activations, residual adds, the optimizer update);
- ``async matmul``: matmuls whose trace event is far too short to be their execution (implied rate above
  1.5x the ceiling below): XLA:CPU launches them on its thread pool and the event covers the launch only,
  so their real time is hidden inside the ops that run meanwhile on the same cores.

The matmul ceiling is the best rate of ``[B·T, W] x [W, mlp]`` (the image tower's MLP matmul) in the step's dtype, timed
alone with JAX and, when ``--torch-python`` points at a python with torch, with PyTorch on the same
threads. From it the report derives the shortest step possible if every op but the dense matmuls were
free and they ran at the ceiling: measured step / that bound is the most any change outside the matmul
kernels could gain. That bound uses wall times only; the per-kind rows are the profiler's per-op events,
which overlap when XLA runs independent ops on different cores (their sum can exceed the step's wall
time) and miss the asynchronous matmuls, so they show where time goes, not an exclusive split.

Writes ``<out>.json`` (op groups) and ``<out>.md`` (default ``bench/results/profile_<model>_<dtype>``).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from _common import RESULTS, timed
from throughput import arch, hetclip_inputs, hetclip_model_cfg, hetclip_train_parts  # no jax at import

KINDS = ("dense matmul", "attention matmul", "layout copy", "reduction", "elementwise", "async matmul")
_MOVE_OPS = {"parameter", "constant", "transpose", "copy", "bitcast", "reshape", "broadcast", "concatenate",
             "slice", "dynamic-slice", "dynamic-update-slice", "pad", "gather", "scatter", "tuple",
             "get-tuple-element", "iota", "convert", "reverse", "select"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")  # computations start at column 0


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str) -> tuple[dict, dict]:
    """Instructions of an HLO module's text: ``{name: (shape, opcode, rest)}`` and the body of each
    computation ``{computation: [instruction names]}``."""
    instrs, comps, cur = {}, {}, None
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            cur = head.group(1)
            comps[cur] = []
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, op, rest = m.groups()
            instrs[name] = (shape, op, rest)
            if cur is not None:
                comps[cur].append(name)
    return instrs, comps


def _dot_flops(instrs: dict, rest: str, out_shape: str) -> tuple[float, bool]:
    """FLOPs (2 per multiply-add) of a dot and whether it has batch dimensions."""
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    lhs = _dims(instrs[operands[0]][0]) if operands and operands[0] in instrs else []
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i) if contract and lhs else 0
    return 2.0 * math.prod(_dims(out_shape)) * k, "lhs_batch_dims" in rest


def classify(text: str) -> dict:
    """``{op name: {"kind", "flops", "shape", "ops"}}`` for every op of the entry computation of an
    optimised HLO module, ``kind`` one of ``KINDS`` (``flops`` counts matmul FLOPs only)."""
    instrs, comps = parse_hlo(text)
    entry = next((c for c in comps if re.search(rf"ENTRY\s+%?{re.escape(c)}\s", text)), None)
    table = {}
    for name in comps.get(entry, []):
        shape, op, rest = instrs[name]
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = comps.get(called.group(1), []) if called else []
        body_ops = [instrs[n][1] for n in body] if body else [op]
        body_names = body if body else [name]
        flops, batched = 0.0, False
        for n in body_names:
            s, o, r = instrs[n]
            if o == "dot":
                f, b = _dot_flops(instrs, r, s)
                flops += f
                batched = batched or b
        if flops:
            kind = "attention matmul" if batched else "dense matmul"
        elif set(body_ops) <= _MOVE_OPS:
            kind = "layout copy"
        elif any(o in ("reduce", "reduce-window") for o in body_ops):
            kind = "reduction"
        else:
            kind = "elementwise"
        table[name] = {"kind": kind, "flops": flops, "shape": shape,
                       "ops": sorted(set(body_ops) - {"parameter", "constant", "bitcast"})}
    return table


def op_times(trace_events: list, table: dict, steps: int) -> dict:
    """Mean time per step (seconds) of each op in ``table`` from profiler trace events."""
    total = collections.Counter()
    for e in trace_events:
        if e.get("ph") == "X" and e.get("name") in table:
            total[e["name"]] += e["dur"] * 1e-6
    return {name: t / steps for name, t in total.items()}


def mark_async(table: dict, times: dict, max_gflops: float) -> int:
    """Re-label as ``async matmul`` the matmul ops whose traced time implies more than ``max_gflops``;
    returns how many."""
    n = 0
    for name, t in times.items():
        r = table[name]
        if r["flops"] and (t <= 0 or r["flops"] / t / 1e9 > max_gflops):
            r["kind"] = "async matmul"
            n += 1
    return n


def summarise(table: dict, times: dict) -> list[dict]:
    """One row per kind: seconds per step, share of the summed op time, op count, matmul GFLOP/s."""
    busy = sum(times.values()) or 1.0
    rows = []
    for kind in KINDS:
        names = [n for n, r in table.items() if r["kind"] == kind and n in times]
        t = sum(times[n] for n in names)
        flops = sum(table[n]["flops"] for n in names)
        rows.append({"kind": kind, "s": t, "share": t / busy, "ops": len(names), "gflop": flops / 1e9,
                     "gflops_per_s": flops / t / 1e9 if flops and t else None})
    return rows


def group_ops(table: dict, times: dict) -> list[dict]:
    """Ops that ran, grouped by (kind, output shape, fused ops), largest total time first."""
    groups = {}
    for name, t in times.items():
        r = table[name]
        g = groups.setdefault((r["kind"], r["shape"], " ".join(r["ops"])),
                              {"kind": r["kind"], "shape": r["shape"], "ops": r["ops"], "count": 0, "s": 0.0,
                               "flops": 0.0, "example": name})
        g["count"] += 1
        g["s"] += t
        g["flops"] += r["flops"]
    return sorted(groups.values(), key=lambda g: g["s"], reverse=True)


def read_trace(trace_dir: str) -> list:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: did the JAX profiler run?")
    with gzip.open(files[-1], "rt", encoding="utf-8") as f:
        return json.load(f)["traceEvents"]


def jax_matmul_gflops(m: int, k: int, n: int, dtype: str, repeats: int = 20) -> float:
    """Best-of-``repeats`` rate of ``[m,k]·[k,n]`` (a ceiling: the fastest the kernel ran, not its median)."""
    import jax
    import jax.numpy as jnp

    from hetclip.towers import mm

    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    f = jax.jit(lambda a, b: mm(a, b, jnp.dtype(dtype)))
    jax.block_until_ready(f(a, b))
    return 2.0 * m * k * n / _min_time(lambda: jax.block_until_ready(f(a, b)), repeats) / 1e9


TORCH_MATMUL = """
import sys, time, torch
m, k, n, threads, bf16, repeats = (int(x) for x in sys.argv[1:7])
torch.set_num_threads(threads)
a, b = torch.randn(m, k), torch.randn(k, n)
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
    a @ b
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
print(2.0 * m * k * n / min(ts) / 1e9)
"""


def torch_matmul_gflops(python: str, m: int, k: int, n: int, dtype: str, threads: int, repeats: int = 20):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([python, "-c", TORCH_MATMUL, str(m), str(k), str(n), str(threads),
                          str(int(dtype == "bfloat16")), str(repeats)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{python}: torch matmul failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _min_time(fn, n: int) -> float:
    return min(timed(fn, n))


def _median_time(fn, n: int) -> float:
    return statistics.median(timed(fn, n))


def markdown(rep: dict) -> str:
    c = rep["ceiling"]
    lines = [f"# Where a hetclip training step spends its time ({rep['date']})", "",
             f"`{rep['command']}`", "",
             f"Machine: {rep['machine']}; JAX {rep['jax']}, allocator {rep['allocator']}, "
             f"XLA_FLAGS=`{rep['xla_flags']}`. Model {rep['model']}, {rep['dtype']}, batch {rep['batch']}"
             + (f", HET-XL S={rep['het']}" if rep["het"] else ", DET") + ".", "",
             f"Step wall time: median {1e3 * rep['step_s']:.0f} ms over {rep['timed_steps']} untraced steps. "
             f"Op times below are per step, averaged over {rep['steps']} traced steps; their sum "
             f"({1e3 * rep['op_s']:.0f} ms) can exceed the wall time because XLA runs independent ops on "
             "different cores. `async matmul` rows are matmuls launched on XLA's thread pool: the trace sees only "
             "their launch, and their real time is hidden in whatever ran meanwhile on the same cores (so the "
             "other rows' GFLOP/s are lower than those ops would reach alone).", "",
             "| kind | ms per step | share of op time | ops | matmul GFLOP | GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rep["kinds"]:
        g = f"{r['gflop']:.1f}" if r["gflop"] else ""
        rate = f"{r['gflops_per_s']:.0f}" if r["gflops_per_s"] else ""
        lines.append(f"| {r['kind']} | {1e3 * r['s']:.0f} | {100 * r['share']:.0f} % | {r['ops']} | {g} | {rate} |")
    torch_txt = f", PyTorch {c['torch_gflops']:.0f}" if c.get("torch_gflops") else ""
    lines += ["", f"Matmul ceiling, `[{c['m']}x{c['k']}]·[{c['k']}x{c['n']}]` in {rep['dtype']}: JAX "
              f"{c['jax_gflops']:.0f} GFLOP/s{torch_txt}. The step's dense matmuls ({rep['dense_gflop']:.0f} GFLOP) "
              f"at the faster of these rates take ≥ {1e3 * rep['dense_floor_s']:.0f} ms, {100 * rep['dense_floor_s'] / rep['step_s']:.0f} % "
              f"of the measured step: with every other op free the step could be at most "
              f"{rep['step_s'] / rep['dense_floor_s']:.2f}x faster.", "",
             "Largest op groups (same kind, output shape and fused ops):", "",
             "| kind | ops | ms per step | GFLOP/s | output shape | fused ops | example |", "|---|---|---|---|---|---|---|"]
    for g in rep["op_groups"][:rep.get("top", 15)]:
        rate = f"{g['flops'] / g['s'] / 1e9:.0f}" if g["flops"] and g["s"] else ""
        lines.append(f"| {g['kind']} | {g['count']} | {1e3 * g['s']:.1f} | {rate} | `{g['shape']}` | {' '.join(g['ops'])} "
                     f"| `{g['example']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="a hetclip.model preset")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--het", type=int, default=0, help="HET-XL MC samples (0: DET)")
    ap.add_argument("--batch", type=int, default=0, help="default: throughput.py's for the preset")
    ap.add_argument("--steps", type=int, default=3, help="traced steps")
    ap.add_argument("--timed-steps", type=int, default=6, help="untraced steps timed for the wall time")
    ap.add_argument("--top", type=int, default=15, help="op groups listed in the report")
    ap.add_argument("--torch-python", default="../ocvenv/bin/python",
                    help="python with torch for the PyTorch matmul ceiling ('' to skip)")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads for its ceiling")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from hetclip.allocator import loaded_allocator, reexec_with_mimalloc

    reexec_with_mimalloc()
    import jax

    from hetclip.xla import configure_cpu_flags, cpu_description

    configure_cpu_flags()
    try:
        a = arch(args.model)
    except ValueError as e:
        ap.error(f"--model: {e}")
    spec = {"model": args.model, "arch": a, "dtype": args.dtype, "het": args.het, "batch": args.batch or a["batch"]}
    out = args.out or os.path.join(RESULTS, f"profile_{args.model.replace('/', '')}_{args.dtype}")
    n_tok = (a["image"] // a["patch"]) ** 2 + 1
    m, k, n = spec["batch"] * n_tok, a["vw"], 4 * a["vw"]
    jax_before = jax_matmul_gflops(m, k, n, args.dtype)
    from hetclip.model import init_params

    cfg = hetclip_model_cfg(spec)
    params = init_params(cfg, jax.random.key(0))
    step_fn, state, batch = hetclip_train_parts(spec, cfg, params, *hetclip_inputs(spec))
    key = jax.random.key(1)
    compiled = step_fn.lower(state, batch, key).compile()
    table = classify(compiled.as_text())

    def step():
        nonlocal state
        state, metrics = compiled(state, batch, key)
        float(metrics["loss"])

    for _ in range(2):
        step()
    step_s = _median_time(step, args.timed_steps)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                step()
        times = op_times(read_trace(trace_dir), table, args.steps)
    if not times:
        raise RuntimeError("the profiler trace names none of the step's HLO ops (has XLA changed its event names?)")

    # best of two measurements, before and after the step, so a slow moment does not lower the ceiling
    ceiling = {"m": m, "k": k, "n": n, "jax_gflops": max(jax_before, jax_matmul_gflops(m, k, n, args.dtype))}
    if args.torch_python:
        ceiling["torch_gflops"] = torch_matmul_gflops(args.torch_python, m, k, n, args.dtype, args.threads)
    best = max(ceiling["jax_gflops"], ceiling.get("torch_gflops") or 0.0)
    dense_gflop = sum(r["flops"] for r in table.values() if r["kind"] == "dense matmul") / 1e9
    mark_async(table, times, 1.5 * best)
    kinds = summarise(table, times)
    rep = {"date": time.strftime("%Y-%m-%d %H:%M"),
           "command": " ".join(["python", "bench/profile_step.py"] + (argv if argv is not None else sys.argv[1:])),
           "machine": cpu_description(), "jax": jax.__version__, "allocator": loaded_allocator(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), **spec, "steps": args.steps,
           "timed_steps": args.timed_steps, "step_s": step_s, "op_s": sum(times.values()), "kinds": kinds,
           "ceiling": ceiling, "dense_gflop": dense_gflop, "dense_floor_s": dense_gflop / best,
           "top": args.top,
           "op_groups": group_ops(table, times)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=1)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
