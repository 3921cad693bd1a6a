"""Input-pipeline throughput: images/s of decode + augment + tokenize into batches (not a test).

Builds JPEG shards from scikit-learn's two sample photos (random crops, rescaled so the shortest side
is 256-512 px, quality 90: typical img2dataset output), then measures

* ``single-core``: ``train_transform_uint8`` in this process (decode + random resized crop + resize),
  with and without the JPEG ``draft`` shortcut: the per-core cost of the work the workers do;
* ``loader``: ``make_train_loader`` end to end (shard reading, shuffle buffer, worker processes,
  normalisation, tokenization, batching) with 1 and 2 workers, at 224 and 64 pixels.

Writes ``bench/results/data.json`` and ``bench/results/data.md``. Usage::

    python bench/bench_data.py [--images 512] [--batches 24] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time

import numpy as np
from PIL import Image

from hetclip.data import decode
from hetclip.data.loader import make_train_loader
from hetclip.data.tools import ShardWriter

WORDS = ("a photo of the red flower garden temple roof in china at night with trees blue sky old "
         "building petals close up view of a small").split()


def make_shards(out: str, n: int, seed: int = 0, shard_size: int = 128) -> str:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    with ShardWriter(out, shard_size) as w:
        for i in range(n):
            ph = photos[i % len(photos)]
            W, H = ph.size
            cw, ch = rng.randint(W // 2, W), rng.randint(H // 2, H)
            x, y = rng.randint(0, W - cw), rng.randint(0, H - ch)
            short = rng.randint(256, 512)
            s = short / min(cw, ch)
            img = ph.crop((x, y, x + cw, y + ch)).resize((round(cw * s), round(ch * s)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14)))
            w.write({"jpg": buf.getvalue(), "txt": caption.encode()})
        n_shards = len(w.sizes)
    return os.path.join(out, "{00000..%05d}.tar" % (n_shards - 1))


def make_tokenizer(tmp: str, captions: list[str]):
    """The project's BPE tokenizer trained on the captions; a byte tokenizer if that is unavailable."""
    try:
        from hetclip.data.bpe import train_bpe
        from hetclip.data.tokenizers import load_tokenizer

        train_bpe(captions, os.path.join(tmp, "tok"), vocab_size=1024)
        return load_tokenizer(os.path.join(tmp, "tok")), "hetclip BPE (HF tokenizers)"
    except Exception as e:  # noqa: BLE001
        print(f"(BPE tokenizer unavailable: {e}; using bytes)")

        class Bytes:
            context_length = 77

            def __call__(self, texts):
                out = np.zeros((len(texts), 77), np.int32)
                for i, t in enumerate(texts):
                    b = list(t.encode()[:76])
                    out[i, : len(b)] = b
                return out

        return Bytes(), "bytes"


def single_core(samples: list[bytes], size: int, draft: bool, reps: int = 1) -> float:
    orig = decode._draft
    if not draft:
        decode._draft = lambda img, box, size: box  # type: ignore[assignment]
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for r in range(reps):
            for i, data in enumerate(samples):
                decode.train_transform_uint8(data, size, random.Random(i + r))
        n = reps * len(samples)
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)
    finally:
        decode._draft = orig


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes (from /proc; Linux)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def loader_rate(pattern: str, tok, size: int, workers: int, batches: int, batch_size: int) -> dict:
    spec = {"shards": pattern, "image_size": size, "shuffle_buffer": 256}
    with make_train_loader(spec, tok, batch_size=batch_size, seed=0, num_workers=workers) as loader:
        for _ in range(2):  # warm-up: worker start-up, first shard
            next(loader)
        pids = [os.getpid()] + [p.pid for p in loader._pool.procs]
        t0, c0 = time.perf_counter(), _cpu_seconds(pids)
        w0 = loader.stats()["wait_seconds"]
        for _ in range(batches):
            b = next(loader)
        dt, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - c0
        wait = loader.stats()["wait_seconds"] - w0
    assert b["image"].shape == (batch_size, size, size, 3)
    n = batches * batch_size
    return {"images_per_s": n / dt, "images_per_cpu_s": n / cpu, "wait_fraction": wait / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        pattern = make_shards(os.path.join(tmp, "shards"), args.images)
        from hetclip.data.shards import expand_pattern, iter_shard

        samples = [s for u in expand_pattern(pattern) for s in iter_shard(u)]
        jpegs = [s["jpg"] for s in samples]
        tok, tok_name = make_tokenizer(tmp, [s["txt"].decode() for s in samples])
        mean_kb = np.mean([len(j) for j in jpegs]) / 1024
        sizes = [Image.open(io.BytesIO(j)).size for j in jpegs[:64]]
        for size in (224, 64):
            for draft in (True, False):
                rate, per_cpu = single_core(jpegs[:200], size, draft)
                rows.append({"what": f"single core, decode+crop+resize, draft={'on' if draft else 'off'}",
                             "image_size": size, "workers": 0, "images_per_s": rate, "per_core": per_cpu})
                print(rows[-1])
            for workers in (1, 2):
                r = loader_rate(pattern, tok, size, workers, args.batches, args.batch_size)
                rows.append({"what": "loader end to end (read, shuffle, decode, augment, normalise, tokenize)",
                             "image_size": size, "workers": workers, "images_per_s": r["images_per_s"],
                             "per_core": r["images_per_cpu_s"], "wait_fraction": r["wait_fraction"]})
                print(rows[-1])
    meta = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "load_before": load_before, "load_after": os.getloadavg()[0], "images": args.images, "mean_jpeg_kb": round(float(mean_kb), 1),
            "example_sizes": sizes[:6], "batch_size": args.batch_size, "tokenizer": tok_name,
            "note": "2 CPU cores shared with other jobs: the main process (reading, tokenizing, "
                    "normalising) competes with the workers for the same cores"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["# Input pipeline throughput", "",
             f"{args.images} JPEGs (mean {meta['mean_jpeg_kb']} KB, shortest side 256-512 px) from "
             f"sklearn sample photos; batch {args.batch_size}; tokenizer: {tok_name}; "
             f"{meta['cpu_count']} CPUs (shared).", "",
             f"Machine load during the run (1-min load average): {meta['load_before']:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after: wall-clock rates are shared-machine rates; "
             "'per CPU-second' divides by the CPU time actually used (main process + workers).", "",
             "| measurement | px | workers | images/s (wall) | images per CPU-second | waiting on workers |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        wf = f"{r['wait_fraction']:.0%}" if "wait_fraction" in r else "-"
        lines.append(f"| {r['what']} | {r['image_size']} | {r['workers']} | {r['images_per_s']:.0f} | "
                     f"{r['per_core']:.0f} | {wf} |")
    with open(os.path.join(args.out, "data.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
