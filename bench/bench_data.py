"""Input-pipeline throughput: images/s of decode + augment + tokenize into batches (not a test).

Three shard sets, built here from photos bundled with scikit-learn / scikit-image (random crops,
captions from a small word list):

* ``224``: what ``img2dataset --image_size 224`` writes: JPEG quality 90, half ``center_crop``
  (224 x 224), half ``keep_ratio`` (shortest side 224, e.g. 224 x 300);
* ``large``: JPEG quality 90 with the shortest side 400-600 px (reference: larger source images);
* ``demo``: 64 x 64 PNG scenes from ``hetclip.data.demo.render_scene`` (the demo recipe's data).

For each it measures

* ``stages``: CPU milliseconds per image of each step, in this process: JPEG/PNG decode (with the
  draft shortcut the pipeline uses), random resized crop + bicubic resize, CLIP normalisation (current
  and the former ``astype`` + broadcast formula), tokenization (per batch, per image), and moving the
  image from a worker to the main process through a ``multiprocessing`` queue as uint8 or float32;
* ``single core``: ``train_transform_uint8`` in this process (the per-core cost of the worker side);
* ``loader``: ``make_train_loader`` end to end (shard reading, shuffle buffer, worker processes,
  normalisation, tokenization, batching) with 1 and 2 workers: images/s of wall-clock time, and
  images per CPU-second (user + system time of the main process and the workers). The machine is
  shared with other jobs, so the CPU-second figure is the fair one; wall-clock rates depend on load.

Writes ``bench/results/data.json`` and ``bench/results/data.md``. Usage::

    python bench/bench_data.py [--images 512] [--batches 24] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
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
         "building petals close up view of a small cat cup coffee rocket astronaut").split()


def photos() -> list[Image.Image]:
    """Colour photos bundled with scikit-learn and scikit-image (no downloads)."""
    from sklearn.datasets import load_sample_images
    import skimage.data as sk

    arrays = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            arrays.append(getattr(sk, name)())
        except Exception:  # noqa: BLE001 - a missing bundled image only narrows the mix
            pass
    return [Image.fromarray(np.ascontiguousarray(a[..., :3])) for a in arrays if a.ndim == 3]


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14)))


def make_photo_shards(out: str, n: int, case: str, seed: int = 0, shard_size: int = 128) -> str:
    """JPEG shards: ``case="224"`` (img2dataset 224 center_crop / keep_ratio) or ``"large"`` (400-600 px)."""
    ph_list = photos()
    rng = random.Random(seed)
    with ShardWriter(out, shard_size) as w:
        for i in range(n):
            ph = ph_list[i % len(ph_list)]
            W, H = ph.size
            cw, ch = rng.randint(W // 2, W), rng.randint(H // 2, H)
            x, y = rng.randint(0, W - cw), rng.randint(0, H - ch)
            img = ph.crop((x, y, x + cw, y + ch))
            short = 224 if case == "224" else rng.randint(400, 600)
            if case == "224" and i % 2 == 0:  # center_crop: square first, then 224 x 224
                s = min(cw, ch)
                img = img.crop(((cw - s) // 2, (ch - s) // 2, (cw - s) // 2 + s, (ch - s) // 2 + s))
                cw = ch = s
            s = short / min(cw, ch)
            img = img.resize((max(short, round(cw * s)), max(short, round(ch * s))), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            w.write({"jpg": buf.getvalue(), "txt": _caption(rng).encode()})
        n_shards = len(w.sizes)
    return os.path.join(out, "{00000..%05d}.tar" % (n_shards - 1))


def make_demo_shards(out: str, n: int, seed: int = 0, shard_size: int = 128) -> str:
    """64 x 64 PNG scenes as the demo recipe writes them."""
    from hetclip.data import demo

    rng = np.random.default_rng(seed)
    colors = list(demo.COLORS)
    with ShardWriter(out, shard_size) as w:
        for i in range(n):
            shape, color = demo.SHAPES[i % len(demo.SHAPES)], colors[(i // 3) % len(colors)]
            arr, _ = demo.render_scene(rng, 64, shape, color)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            w.write({"png": buf.getvalue(), "txt": f"a photo of a {color} {shape}".encode()})
        n_shards = len(w.sizes)
    return os.path.join(out, "{00000..%05d}.tar" % (n_shards - 1))


def make_tokenizer(tmp: str, captions: list[str]):
    """The project's BPE tokenizer trained on the captions."""
    from hetclip.data.bpe import train_bpe
    from hetclip.data.tokenizers import load_tokenizer

    train_bpe(captions, os.path.join(tmp, "tok"), vocab_size=1024)
    return load_tokenizer(os.path.join(tmp, "tok"))


