"""Benchmark (not a test): zero-shot evaluation throughput and text-classifier build time.

* images/s of ``evaluate_zero_shot`` for a randomly initialised model (default ``B/32`` at 224 px) on
  synthetic, already-normalised images (model cost only; decoding is excluded);
* time to build a ``classes × templates`` text classifier (default ImageNet 1000 × 80) with the random
  text tower and a synthetic word-hashing tokenizer (no CLIP vocabulary needed). With ``--classes`` /
  ``--templates`` smaller than the full set, the full-size time is extrapolated from prompts/s.

Writes ``bench/results/zero_shot.json`` and ``bench/results/zero_shot.md``.

    python bench/bench_zero_shot.py --model B/32 --images 64 --batch-size 32 --classes 50 --templates 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
import zlib

import jax
import numpy as np

from _common import RESULTS, machine


class HashTokenizer:
    """Synthetic tokenizer: each lower-case word -> crc32 % (vocab - 2) + 1, then the eos token."""

    def __init__(self, vocab_size: int, context_length: int, eos_token_id: int):
        self.vocab_size, self.context_length, self.eos_token_id = vocab_size, context_length, eos_token_id

    def __call__(self, texts):
        out = np.zeros((len(texts), self.context_length), np.int32)
        for i, t in enumerate(texts):
            ids = [zlib.crc32(w.encode()) % (self.eos_token_id - 1) + 1 for w in re.findall(r"\w+", t.lower())]
            ids = ids[: self.context_length - 1] + [self.eos_token_id]
            out[i, :len(ids)] = ids
        return out

    def spec(self):
        return {"kind": "synthetic-hash", "vocab_size": self.vocab_size, "context_length": self.context_length}


def main(argv=None):
    from hetclip.model import Encoders, init_params, preset
    from hetclip.zero_shot.classifier import build_classifier
    from hetclip.zero_shot.evaluate import evaluate_zero_shot
    from hetclip.zero_shot.templates import imagenet_classnames, load_templates

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="B/32")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=256, help="synthetic images to evaluate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mc-samples", type=int, default=0, help="also time the MC predictive (HET-XL on)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--templates", type=int, default=80)
    p.add_argument("--text-batch-size", type=int, default=256)
    p.add_argument("--out-dir", default=RESULTS)
    args = p.parse_args(argv)

    het = {"enabled": args.mc_samples > 0}
    cfg = preset(args.model, vision={"image_size": args.image_size}, het=het)
    enc = Encoders(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    tok = HashTokenizer(cfg.text.vocab_size, cfg.text.context_length, cfg.text.eos_token_id)

    names = imagenet_classnames()[: args.classes]
    templates = load_templates("clip80")[: args.templates]
    # warm-up compile on one text batch, then time the build
    enc.text_embeddings(tok(["warm up"] * min(args.text_batch_size, len(names) * len(templates))))
    t0 = time.perf_counter()
    w = build_classifier(enc.text_embeddings, tok, names, templates, batch_size=args.text_batch_size)
    t_text = time.perf_counter() - t0
    n_prompts = len(names) * len(templates)

    rng = np.random.default_rng(0)
    s = args.image_size
    images = rng.normal(size=(args.images, s, s, 3)).astype(np.float32)
    labels = rng.integers(0, len(names), args.images)
    batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, args.images, args.batch_size)]
    kw = dict(sample_image=enc.image_samples if args.mc_samples else None, mc_samples=args.mc_samples,
              batch_size=args.batch_size)
    evaluate_zero_shot(enc.image_embeddings, w, batches[:1], enc.logit_scale, **kw)  # compile
    t0 = time.perf_counter()
    m = evaluate_zero_shot(enc.image_embeddings, w, batches, enc.logit_scale, **kw)
    t_img = time.perf_counter() - t0

    result = {
        "model": args.model, "image_size": s, "batch_size": args.batch_size, "images": args.images,
        "mc_samples": args.mc_samples, "images_per_second": args.images / t_img,
        "text_prompts": n_prompts, "text_classifier_seconds": t_text,
        "prompts_per_second": n_prompts / t_text,
        "imagenet_1000x80_classifier_seconds_extrapolated": 80000 / (n_prompts / t_text),
        "top1_random_model": m["top1"],
        "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine(),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "zero_shot.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = [f"{result['time']}, {result['cpu']}, load {result['loadavg']}", "",
          "| model | px | batch | images | MC S | images/s | prompts | classifier s | prompts/s | "
          "1000x80 s (extrap.) | backend |",
          "|---|---|---|---|---|---|---|---|---|---|---|",
          f"| {args.model} | {s} | {args.batch_size} | {args.images} | {args.mc_samples} | "
          f"{result['images_per_second']:.1f} | {n_prompts} | {t_text:.1f} | {result['prompts_per_second']:.1f} | "
          f"{result['imagenet_1000x80_classifier_seconds_extrapolated']:.0f} | "
          f"{result['backend']} x{len(jax.devices())} ({os.cpu_count()} cpus) |"]
    with open(os.path.join(args.out_dir, "zero_shot.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
