"""Why the HET-XL head's noise shrinks in contrastive training, and where it does not: LiT on a locked demo
tower with cached image features (``_cached_lit.py``), HET-XL under one change of the recipe at a time, and a
DET reference, on two kinds of caption noise.

    python bench/evidence_collapse.py --pretrained RUN_OR_EXPORT --demo-data DIR [--seeds 0,1]
        [--steps 1000] [--settings recipe,head_wd_0,...] [--captions colour,plain] [--root DIR]
        [--json bench/results/evidence_collapse.json] [--out bench/results/evidence_collapse.md]

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

S8 = ["model.het.mc_samples=8", "model.het.sample_chunk=8"]  # the diagnosis's reference: 8 MC samples
SETTINGS = {  # name -> overrides of demo:het after S8 (one change of the 8-sample recipe each)
    "recipe": [],
    "head_wd_0": ["optim.wd_mults.head=0.0"],
    "init_1": ["model.het.init_scale=1.0"],
    "head_lr_10": ["optim.lr_mults.head=10.0"],
    "S32": ["model.het.mc_samples=32", "model.het.sample_chunk=32"],
    "S128": ["model.het.mc_samples=128", "model.het.sample_chunk=32"],
    "fixed_tau": ["freeze.temperature=True"],
    "sphere": ["model.het.noise_space=sphere"],
    "jackknife": ["model.het.estimator=jackknife"],
}
CAPTIONS = {"colour": {}, "plain": {"shape_only_prob": 1.0, "color_only_prob": 0.0}}
# The image side after the locked tower: the pretrained projection kept (LiT), or trained by both arms (the
# cached features never run the tower, so only ``visual_projection`` of the image group moves)
PROJECTION = {"locked": [], "trained": ["freeze.image=False"]}
WARM = None  # filled from hetclip.data.demo.PARTNER_COLORS


def demo_samples(captions: str, noise: float, image_size: int):
    """The demo training set's images (the evaluation transform to the tower's ``image_size``), captions and
    metadata under one caption kind (rendered as the demo generator renders them: the images do not depend
    on the captions)."""
    from PIL import Image

    from hetclip.data import decode, demo

    p = demo._check_params({**CAPTIONS[captions], "noise_prob": noise, "noise_rule": "color_partner"})
    held = set(demo.heldout_pairs(p["seed"], p["num_heldout"]))
    images, caps, meta = [], [], []
    for i in range(p["num_train"]):
        img, m = demo._train_sample(p, i, held)
        images.append(decode.eval_transform_uint8(Image.fromarray(img), image_size))
        caps.append(m["caption"])
        meta.append(m)
    return np.stack(images), caps, meta


def _halves(meta, values):
    warm = np.asarray([m["color"] in WARM for m in meta])
    v = np.asarray(values, np.float64)
    return float(v[warm].mean()), float(v[~warm].mean())


def one_run(args, tower, feats, caps, meta, task, task_feats, captions, setting, seed, arm):
    recipe = "demo" if arm == "DET" else "demo:het"
    overrides = ([] if arm == "DET" else S8 + SETTINGS[setting]) + PROJECTION[args.projection]
    cfg = lit.run_config(recipe, overrides, args.steps, seed)
    trained = lit.train(cfg, tower, feats, caps, log_every=50)
    res = lit.evaluate(trained, tower.tokenizer, task_feats, task, mc_samples=args.mc_samples, seed=seed)
    per, m = res["per_image"], res["metrics"]
    out = {"captions": captions, "projection": args.projection, "setting": setting, "seed": seed, "arm": arm, "steps": args.steps,
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


MECH_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
MECH_ROWS = ((8, "mc"), (8, "jackknife"), (32, "mc"), (128, "mc"), (1024, "mc"))  # (S, estimator)


def mechanism(args, tower, feats, caps, captions, seed=0, batches=8):
    """Which noise size the training objective prefers, and how that depends on the MC samples: a HET-XL
    recipe model is trained (``captions``, ``seed``); then on ``batches`` fixed training batches its noise is
    multiplied by ``a`` (``d`` and ``v``/``V``; the mean, text and temperature kept) and the HET-XL loss is
    estimated with ``S`` samples (``hetxl_loss_naive``, averaged over the batches and, for ``S`` < 1024,
    over 1024/S keys, so every ``S`` costs the same draws; ``S`` = 8 also with the jackknife estimator). ``S`` = 1024 is close to the exact expected loss;
    a smaller ``S`` estimates ``log E[softmax]`` by ``log mean`` of few draws, which Jensen's inequality biases
    upward by about ``Var/(2S)``, a penalty that grows with the noise."""
    import jax
    import jax.numpy as jnp

    from hetclip.losses import hetxl_loss_naive
    from hetclip.model import DualEncoder

    cfg = lit.run_config("demo:het", S8 + PROJECTION[args.projection], args.steps, seed)
    trained = lit.train(cfg, tower, feats, caps, log_every=args.steps)
    model = DualEncoder(trained.model_cfg)
    params = trained.params
    tokens = np.asarray(tower.tokenizer(list(caps)))
    scale = float(model.apply({"params": params}, method=DualEncoder.logit_scale))
    order = np.random.default_rng(1234).permutation(len(caps))
    b = int(cfg.batch_size)

    @jax.jit
    def parts(f, t):
        img = model.apply({"params": params}, f, method=DualEncoder.project_image)
        return img["mean"].astype(jnp.float32), img["noise"], model.apply({"params": params}, t,
                                                                         method=DualEncoder.encode_text)

    def loss(mean, noise, txt, a, key, s, estimator):
        scaled = {k: (v if k == "C" else v * a) for k, v in noise.items()}
        return hetxl_loss_naive(mean, scaled, txt, scale, key, mc_samples=s, estimator=estimator)[0]

    table = {row: {a: 0.0 for a in MECH_SCALES} for row in MECH_ROWS}
    for i in range(batches):
        idx = order[i * b:(i + 1) * b]
        mean, noise, txt = parts(jnp.asarray(feats[idx]), jnp.asarray(tokens[idx]))
        for s, est in MECH_ROWS:
            fn = jax.jit(lambda m, n, t, a, k, s=s, est=est: loss(m, n, t, a, k, s, est))
            for a in MECH_SCALES:
                reps = max(1, 1024 // s)
                vals = [float(fn(mean, noise, txt, a, jax.random.key(i * 10_000 + r))) for r in range(reps)]
                table[(s, est)][a] += float(np.mean(vals)) / batches
    return {"captions": captions, "seed": seed, "steps": args.steps, "logit_scale": scale,
            "angular": float(np.mean(lit.noise_sizes(trained.model_cfg, params, feats[order[:b * batches]]))),
            "loss": {f"S={s} {est}": {f"{a:g}": v for a, v in row.items()} for (s, est), row in table.items()}}


def mechanism_report(mech) -> str:
    lines = [f"HET-XL training loss of the trained recipe model ({mech['captions']} captions, seed {mech['seed']}, "
             f"{mech['steps']} steps; its angular noise {mech['angular']:.3f}) with its noise multiplied by a, "
             "estimated with S samples (rows), minus the loss at a = 0:", "",
             "| S, estimator | " + " | ".join(f"a = {a:g}" for a in MECH_SCALES) + " | best a |",
             "|---|" + "---|" * (len(MECH_SCALES) + 1)]
    for s, row in mech["loss"].items():
        base = row["0"]
        best = min(row, key=row.get)
        lines.append(f"| {s} | " + " | ".join(f"{row[f'{a:g}'] - base:+.4f}" for a in MECH_SCALES) + f" | {best} |")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--projection", choices=list(PROJECTION), default="locked")
    ap.add_argument("--mechanism", action="store_true", help="instead of the runs: the loss against a multiple "
                    "of the trained recipe model's noise, per number of MC samples (``mechanism``)")
    ap.add_argument("--root", default="runs/evidence_collapse")
    ap.add_argument("--json", default="bench/results/evidence_collapse.json")
    ap.add_argument("--out", default="bench/results/evidence_collapse.md")
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
    if args.mechanism:
        captions = args.captions.split(",")[0]
        images, caps, meta = demo_samples(captions, args.noise, size)
        feats = lit.cached_features(tower, lit.Samples(images), os.path.join(args.root, "features_train.npy"))
        mech = mechanism(args, tower, feats, caps, captions, seed=seeds[0])
        mech["machine"] = machine()
        for path, text in ((args.json, json.dumps(mech, indent=1)), (args.out, mechanism_report(mech))):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
        print(mechanism_report(mech))
        return
    rows = []
    t_all = time.perf_counter()
    for captions in args.captions.split(","):
        images, caps, meta = demo_samples(captions, args.noise, size)
        feats = lit.cached_features(tower, lit.Samples(images), os.path.join(args.root, "features_train.npy"))
        for seed in seeds:
            for arm, setting in [("DET", "-")] + [("HET-XL", s) for s in settings]:
                path = os.path.join(args.root, f"{captions}_{arm}_{setting}_s{seed}_n{args.noise:g}_t{args.steps}"
                                    f"{'_proj' if args.projection == 'trained' else ''}.json")
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
    result = {"machine": machine(), "steps": args.steps, "projection": args.projection, "noise": args.noise, "seeds": seeds,
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