# ----------------------------------------------------------------------------- per-stage costs

def _cpu_ms(fn, n_items: int, reps: int = 3) -> float:
    """Best-of-``reps`` CPU milliseconds per item of ``fn()`` (process time: not inflated by other jobs)."""
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return 1e3 * best / n_items


def _normalize_former(x: np.ndarray) -> np.ndarray:
    """The former ``decode.normalize``: astype, then broadcast over the last axis of 3."""
    out = x.astype(np.float32)
    out *= decode._SCALE
    out -= decode._SHIFT
    return out


def _sender(q, dtype: str, shape: tuple, chunks: int, chunk: int) -> None:
    imgs = [np.full(shape, 7, np.dtype(dtype)) for _ in range(chunk)]
    for j in range(chunks):
        q.put((j, [("ok", a, "caption") for a in imgs]))
    q.put(None)


def transfer_cost(dtype: str, size: int, chunks: int = 40, chunk: int = 16) -> tuple[float, float]:
    """CPU ms per image to pickle, pipe and unpickle one decoded image: (sender + receiver, receiver)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue(maxsize=4)
    p = ctx.Process(target=_sender, args=(q, dtype, (size, size, 3), chunks, chunk))
    p.start()
    q.get()
    c0, w0 = time.process_time(), _cpu_seconds([p.pid])
    while q.get() is not None:
        pass
    main = time.process_time() - c0
    worker = _cpu_seconds([p.pid]) - w0
    p.join()
    return 1e3 * (main + worker) / ((chunks - 1) * chunk), 1e3 * main / ((chunks - 1) * chunk)


def stages(samples: list[dict], tok, size: int, batch_size: int) -> dict:
    imgs = [s.get("jpg", s.get("png")) for s in samples]
    caps = [s["txt"].decode() for s in samples]
    n = len(imgs)
    opened = []

    def dec():
        opened.clear()
        for i, d in enumerate(imgs):
            im = decode.open_image(d)
            box = decode.random_resized_crop_box(*im.size, random.Random(i))
            box = decode._draft(im, box, size)
            im.load()
            opened.append((decode.to_rgb(im), box))

    def crop_resize():
        for im, box in opened:
            np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box), np.uint8)

    batch = np.stack([decode.train_transform_uint8(d, size, random.Random(i)) for i, d in enumerate(imgs[:batch_size])])
    tok_batches = [caps[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    out = {"decode": _cpu_ms(dec, n), "crop_resize": _cpu_ms(crop_resize, n),
           "normalize": _cpu_ms(lambda: [decode.normalize(batch) for _ in range(8)], 8 * batch_size),
           "normalize_former": _cpu_ms(lambda: [_normalize_former(batch) for _ in range(8)], 8 * batch_size),
           "tokenize": _cpu_ms(lambda: [tok(b) for b in tok_batches], batch_size * len(tok_batches))}
    for dt in ("uint8", "float32"):
        total, main = transfer_cost(dt, size)
        out[f"transfer_{dt}"], out[f"transfer_{dt}_main"] = total, main
    return out


def single_core(samples: list[bytes], size: int, reps: int = 3) -> tuple[float, float]:
    """Best-of-``reps`` (images/s wall, images per CPU-second) of ``train_transform_uint8``."""
    wall = cpu = 0.0
    for r in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for i, data in enumerate(samples):
            decode.train_transform_uint8(data, size, random.Random(i + r))
        wall = max(wall, len(samples) / (time.perf_counter() - t0))
        cpu = max(cpu, len(samples) / (time.process_time() - c0))
    return wall, cpu


# ----------------------------------------------------------------------------- end to end

def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes (from /proc; Linux)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def loader_rate(pattern: str, tok, size: int, workers: int, batches: int, batch_size: int,
                former_normalize: bool = False) -> dict:
    """End-to-end rates; ``former_normalize`` swaps in the former normalisation (main process only)."""
    spec = {"shards": pattern, "image_size": size, "shuffle_buffer": 256}
    current = decode.normalize
    if former_normalize:
        decode.normalize = _normalize_former  # type: ignore[assignment]
    try:
        return _loader_rate(spec, tok, size, workers, batches, batch_size)
    finally:
        decode.normalize = current  # type: ignore[assignment]


def _loader_rate(spec: dict, tok, size: int, workers: int, batches: int, batch_size: int) -> dict:
    with make_train_loader(spec, tok, batch_size=batch_size, seed=0, num_workers=workers) as loader:
        for _ in range(3):  # warm-up: worker start-up, first shards
            next(loader)
        pids = [os.getpid()] + [p.pid for p in loader._pool.procs]
        t0, c0, m0 = time.perf_counter(), _cpu_seconds(pids), time.process_time()
        w0 = loader.stats()["wait_seconds"]
        for _ in range(batches):
            b = next(loader)
        dt, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - c0
        main = time.process_time() - m0  # all threads of the main process (incl. queue feeders)
        wait = loader.stats()["wait_seconds"] - w0
    assert b["image"].shape == (batch_size, size, size, 3) and b["image"].dtype == np.float32
    n = batches * batch_size
    return {"images_per_s": n / dt, "images_per_cpu_s": n / cpu, "main_ms_per_image": 1e3 * main / n,
            "wait_fraction": wait / dt}


CASES = {
    "224": ("JPEG q90, img2dataset --image_size 224 (center_crop 224x224 / keep_ratio short side 224)", 224),
    "large": ("JPEG q90, shortest side 400-600 px (reference)", 224),
    "demo": ("PNG 64x64 demo scenes", 64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of each loader run (best kept)")
    ap.add_argument("--cases", default="224,large,demo")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    from hetclip.data.shards import expand_pattern, iter_shard

    rows, stage_rows, shard_info = [], [], {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        patterns = {}
        for case in args.cases.split(","):
            out = os.path.join(tmp, case)
            patterns[case] = (make_demo_shards(out, args.images) if case == "demo"
                              else make_photo_shards(out, args.images, case))
        all_caps = [s["txt"].decode() for c in patterns for u in expand_pattern(patterns[c]) for s in iter_shard(u)]
        tok = make_tokenizer(tmp, all_caps)
        for case, pattern in patterns.items():
            what, size = CASES[case]
            samples = [s for u in expand_pattern(pattern) for s in iter_shard(u)]
            data = [s.get("jpg", s.get("png")) for s in samples]
            dims = [Image.open(io.BytesIO(d)).size for d in data[:200]]
            shard_info[case] = {"what": what, "mean_kb": round(float(np.mean([len(d) for d in data])) / 1024, 1),
                                "mean_short_side": round(float(np.mean([min(d) for d in dims])), 1),
                                "example_sizes": dims[:4]}
            st = stages(samples[:256], tok, size, args.batch_size)
            stage_rows.append({"case": case, "image_size": size, **st})
            print(stage_rows[-1])
            rate, per_cpu = single_core(data[:256], size)
            rows.append({"case": case, "what": "single core: decode + crop + resize (worker side)",
                         "image_size": size, "workers": 0, "images_per_s": rate, "per_cpu_s": per_cpu})
            print(rows[-1])
            configs = [(w, f) for w in (1, 2) for f in ((False, True) if case == "224" else (False,))]
            runs: dict = {c: [] for c in configs}
            for _ in range(args.rounds):  # interleaved, so load changes hit every configuration alike
                for workers, former in configs:
                    runs[(workers, former)].append(
                        loader_rate(pattern, tok, size, workers, args.batches, args.batch_size, former))
            for (workers, former), rs in runs.items():
                best = max(rs, key=lambda r: r["images_per_cpu_s"])
                what = "loader end to end" + (" (former normalise, for comparison)" if former else "")
                rows.append({"case": case, "what": what, "image_size": size, "workers": workers,
                             "images_per_s": max(r["images_per_s"] for r in rs),
                             "per_cpu_s": best["images_per_cpu_s"],
                             "main_ms_per_image": min(r["main_ms_per_image"] for r in rs),
                             "wait_fraction": best["wait_fraction"], "rounds": rs})
                print({k: v for k, v in rows[-1].items() if k != "rounds"})
    meta = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "pillow": Image.__version__, "numpy": np.__version__,
            "load_before": load_before, "load_after": os.getloadavg()[0], "images_per_case": args.images,
            "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds, "tokenizer": "hetclip BPE (HF tokenizers), vocab 1024",
            "shards": shard_info}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "stages": stage_rows}, f, indent=1)
    write_markdown(os.path.join(args.out, "data.md"), meta, rows, stage_rows)


def write_markdown(path: str, meta: dict, rows: list[dict], stage_rows: list[dict]) -> None:
    lines = ["# Input pipeline throughput", "",
             "Command: `python bench/bench_data.py` (defaults: "
             f"{meta['images_per_case']} images per case, batch {meta['batch_size']}, "
             f"tokenizer {meta['tokenizer']}); Pillow {meta['pillow']}, numpy {meta['numpy']}, "
             f"{meta['cpu_count']} CPUs shared with other jobs.", "",
             f"Machine load (1-min load average): {meta['load_before']:.1f} before, {meta['load_after']:.1f} "
             "after. Each loader row is the best of "
             f"{meta['rounds']} interleaved runs of {meta['batches']} batches (all runs in `data.json`). "
             "**Images per CPU-second** (user + system time of the main process and the workers) is "
             "the fair figure on this shared machine; images/s (wall) only shows what was left over by the "
             "other jobs.", "", "Shards:", ""]
    for case, s in meta["shards"].items():
        lines.append(f"* `{case}`: {s['what']}; mean {s['mean_kb']} KB, mean shortest side "
                     f"{s['mean_short_side']} px, e.g. {', '.join('x'.join(map(str, d)) for d in s['example_sizes'])}")
    lines += ["", "## Throughput", "",
              "| shards | measurement | px | workers | images/s (wall) | images per CPU-second | "
              "main-process CPU ms/image | main waiting on workers (wall) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wf = f"{r['wait_fraction']:.0%}" if "wait_fraction" in r else "-"
        mm = f"{r['main_ms_per_image']:.2f}" if "main_ms_per_image" in r else "-"
        lines.append(f"| {r['case']} | {r['what']} | {r['image_size']} | {r['workers']} | "
                     f"{r['images_per_s']:.0f} | {r['per_cpu_s']:.0f} | {mm} | {wf} |")
    lines += ["", "## CPU milliseconds per image, by stage (best of 3, this process)", "",
              "| shards | px | decode | crop + resize | normalise | normalise (former) | tokenize | "
              "worker->main uint8 (total / main) | worker->main float32 (total / main) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stage_rows:
        lines.append(f"| {s['case']} | {s['image_size']} | {s['decode']:.2f} | {s['crop_resize']:.2f} | "
                     f"{s['normalize']:.3f} | {s['normalize_former']:.3f} | {s['tokenize']:.3f} | "
                     f"{s['transfer_uint8']:.3f} / {s['transfer_uint8_main']:.3f} | "
                     f"{s['transfer_float32']:.3f} / {s['transfer_float32_main']:.3f} |")
    lines += ["", "## Notes", ""]
    for s in stage_rows:
        worker = s["decode"] + s["crop_resize"]
        lines.append(
            f"* `{s['case']}`: worker side {worker:.2f} ms/image (decode {s['decode']:.2f} + crop/resize "
            f"{s['crop_resize']:.2f}); normalising in the main process costs {s['normalize']:.3f} ms "
            f"(former formula {s['normalize_former']:.3f}: {s['normalize_former'] / s['normalize']:.1f}x, "
            f"bit-identical); sending float32 instead of uint8 from the workers would cost "
            f"{s['transfer_float32'] - s['transfer_uint8']:.3f} ms more per image (total CPU), "
            + ("more than normalising: workers send uint8." if s["transfer_float32"] - s["transfer_uint8"]
               > s["normalize"] else "less than normalising: consider normalising in the workers."))
    lines += ["* Draft (reduced-scale JPEG decoding) applies only when the crop is >= 2x the output size: "
              "never on 224 px shards at 224 px, for part of the 400-600 px shards, and for JPEG photos at 64 px (the demo shards are PNG).",
              "* Not changed because they would alter the numerics: Pillow `reducing_gap` (box pre-reduction), "
              "bilinear instead of bicubic, other JPEG decoders (different IDCT / chroma upsampling)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
