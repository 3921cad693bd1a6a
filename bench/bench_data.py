"""Input-pipeline throughput: decoders, and the training loader before/after (not a test).

Three shard sets, built here from photos bundled with scikit-learn / scikit-image (random crops,
captions from a small word list):

* ``224``: what ``img2dataset --image_size 224`` writes: JPEG quality 90, half ``center_crop``
  (224 x 224), half ``keep_ratio`` (shortest side 224, e.g. 224 x 300);
* ``large``: JPEG quality 90 with the shortest side 400-600 px (larger source images);
* ``demo``: 64 x 64 PNG scenes from ``hetclip.data.demo.render_scene`` (the demo recipe's data).

For each it measures

* ``decoders`` (this process, one core, CPU ms/image): *decode only* (libjpeg-turbo through simplejpeg at
  the DCT-domain scale the crop allows, or Pillow for PNG: the least any loader spends per image, the
  limit on this CPU) and ``train_transform_uint8`` (decode + random resized crop + resample) three ways:
  all Pillow, simplejpeg + Pillow's bicubic, and the fast path (simplejpeg + OpenCV's bicubic written into
  the batch row), with the max / mean pixel difference of the latter two to all-Pillow; PyTurboJPEG is
  tried too (it needs the operating system's libturbojpeg);
* ``loader``: ``make_train_loader`` end to end with 1 and 2 workers, for this tree ("after") and for
  the tree of ``--before REF`` ("before", extracted with ``git archive`` and run in a subprocess):
  images/s (wall), images per CPU-second, CPU ms/image of the main process (all threads) and of the
  workers, and the host rate these imply for 8, 32 and 96 cores:
  ``min(1000 / main_ms, (cores - 1) * 1000 / worker_ms)`` (the main process needs a core of its own),
  and the distance to the limit: worker ms/image over decode-only ms/image.
  The machine is shared with other jobs, so the CPU figures are the fair ones.

Writes ``bench/results/data[_TAG].json`` and ``.md``. Usage::

    python bench/bench_data.py [--before main] [--images 512] [--batches 24] [--batch-size 32] [--tag xeon]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from _common import add_before_after_args, extract_ref, run_json_child
from hetclip.data import decode
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


# ----------------------------------------------------------------------------- decoders

def _best_ms(fn, data: list, reps: int) -> tuple[float, list]:
    """Least CPU ms/image of ``fn(i, d)`` over ``reps`` passes, and the last pass's outputs."""
    best, outs = float("inf"), []
    for _ in range(reps):
        c0 = time.process_time()
        outs = [fn(i, d) for i, d in enumerate(data)]
        best = min(best, time.process_time() - c0)
    return 1e3 * best / len(data), outs


