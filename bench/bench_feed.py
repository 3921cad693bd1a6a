"""Host-side feed rate of the training loop: ``hetclip.train.train`` with a null device step (not a test).

The real loop (loader, host->device placement, metrics, checkpoint bookkeeping) runs over 224-px
JPEG shards (``bench_data.make_photo_shards``), but the jitted step only touches one element of the
batch and leaves the parameters alone: what is measured is how many images/s the host side can feed.
``--before REF`` runs the same in a subprocess whose ``hetclip`` is the tree of git ref ``REF``
(extracted with ``git archive``), so both loops are measured in one run on one machine.

For each version and worker count it records images/s (wall, median of the logging windows after the
first), CPU milliseconds per image of the main process (all its threads) and of the data workers,
and the data-wait fraction the loop reports. Writes ``bench/results/feed_<tag>.json`` and ``.md``::

    python bench/bench_feed.py [--before main] [--workers 1,2] [--steps 60] [--batch-size 64] [--tag xeon]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from _common import REPO, add_before_after_args, extract_ref, run_json_child


def null_train_step(model_cfg, optimizer, mesh, accum_steps=1):
    """A step that reads one element of the batch and returns the state unchanged (plus the step count)."""
    import jax.numpy as jnp

    def step(state, batch, key):
        touch = batch["image"][0, 0, 0, 0].astype(jnp.float32) + batch["text"][0, 0].astype(jnp.float32)
        zero = touch * 0.0
        metrics = {"loss": zero, "grad_norm": zero + 1.0, "param_norm": zero + 1.0, "temperature": zero + 0.07}
        return dict(state, step=state["step"] + 1), metrics

    return step


def child(args: argparse.Namespace) -> None:
    """Run the loop once in this process and print one JSON line."""
    import psutil

    from hetclip import runlog
    from hetclip import train as train_lib
    from hetclip.configs._base import base_config

    train_lib.make_train_step = null_train_step
    marks: list[tuple[int, float, float, float]] = []
    me = psutil.Process()
    original = runlog.MetricsWriter.write

    def write(self, step, scalars):
        if "samples_per_sec" in scalars:
            workers = sum(sum(c.cpu_times()[:2]) for c in me.children(recursive=True) if c.is_running())
            marks.append((step, time.perf_counter(), time.process_time(), workers, scalars["data_wait_frac"]))
        return original(self, step, scalars)

    runlog.MetricsWriter.write = write
    c = base_config("tiny", vision=dict(width=32, layers=1, heads=2, patch_size=32, image_size=224),
                    text=dict(width=32, layers=1, heads=2, context_length=77), embed_dim=16)
    with c.unlocked():
        c.batch_size = args.batch_size
        c.total_steps = args.steps
        c.log_every = args.log_every
        c.tensorboard = False
        c.optim.update(warmup_steps=1)
        c.data.update(shards=args.shards, image_size=224, num_workers=args.workers, shuffle_buffer=256,
                      tokenizer=dict(kind="hf", path=args.tokenizer, context_length=77, lower_case=True))
        c.checkpoint.update(every_steps=0, keep=1, async_save=False)
        c.evals = []
    with tempfile.TemporaryDirectory() as work:
        train_lib.train(c, work, progress=False)
    # windows after the first (compilation, worker start-up)
    rates, main_ms, worker_ms, waits = [], [], [], []
    for (s0, t0, c0, w0, _), (s1, t1, c1, w1, wait) in zip(marks[1:], marks[2:]):
        n = (s1 - s0) * args.batch_size
        rates.append(n / (t1 - t0))
        main_ms.append(1e3 * (c1 - c0) / n)
        worker_ms.append(1e3 * (w1 - w0) / n)
        waits.append(wait)
    print(json.dumps({"images_per_s": statistics.median(rates), "main_ms_per_image": statistics.median(main_ms),
                      "worker_ms_per_image": statistics.median(worker_ms), "data_wait_frac": statistics.median(waits),
                      "windows": len(rates)}))


def run_child(pythonpath: str | None, args: argparse.Namespace, shards: str, tok: str, workers: int) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shards", shards, "--tokenizer", tok,
           "--workers", str(workers), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--log-every", str(args.log_every)]
    return run_json_child(cmd, env, REPO)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards")
    ap.add_argument("--tokenizer")
    add_before_after_args(ap, "loop")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=768)
    args = ap.parse_args()
    if args.steps < 3 * args.log_every:
        ap.error(f"--steps {args.steps}: needs at least 3 logging windows of --log-every {args.log_every} "
                 "(the first one is warm-up)")
    if args.child:
        args.workers = int(args.workers)
        return child(args)
    from hetclip.xla import cpu_description

    import bench_data as bd  # its shard and tokenizer builders

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = bd.make_photo_shards(os.path.join(tmp, "224"), args.images, "224")
        from hetclip.data.shards import expand_pattern, iter_shard

        caps = [s["txt"].decode() for u in expand_pattern(shards) for s in iter_shard(u)]
        bd.make_tokenizer(tmp, caps)
        tok = os.path.join(tmp, "tok")
        versions = [("after (this tree)", None)]
        if args.before:
            versions.insert(0, (f"before ({args.before})", extract_ref(args.before, os.path.join(tmp, "before"))))
        runs: dict = {}
        for _ in range(args.rounds):  # interleaved, so load changes hit every configuration alike
            for name, path in versions:
                for w in (int(x) for x in args.workers.split(",")):
                    r = run_child(path, args, shards, tok, w)
                    print(name, w, r, flush=True)
                    runs.setdefault((name, w), []).append(r)
        for (name, w), rs in runs.items():
            best = max(rs, key=lambda r: r["images_per_s"])
            rows.append({"version": name, "workers": w, **best, "runs": rs})
    meta = {"cpu": cpu_description(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "load_before": load_before, "load_after": os.getloadavg(), "steps": args.steps,
            "batch_size": args.batch_size, "log_every": args.log_every, "images": args.images,
            "rounds": args.rounds, "before": args.before}
    tag = f"_{args.tag}" if args.tag else ""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"feed{tag}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    render(os.path.join(args.out, f"feed{tag}"), meta, rows, args.tag)


def render(stem: str, meta: dict, rows: list[dict], tag: str = "") -> None:
    """Write ``stem.md`` from the measured rows (also usable on a saved JSON)."""
    lines = ["# Host-side feed rate of the training loop (null device step)", "",
             f"Command: `python bench/bench_feed.py --before {meta['before']} --steps {meta['steps']} --batch-size "
             f"{meta['batch_size']}{' --tag ' + tag if tag else ''}`; CPU: {meta['cpu']} "
             f"({meta['cpu_count']} cores, shared with other jobs); load average before "
             f"{meta['load_before'][0]:.1f}, after {meta['load_after'][0]:.1f}. 224-px JPEG shards "
             f"({meta['images']} images), one local device; best of {meta['rounds']} interleaved runs.", "",
             "| loop | workers | images/s (wall) | main-process CPU ms/image | main-process ceiling, images/s | "
             "worker CPU ms/image | data wait |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['version']} | {r['workers']} | {r['images_per_s']:.0f} | {r['main_ms_per_image']:.3f} | "
                     f"{1e3 / r['main_ms_per_image']:,.0f} | {r['worker_ms_per_image']:.2f} | "
                     f"{r['data_wait_frac']:.0%} |")
    by = {(r["version"].split()[0], r["workers"]): r for r in rows}
    lines.append("")
    for w in sorted({r["workers"] for r in rows}):
        if ("before", w) in by and ("after", w) in by:
            b, a = by[("before", w)], by[("after", w)]
            lines.append(f"* {w} worker(s): after/before = {a['images_per_s'] / b['images_per_s']:.2f}x images/s "
                         f"(wall); main-process CPU per image {b['main_ms_per_image'] / a['main_ms_per_image']:.1f}x "
                         "lower.")
    lines += ["* The main-process ceiling (1000 / main CPU ms per image) is what one host can feed at most, "
              "however many cores decode. On a machine with fewer cores than decoding needs (2 shared cores "
              "here, ~1 ms of worker CPU per image), the wall rate is bounded by the workers' CPU instead, "
              "so the wall ratio here understates the gain on an accelerator host."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
