"""Training throughput (samples/s) of hetclip-train, DET vs HET-XL, input pipeline on vs off.

    python bench/bench_train.py [--quick] [--out bench/results/train]

Each case runs the real training loop (``hetclip.train.train``) for a few steps on this machine and
reads the steady-state samples/s from its metrics (the first steps, which compile, are dropped).
"data on" reads demo-style shards through the worker-process loader; "data off" feeds a fixed
synthetic batch, so the difference is what the input pipeline costs. Writes JSON + a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import ml_collections

from _common import RESULTS, machine


def case_config(base: str, het: bool, synthetic: bool, *, batch: int, steps: int, image_size: int, demo_dir: str,
                workers: int):
    from hetclip import config as config_lib

    c = config_lib.load_config(f"{base}:het" if het else base)
    c = ml_collections.ConfigDict(c.to_dict())
    c.batch_size = batch
    c.total_steps = steps + 10  # warm-up steps never reach the end of the schedule
    c.log_every = 1
    c.tensorboard = False
    c.optim.warmup_steps = 2
    c.data.synthetic = synthetic
    c.data.image_size = image_size
    c.data.num_workers = workers
    c.checkpoint.every_steps = 0
    c.evals = []
    c.export.format = ""
    c.demo.enabled = True
    c.demo.dir = demo_dir
    c.demo.params = dict(seed=0, image_size=image_size, num_train=max(4 * batch * (steps + 2), 512),
                         shard_size=512, eval_per_class=2, eval_per_combo=1, image_format="jpg")
    if base != "demo":  # CLIP-size model: its own context length with the demo's BPE
        c.data.tokenizer.context_length = c.model.text.context_length
    c.lock()
    return c


def run_case(name, cfg, skip: int):
    from hetclip import train as train_lib

    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        train_lib.train(cfg, work, progress=False, max_steps=cfg.total_steps - 10)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    rows = [r for r in rows if "samples_per_sec" in r][skip:]
    sps = [r["samples_per_sec"] for r in rows]
    wait = [r["data_wait_frac"] for r in rows]
    return {"case": name, "steps_timed": len(sps), "samples_per_sec_median": statistics.median(sps),
            "samples_per_sec_min": min(sps), "samples_per_sec_max": max(sps),
            "data_wait_frac_median": statistics.median(wait), "wall_s": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps; demo model only")
    p.add_argument("--out", default=os.path.join(RESULTS, "train"))
    p.add_argument("--demo-dir", default=os.path.join(tempfile.gettempdir(), "hetclip_bench_demo"))
    args = p.parse_args(argv)
    steps = 8 if args.quick else 20
    cases = []
    for het in (False, True):
        for synthetic in (True, False):
            cases.append(("demo", het, synthetic, 128, steps, 64))
    if not args.quick:
        for het in (False, True):
            for synthetic in (True, False):
                cases.append(("clip_b32", het, synthetic, 16, 4, 224))
    results = []
    start = machine()
    for base, het, synthetic, batch, n, size in cases:
        name = f"{base} {'HET-XL' if het else 'DET'} batch {batch} {size}px data {'off' if synthetic else 'on'}"
        cfg = case_config(base, het, synthetic, batch=batch, steps=n, image_size=size,
                          demo_dir=f"{args.demo_dir}_{size}", workers=2)
        res = run_case(name, cfg, skip=2)
        res.update(model=base, het=het, data="off" if synthetic else "on", batch=batch, image_size=size)
        print(json.dumps(res), flush=True)
        results.append(res)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": start["cpu"],
            "loadavg_start": start["loadavg"], "loadavg_end": machine()["loadavg"]}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    lines = ["| case | samples/s (median) | min–max | data wait | HET-XL/DET time |", "|---|---|---|---|---|"]
    det = {(r["model"], r["data"]): r["samples_per_sec_median"] for r in results if not r["het"]}
    for r in results:
        ratio = det.get((r["model"], r["data"])) / r["samples_per_sec_median"] if r["het"] else 1.0
        lines.append(f"| {r['case']} | {r['samples_per_sec_median']:.1f} | {r['samples_per_sec_min']:.1f}–"
                     f"{r['samples_per_sec_max']:.1f} | {100 * r['data_wait_frac_median']:.0f}% | {ratio:.2f}× |")
    table = "\n".join(lines)
    with open(args.out + ".md", "w") as f:
        f.write(f"Command: `python bench/bench_train.py{' --quick' if args.quick else ''}`; {meta['time']}, "
                f"{meta['cpu']}, load {meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end\n\n"
                f"{table}\n")
    print(table)


if __name__ == "__main__":
    from hetclip.allocator import reexec_with_mimalloc

    reexec_with_mimalloc()  # measure the loop as hetclip-train runs it (glibc's allocator is much slower)
    main()
