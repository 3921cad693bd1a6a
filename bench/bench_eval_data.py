"""Evaluation image loading (zero-shot / ImageNet-style class folders): images/s and where the CPU goes,
this tree against ``--before REF`` in the same run, with their ratio (not a test).

The data: ``--images`` JPEGs (quality 90) in 10 class folders, cut from scikit-learn's two sample photos at
random positions and scales so that the shortest side is 375-500 px, as in ImageNet's validation set. Each
version loads them all at ``--size`` (resize shortest side + centre crop) in ``--batch-size`` batches, in a
fresh subprocess per run, and reports wall images/s, CPU ms per image in the main process (everything it
runs, threads included) and in worker processes, and the host rate these imply for 8, 32 and 96 cores
(main process serial; ``cores - 1`` cores for workers). Worker CPU is what the worker processes used
from their start to the last batch (their start-up included). For every worker count the ratio
*before / after* of main-process CPU per image and of images/s is reported.

    python bench/bench_eval_data.py --before REF --images 512 --workers 0,2 --tag zen4

Writes ``bench/results/eval_data[_TAG].json`` and ``.md``: one file pair per CPU kind (``--tag``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from _common import RESULTS, add_before_after_args, extract_ref, machine, run_json_child


def make_folder(root: str, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 427 x 640 each
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = photos[i % len(photos)]
        short = int(rng.integers(375, 501))
        scale = short / min(src.size)
        img = src.resize((max(short, int(src.size[0] * scale * rng.uniform(1.0, 1.3))),
                          max(short, int(src.size[1] * scale * rng.uniform(1.0, 1.3)))), Image.BICUBIC)
        w, h = img.size
        x, y = int(rng.integers(0, w - short + 1)), int(rng.integers(0, h - short + 1))
        img = img.crop((x, y, x + max(short, w - x if rng.random() < 0.5 else short),
                        y + max(short, h - y if rng.random() < 0.5 else short)))
        d = os.path.join(root, f"class{i % 10:02d}")
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def child(args: argparse.Namespace) -> None:
    """Load the folder with whichever ``hetclip`` is importable; print one JSON line."""
    import psutil

    from hetclip.zero_shot import datasets as ds

    me = psutil.Process()
    workers: list = []

    def worker_cpu() -> float:
        """CPU seconds of the worker processes found at the first batch (listing the children scans every
        process of the machine, so it is done once, not per batch)."""
        if not workers:
            workers.extend(me.children(recursive=True))
        total = 0.0
        for c in workers:
            try:
                total += sum(c.cpu_times()[:2])
            except psutil.Error:  # it exited with the loader
                pass
        return total

    source = ds.ImageFolder(args.root)
    if hasattr(ds, "eval_batches"):
        batches = ds.eval_batches(source, args.size, args.batch_size, workers=args.workers)
    else:  # a tree before the shared loader: a thread pool in this process
        batches = ds.EvalBatches(source, args.size, args.batch_size, workers=max(1, args.workers))
    t0, m0 = time.perf_counter(), time.process_time()
    n, w_peak = 0, 0.0
    for i, b in enumerate(batches):
        n += len(b["image"])
        w_peak = max(w_peak, worker_cpu()) if args.workers else 0.0  # workers exit with the loader
        dtype = str(b["image"].dtype)
    dt, main = time.perf_counter() - t0, time.process_time() - m0
    print(json.dumps({"images": n, "images_per_s": n / dt, "main_ms_per_image": 1e3 * main / n,
                      "worker_ms_per_image": 1e3 * w_peak / n, "image_dtype": dtype}))


def implied(r: dict, cores: int) -> float:
    main = 1e3 / max(r["main_ms_per_image"], 1e-9)
    if r["worker_ms_per_image"] < 1e-6:    # no worker processes: the main process is the whole pipeline
        return main
    return min(main, (cores - 1) * 1e3 / r["worker_ms_per_image"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_before_after_args(ap, "evaluation loader")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        args.workers = int(args.workers)
        return child(args)
    workers = [int(w) for w in str(args.workers).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "folder")
        make_folder(root, args.images)
        versions = [("after", None)]
        if args.before:
            versions.insert(0, ("before", extract_ref(args.before, os.path.join(tmp, "before"))))
        load_before = os.getloadavg()
        rows, ratios = [], []
        for w in workers:
            best: dict[str, dict] = {}
            for _ in range(args.rounds):          # interleaved; per figure the best run is kept
                for name, path in versions:
                    env = dict(os.environ)
                    if path:
                        env["PYTHONPATH"] = path
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--root", root, "--workers", str(w),
                           "--size", str(args.size), "--batch-size", str(args.batch_size)]
                    r = run_json_child(cmd, env, "/")
                    if name not in best:
                        best[name] = r
                    else:  # CPU times are inflated by other jobs' load, never deflated: the least is the fair one
                        q = best[name]
                        q["images_per_s"] = max(q["images_per_s"], r["images_per_s"])
                        q["main_ms_per_image"] = min(q["main_ms_per_image"], r["main_ms_per_image"])
                        q["worker_ms_per_image"] = min(q["worker_ms_per_image"], r["worker_ms_per_image"])
            for name, _ in versions:
                r = best[name]
                rows.append({"version": name, "workers": w, **r,
                             **{f"host_images_per_s_{c}_cores": implied(r, c) for c in (8, 32, 96)}})
            if len(versions) == 2:
                b, a = best["before"], best["after"]
                ratios.append({"workers": w,
                               "main_cpu_before_over_after": b["main_ms_per_image"] / max(a["main_ms_per_image"], 1e-9),
                               "images_per_s_after_over_before": a["images_per_s"] / b["images_per_s"]})
    meta = {**machine(), "before": args.before, "images": args.images, "size": args.size,
            "batch_size": args.batch_size, "rounds": args.rounds, "load_before": " ".join(f"{x:.2f}" for x in load_before)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "eval_data" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "ratios": ratios}, f, indent=2)
    lines = [f"# Evaluation image loading: `{args.before or '-'}` (before) vs this tree (after)", "",
             f"CPU: {meta['cpu']}; load average {meta['load_before']} at the start, {meta['loadavg']} at the end. "
             f"{args.images} JPEGs (shortest side 375-500 px) in 10 class folders, loaded at {args.size} px in "
             f"batches of {args.batch_size}; best of {args.rounds} interleaved runs per figure. *before* is the loader of "
             f"`{args.before or '-'}`, *after* this tree's; 0 workers decode in the main process.", "",
             f"Command: `python bench/bench_eval_data.py --before {args.before} --images {args.images} "
             f"--workers {args.workers} --rounds {args.rounds}" + (f" --tag {args.tag}" if args.tag else "") + "`", "",
             "| version | workers | images/s | main CPU ms/img | worker CPU ms/img | host img/s at 8 / 32 / 96 cores |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['version']} | {r['workers']} | {r['images_per_s']:.0f} | {r['main_ms_per_image']:.3f} | "
                     f"{r['worker_ms_per_image']:.3f} | {r['host_images_per_s_8_cores']:.0f} / "
                     f"{r['host_images_per_s_32_cores']:.0f} / {r['host_images_per_s_96_cores']:.0f} |")
    if ratios:
        lines += ["", "| workers | main CPU per image, before / after | images/s, after / before |", "|---|---|---|"]
        lines += [f"| {q['workers']} | {q['main_cpu_before_over_after']:.1f}x | "
                  f"{q['images_per_s_after_over_before']:.2f}x |" for q in ratios]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
