"""Why the HET-XL head's noise shrinks in contrastive training, and where it does not: LiT on a locked demo
tower with cached image features (``_cached_lit.py``), HET-XL under one change of the recipe at a time, and a
DET reference, on two kinds of caption noise.

    python bench/evidence_collapse.py --pretrained RUN_OR_EXPORT --demo-data DIR [--seeds 0,1]
        [--steps 1000] [--settings recipe,head_wd_0,...] [--captions colour,plain] [--root DIR]
        [--json bench/results/evidence_collapse.json] [--out docs/RESULTS_collapse.md]

Caption kinds (both: ``color_partner`` noise, probability ``--noise`` on warm-coloured objects, whose
caption names the look-alike shape):

* ``colour``: the demo captions (most name the colour), so a caption says whether it may be noisy;
* ``plain``: every caption names the shape only, so the noise is aleatoric for the image–text pair: only
  the image (its colour) tells whether the caption may be wrong.

Per run: the head's size over training (``het/angular``: the noise across the mean direction relative to
``|mu|``), its temperature; after training, on the training images, the AUROC with which each image's noise
size flags the images the rule puts noise on (``noise_selected``; 0.5 = blind); on the clean held-out shape
task, deterministic and MC top-1/NLL overall and on the warm and other colours, and the misclassification
AUROC of the confidence and the noise size. Runs are stored one JSON each under ``--root`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cached_lit as lit  # noqa: E402
from _common import machine, paired_interval  # noqa: E402

SETTINGS = {  # name -> overrides of demo:het (one change of the recipe each)
    "recipe": [],
    "head_wd_0": ["optim.wd_mults.head=0.0"],
    "init_1": ["model.het.init_scale=1.0"],
    "head_lr_10": ["optim.lr_mults.head=10.0"],
    "S32": ["model.het.mc_samples=32", "model.het.sample_chunk=32"],
    "S128": ["model.het.mc_samples=128", "model.het.sample_chunk=32"],
    "fixed_tau": ["freeze.temperature=True"],
    "sphere": ["model.het.noise_space=sphere"],
}
CAPTIONS = {"colour": {}, "plain": {"shape_only_prob": 1.0, "color_only_prob": 0.0}}
WARM = None  # filled from hetclip.data.demo.PARTNER_COLORS


def demo_samples(captions: str, noise: float):
    """The demo training set's images, captions and metadata under one caption kind (rendered as the demo
    generator renders them: the images do not depend on the captions)."""
    from hetclip.data import demo

    p = demo._check_params({**CAPTIONS[captions], "noise_prob": noise, "noise_rule": "color_partner"})
    held = set(demo.heldout_pairs(p["seed"], p["num_heldout"]))
    images, caps, meta = [], [], []
    for i in range(p["num_train"]):
        img, m = demo._train_sample(p, i, held)
        images.append(img)
        caps.append(m["caption"])
        meta.append(m)
    return np.stack(images), caps, meta


def _halves(meta, values):
    warm = np.asarray([m["color"] in WARM for m in meta])
    v = np.asarray(values, np.float64)
    return float(v[warm].mean()), float(v[~warm].mean())


def one_run(args, tower, feats, caps, meta, task, task_feats, captions, setting, seed, arm):
    recipe = "demo" if arm == "DET" else "demo:het"
    overrides = [] if arm == "DET" else SETTINGS[setting]
    cfg = lit.run_config(recipe, overrides, args.steps, seed)
    trained = lit.train(cfg, tower, feats, caps, log_every=50)
    res = lit.evaluate(trained, tower.tokenizer, task_feats, task, mc_samples=args.mc_samples, seed=seed)
    per, m = res["per_image"], res["metrics"]
    out = {"captions": captions, "setting": setting, "seed": seed, "arm": arm, "steps": args.steps,
           "seconds": trained.seconds, "overrides": overrides, "logit_scale": res["logit_scale"],
           "top1": m["top1"], "nll": m["nll"], "ece": m["ece"],
           "selective_auroc": {k: v["auroc"] for k, v in res["selective"].items()}}
    out["top1_warm"], out["top1_other"] = _halves(task.meta, per["correct"])
    if arm != "DET":
        out["history"] = [{k: r[k] for k in ("step", "loss", "temperature", "het/angular", "het/angular_spread",
                                              "het/mean_norm", "het/noise_std") if k in r} for r in trained.history]
        out["mc_top1"], out["mc_nll"] = m.get("mc_top1"), m.get("mc_nll")
        train_noise = lit.noise_sizes(trained.model_cfg, trained.params, feats)
        selected = np.asarray([m_["noise_selected"] for m_ in meta])
        from hetclip.zero_shot.uncertainty import auroc

        out["noise_auroc_selected"] = auroc(selected, train_noise)
        out["angular_train_warm"], out["angular_train_other"] = _halves(meta, train_noise)
        out["angular_eval_warm"], out["angular_eval_other"] = _halves(task.meta, per["noise"])
    return out


def main(argv=None):
    global WARM
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", required=True, help="the demo tower: a training run or its HF export")
    ap.add_argument("--demo-data", required=True, help="the demo data directory the tower was trained on")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--mc-samples", type=int, default=32)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--captions", default=",".join(CAPTIONS))
    ap.add_argument("--root", default="runs/evidence_collapse")
    ap.add_argument("--json", default="bench/results/evidence_collapse.json")
    ap.add_argument("--out", default="docs/RESULTS_collapse.md")
    args = ap.parse_args(argv)
    from hetclip.data.demo import PARTNER_COLORS

    WARM = set(PARTNER_COLORS)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS] + [c for c in args.captions.split(",") if c not in CAPTIONS]
    if unknown:
        raise SystemExit(f"unknown setting or caption kind {unknown}; settings {list(SETTINGS)}, captions {list(CAPTIONS)}")
    os.makedirs(args.root, exist_ok=True)
    lit.use_compilation_cache(os.path.join(args.root, "jax_cache"))
    tower = lit.load_tower(args.pretrained)
    size = tower.model_cfg.vision.image_size
    task = lit.read_eval(os.path.join(args.demo_data, "eval", "shape"), size)
    task_feats = lit.cached_features(tower, task, os.path.join(args.root, "features_eval_shape.npy"))
    rows = []
    t_all = time.perf_counter()
    for captions in args.captions.split(","):
        images, caps, meta = demo_samples(captions, args.noise)
        feats = lit.cached_features(tower, lit.Samples(images), os.path.join(args.root, "features_train.npy"))
        for seed in seeds:
            for arm, setting in [("DET", "-")] + [("HET-XL", s) for s in settings]:
                path = os.path.join(args.root, f"{captions}_{arm}_{setting}_s{seed}_n{args.noise:g}_t{args.steps}.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        rows.append(json.load(f))
                    continue
                row = one_run(args, tower, feats, caps, meta, task, task_feats, captions, setting, seed, arm)
                with open(path + ".tmp", "w") as f:
                    json.dump(row, f)
                os.replace(path + ".tmp", path)
                rows.append(row)
                print(f"{captions} {arm} {setting} seed {seed}: top1 {row['top1']:.4f} nll {row['nll']:.4f} "
                      f"angular {row.get('history', [{}])[-1].get('het/angular', float('nan')):.4f} "
                      f"auroc(selected) {row.get('noise_auroc_selected')} ({row['seconds']:.0f}s)", flush=True)
    result = {"machine": machine(), "steps": args.steps, "noise": args.noise, "seeds": seeds,
              "mc_samples": args.mc_samples, "pretrained": os.path.basename(os.path.normpath(args.pretrained)),
              "seconds": time.perf_counter() - t_all, "runs": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report(result))
    print(report(result))


def _fmt(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(result) -> str:
    """The tables: per caption kind, each setting's head size and flagging, and HET-XL − DET paired."""
    runs = result["runs"]
    lines = []
    for captions in dict.fromkeys(r["captions"] for r in runs):
        rs = [r for r in runs if r["captions"] == captions]
        det = {r["seed"]: r for r in rs if r["arm"] == "DET"}
        lines += [f"### Captions: {captions}", "",
                  "| setting | angular noise, start → end | warm / other (train) | AUROC noise vs noisy-caption "
                  "images | temperature | shape top-1 | HET−DET top-1 (paired) | HET−DET NLL | warm-half top-1 "
                  "HET−DET |", "|---|---|---|---|---|---|---|---|---|"]
        d = list(det.values())
        lines.append(f"| DET | – | – | – | – | {_fmt([r['top1'] for r in d])} | – | – | – |")
        for setting in dict.fromkeys(r["setting"] for r in rs if r["arm"] != "DET"):
            h = [r for r in rs if r["setting"] == setting and r["arm"] != "DET" and r["seed"] in det]
            pairs = [(det[r["seed"]], r) for r in h]

            def paired(key):
                iv = paired_interval([a[key] for a, _ in pairs], [b[key] for _, b in pairs])
                return f"{iv['mean']:+.3f}" + (f" [{iv['lo']:+.3f}, {iv['hi']:+.3f}]" if iv["n"] > 1 else "")

            start = _fmt([r["history"][0]["het/angular"] for r in h])
            end = _fmt([r["history"][-1]["het/angular"] for r in h])
            lines.append(
                f"| {setting} | {start} → {end} | {_fmt([r['angular_train_warm'] for r in h])} / "
                f"{_fmt([r['angular_train_other'] for r in h])} | {_fmt([r['noise_auroc_selected'] for r in h])} | "
                f"{_fmt([r['history'][-1]['temperature'] for r in h], 4)} | {_fmt([r['top1'] for r in h])} | "
                f"{paired('top1')} | {paired('nll')} | {paired('top1_warm')} |")
        lines.append("")
    m = result["machine"]
    lines.append(f"{len(runs)} runs of {result['steps']} steps, seeds {result['seeds']}, caption noise "
                 f"{result['noise']}, {result['mc_samples']} MC samples at evaluation; {m['cpu']} (load {m['loadavg']}), "
                 f"{result['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