def decode_only(d: bytes, i: int, size: int):
    """Decoding alone, at the scale the training crop allows (simplejpeg for colour JPEG, else Pillow)."""
    if decode._simplejpeg is not None and d[:2] == b"\xff\xd8":
        h, w, _, _ = decode._simplejpeg.decode_jpeg_header(d)
        box = decode.random_resized_crop_box(w, h, random.Random(i))
        k = decode._dct_scale(w, h, box, size)
        return decode._simplejpeg.decode_jpeg(d, "RGB", min_height=-(-h // k) if k > 1 else 0,
                                              min_width=-(-w // k) if k > 1 else 0)
    return decode.load_rgb(d)


def _diff(outs: list, ref: list) -> tuple[int, float]:
    d = [np.abs(a.astype(int) - b) for a, b in zip(outs, ref)]
    return int(max(x.max() for x in d)), float(np.mean([x.mean() for x in d]))


def decoders(data: list[bytes], size: int, reps: int = 3) -> dict:
    """CPU ms/image of decoding alone and of ``train_transform_uint8`` all-Pillow, simplejpeg + Pillow's
    resize, and the fast path (simplejpeg + OpenCV into the batch row), with pixel differences to all-Pillow."""
    def transform(i, d):
        return decode.train_transform_uint8(d, size, random.Random(i), out=row).copy()

    row = np.empty((size, size, 3), np.uint8)
    sj, cv = decode._simplejpeg, decode._cv2
    out: dict = {}
    try:
        out["decode_only_ms"], _ = _best_ms(lambda i, d: decode_only(d, i, size), data, reps)
        decode._simplejpeg = decode._cv2 = None
        out["pillow_ms"], ref = _best_ms(transform, data, reps)
        decode._simplejpeg = sj
        if sj is not None:
            out["simplejpeg_ms"], outs = _best_ms(transform, data, reps)
            out["simplejpeg_max_diff"], out["simplejpeg_mean_diff"] = _diff(outs, ref)
        decode._cv2 = cv
        if decode.fast_path():
            import cv2

            cv2.setNumThreads(1)  # as in the data workers
            out["fast_ms"], outs = _best_ms(transform, data, reps)
            out["fast_max_diff"], out["fast_mean_diff"] = _diff(outs, ref)
    finally:
        decode._simplejpeg, decode._cv2 = sj, cv
    try:
        from turbojpeg import TurboJPEG

        TurboJPEG()
        out["pyturbojpeg"] = "available (not measured)"
    except Exception as e:  # noqa: BLE001 - it needs the OS library
        out["pyturbojpeg"] = f"unusable: {str(e).splitlines()[0]}"
    return out


# ----------------------------------------------------------------------------- loader end to end

def child_loader(args: argparse.Namespace) -> None:
    """Measure ``make_train_loader`` in this process (whichever ``hetclip`` is importable); print JSON."""
    import psutil

    from hetclip.data.loader import make_train_loader
    from hetclip.data.tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    me = psutil.Process()

    def worker_cpu() -> float:
        return sum(sum(c.cpu_times()[:2]) for c in me.children(recursive=True) if c.is_running())

    spec = {"shards": args.shards, "image_size": args.size, "shuffle_buffer": 256}
    with make_train_loader(spec, tok, batch_size=args.batch_size, seed=0, num_workers=args.workers) as loader:
        for _ in range(3):  # warm-up: worker start-up, first shards
            next(loader)
        t0, m0, w0 = time.perf_counter(), time.process_time(), worker_cpu()
        for _ in range(args.batches):
            b = next(loader)
        dt, main, work = time.perf_counter() - t0, time.process_time() - m0, worker_cpu() - w0
    n = args.batches * args.batch_size
    print(json.dumps({"images_per_s": n / dt, "images_per_cpu_s": n / (main + work),
                      "main_ms_per_image": 1e3 * main / n, "worker_ms_per_image": 1e3 * work / n,
                      "image_dtype": str(b["image"].dtype)}))


def loader_rate(pythonpath: str | None, pattern: str, tok: str, size: int, workers: int, args) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, os.path.abspath(__file__), "--child-loader", "--shards", pattern, "--tokenizer", tok,
           "--size", str(size), "--workers", str(workers), "--batches", str(args.batches),
           "--batch-size", str(args.batch_size)]
    return run_json_child(cmd, env, "/")


def implied(r: dict, cores: int) -> float:
    return min(1e3 / max(r["main_ms_per_image"], 1e-9), (cores - 1) * 1e3 / max(r["worker_ms_per_image"], 1e-9))


CASES = {
    "224": ("JPEG q90, img2dataset --image_size 224 (center_crop 224x224 / keep_ratio short side 224)", 224),
    "large": ("JPEG q90, shortest side 400-600 px", 224),
    "demo": ("PNG 64x64 demo scenes", 64),
}
CORES = (8, 32, 96)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child-loader", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards")
    ap.add_argument("--tokenizer")
    ap.add_argument("--size", type=int, default=224)
    add_before_after_args(ap, "loader")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cases", default="224,large,demo")
    args = ap.parse_args()
    if args.child_loader:
        args.workers = int(args.workers)
        return child_loader(args)
    from hetclip.data.shards import expand_pattern, iter_shard
    from hetclip.xla import cpu_description

    rows, dec_rows, shard_info = [], [], {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        versions = [("after", None)]
        if args.before:
            versions.insert(0, ("before", extract_ref(args.before, os.path.join(tmp, "before"))))
        patterns = {}
        for case in args.cases.split(","):
            out = os.path.join(tmp, case)
            patterns[case] = (make_demo_shards(out, args.images) if case == "demo"
                              else make_photo_shards(out, args.images, case))
        all_caps = [s["txt"].decode() for c in patterns for u in expand_pattern(patterns[c]) for s in iter_shard(u)]
        make_tokenizer(tmp, all_caps)
        tok = os.path.join(tmp, "tok")
        for case, pattern in patterns.items():
            what, size = CASES[case]
            samples = [s for u in expand_pattern(pattern) for s in iter_shard(u)]
            data = [s.get("jpg", s.get("png")) for s in samples]
            dims = [Image.open(io.BytesIO(d)).size for d in data[:200]]
            shard_info[case] = {"what": what, "mean_kb": round(float(np.mean([len(d) for d in data])) / 1024, 1),
                                "mean_short_side": round(float(np.mean([min(d) for d in dims])), 1),
                                "example_sizes": dims[:4]}
            dec_rows.append({"case": case, "image_size": size, **decoders(data[:128], size)})
            print(dec_rows[-1], flush=True)
            limit_ms = dec_rows[-1]["decode_only_ms"]
            runs: dict = {}
            for _ in range(args.rounds):  # interleaved, so load changes hit every configuration alike
                for name, path in versions:
                    for w in (int(x) for x in args.workers.split(",")):
                        runs.setdefault((name, w), []).append(loader_rate(path, pattern, tok, size, w, args))
            for (name, w), rs in runs.items():
                best = max(rs, key=lambda r: r["images_per_cpu_s"])
                rows.append({"case": case, "version": name, "image_size": size, "workers": w,
                             "images_per_s": max(r["images_per_s"] for r in rs),
                             "images_per_cpu_s": best["images_per_cpu_s"],
                             "main_ms_per_image": min(r["main_ms_per_image"] for r in rs),
                             "worker_ms_per_image": min(r["worker_ms_per_image"] for r in rs),
                             "image_dtype": best["image_dtype"], "decode_only_ms": limit_ms, "rounds": rs})
                rows[-1]["worker_over_decode_only"] = rows[-1]["worker_ms_per_image"] / limit_ms
                rows[-1].update({f"host_{c}_cores": implied(rows[-1], c) for c in CORES})
                print({k: v for k, v in rows[-1].items() if k != "rounds"}, flush=True)
    meta = {"cpu": cpu_description(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "pillow": Image.__version__, "numpy": np.__version__,
            "jpeg_decoder": decode.jpeg_decoder(), "fast_path": decode.fast_path(), "before": args.before,
            "load_before": load_before, "load_after": os.getloadavg(), "images_per_case": args.images,
            "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds,
            "tokenizer": "hetclip BPE (HF tokenizers), vocab 1024", "shards": shard_info}
    tag = f"_{args.tag}" if args.tag else ""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"data{tag}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "decoders": dec_rows}, f, indent=1)
    write_markdown(os.path.join(args.out, f"data{tag}.md"), meta, rows, dec_rows, args)


def write_markdown(path: str, meta: dict, rows: list[dict], dec_rows: list[dict], args) -> None:
    lines = ["# Input pipeline throughput", "",
             f"Command: `python bench/bench_data.py --before {meta['before']} --images {meta['images_per_case']} "
             f"--batches {meta['batches']} --batch-size {meta['batch_size']} --cases {args.cases}"
             f"{' --tag ' + args.tag if args.tag else ''}`; CPU: {meta['cpu']} ({meta['cpu_count']} cores "
             f"shared with other jobs); Pillow {meta['pillow']}, numpy {meta['numpy']}, tokenizer "
             f"{meta['tokenizer']}.", "",
             f"Load average (1 min): {meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after. Each "
             f"loader row is the best of {meta['rounds']} interleaved runs of {meta['batches']} batches (all in the "
             "JSON). CPU figures (user + system) are the fair ones on a shared machine; images/s (wall) shows "
             "what the other jobs left over. *before* is the loader of `" + str(meta["before"]) + "`, *after* this "
             "tree's. *decode only* is libjpeg-turbo (simplejpeg) decoding the same images at the DCT-domain scale "
             "the crop allows (Pillow for PNG), on one core: the least a loader spends per image on this CPU; "
             "*x decode* is worker CPU over it.",
             "", "Shards:", ""]
    for case, s in meta["shards"].items():
        lines.append(f"* `{case}`: {s['what']}; mean {s['mean_kb']} KB, mean shortest side "
                     f"{s['mean_short_side']} px, e.g. {', '.join('x'.join(map(str, d)) for d in s['example_sizes'])}")
    lines += ["", "## Loader end to end", "",
              "| shards | loader | workers | images/s (wall) | images per CPU-s | main CPU ms/image | "
              "worker CPU ms/image | decode only ms/image | x decode | implied host images/s: 8 / 32 / 96 cores |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['version']} | {r['workers']} | {r['images_per_s']:.0f} | "
                     f"{r['images_per_cpu_s']:.0f} | {r['main_ms_per_image']:.3f} | {r['worker_ms_per_image']:.2f} | "
                     f"{r['decode_only_ms']:.2f} | {r['worker_over_decode_only']:.2f}x | "
                     + " / ".join(f"{r[f'host_{c}_cores']:,.0f}" for c in CORES) + " |")
    lines += ["", "## Per image, one core: decode only and the training transform three ways", "",
              "The transform is decode + random resized crop + bicubic resample into a 3-channel row; differences are "
              "to the all-Pillow output, in 8-bit levels.", "",
              "| shards | px | decode only ms | all Pillow ms | simplejpeg + Pillow resize ms (max / mean diff) | "
              "fast path: simplejpeg + OpenCV ms (max / mean diff) | fast path x decode | PyTurboJPEG |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for d in dec_rows:
        sj = (f"{d['simplejpeg_ms']:.3f} ({d['simplejpeg_max_diff']} / {d['simplejpeg_mean_diff']:.2f})"
              if "simplejpeg_ms" in d else "-")
        fast = f"{d['fast_ms']:.3f} ({d['fast_max_diff']} / {d['fast_mean_diff']:.2f})" if "fast_ms" in d else "-"
        ratio = f"{d['fast_ms'] / d['decode_only_ms']:.2f}x" if "fast_ms" in d else "-"
        lines.append(f"| {d['case']} | {d['image_size']} | {d['decode_only_ms']:.3f} | {d['pillow_ms']:.3f} | {sj} | "
                     f"{fast} | {ratio} | {d['pyturbojpeg'][:60]} |")
    lines += ["", "The demo shards are PNG: every column decodes and resamples them with Pillow."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
