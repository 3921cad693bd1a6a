"""The paper's own setting, small: DET vs HET vs HET-XL classifier heads under input-dependent label
noise, on scikit-learn's digits (8x8 images, 10 classes, shipped offline). Writes a markdown report
(+ JSON, + PNG figure; ``docs/RESULTS_supervised.md`` collects the recorded reports).

    python bench/evidence_supervised.py [--seeds 5] [--steps 4000] [--flip-probs 0,0.2,0.4] [--hard-rule ink]

Label noise that depends on the input: a clean reference model (logistic regression, out-of-fold on
the training split) names, for every class ``c``, its most confusable other class ``partner(c)``.
Per class, the ``--hard-fraction`` "hard" images get the partner's label with probability ``p``
(each value of ``--flip-probs``); the other images keep their label. ``--hard-rule partner``: the
hard images are the most partner-like ones (annotators confuse confusable images: the noise sits
where a clean model is already unsure); ``--hard-rule ink``: the ones with the most ink (the noise
depends on a nuisance feature, away from the class boundary). Test labels stay clean.

Every arm trains the same MLP (same initialisation of the shared layers, same batches, same label
draws for a given seed) with a different head; for each regime (training length, noise level),
split and seed the arms are paired, and the report gives each arm's mean ± std and the paired 95 %
t-interval of its difference to DET (with several splits, also over the per-split means). Metrics on the clean test split: top-1, NLL, ECE of the predictive (the MC
average for the HET heads; the mean-logit prediction is reported too), and NLL against the noisy
label distribution (what a model of the noise should get right). Every number in the report comes
from runs made by this script.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import shlex
import statistics
import sys
import time

import numpy as np

from _common import mean_std, paired_interval, require_matplotlib, verdict

ARMS = ("DET", "HET", "HET-XL", "DET-T")
ARM_HELP = ("DET: linear softmax head; HET: noise in logit space; HET-XL: noise on the pre-logits; "
            "DET-T: DET with the HET heads' learned bounded temperature (a control)")
METRICS = ("top1", "nll", "ece", "nll_noisy", "det_top1", "det_nll", "det_ece", "flipped_fit", "margin", "tau",
           "noise_std")
HIGHER_IS_BETTER = {"top1": True, "det_top1": True}


# ---------------------------------------------------------------------------------------------
# Data and input-dependent noise (numpy, deterministic)
# ---------------------------------------------------------------------------------------------

def load_digits_split(test_size: int = 600, split_seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: digits scaled to [0, 1], stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("bench/evidence_supervised.py needs scikit-learn: pip install -e \".[test]\"") from e
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=split_seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def reference_scores(x_train, y_train, x_test, y_test, num_classes: int):
    """Confusion structure of a clean reference model (multinomial logistic regression).

    Returns ``partner [K]`` (for each class, the other class that gets most out-of-fold probability
    mass on its training images), per-image scores ``log p(partner(y)|x) - log p(y|x)`` for the
    training split (out-of-fold, 5 folds) and the test split (model fit on the whole training split),
    and the out-of-fold probability of each training image's own label.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    ref = LogisticRegression(max_iter=3000, C=1.0)
    p_tr = cross_val_predict(ref, x_train, y_train, cv=5, method="predict_proba")
    p_te = ref.fit(x_train, y_train).predict_proba(x_test)
    mass = np.zeros((num_classes, num_classes))
    for c in range(num_classes):
        mass[c] = p_tr[y_train == c].sum(0)
        mass[c, c] = -np.inf
    partner = mass.argmax(1).astype(np.int32)
    conf_tr = p_tr[np.arange(len(y_train)), y_train]
    return partner, partner_score(p_tr, y_train, partner), partner_score(p_te, y_test, partner), conf_tr


def partner_score(probs, labels, partner):
    """``log p(partner(y)|x) - log p(y|x)`` per row."""
    lp = np.log(np.asarray(probs, np.float64) + 1e-12)
    rows = np.arange(len(labels))
    return lp[rows, partner[labels]] - lp[rows, labels]


def ink_score(x):
    """Total stroke intensity per image: a nuisance feature unrelated to which class an image resembles."""
    return np.asarray(x, np.float64).sum(axis=1)


HARD_RULES = {"partner": "most partner-like (by the reference model)", "ink": "most ink (thickest strokes)"}


def hard_mask(labels, score, hard_fraction: float):
    """Per class, the ``hard_fraction`` of images with the highest ``score`` (ties: lower index first)."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction={hard_fraction} must lie in [0, 1]")
    labels = np.asarray(labels)
    mask = np.zeros(labels.shape, bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_hard = int(round(hard_fraction * len(idx)))
        order = idx[np.argsort(-score[idx], kind="stable")]
        mask[order[:n_hard]] = True
    return mask


def noisy_labels(labels, hard, partner, flip_prob: float, seed: int):
    """Hard images take their class's partner label with probability ``flip_prob``; others keep theirs.
    Deterministic for a given ``seed`` (numpy PCG64)."""
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob={flip_prob} must lie in [0, 1]")
    labels = np.asarray(labels)
    u = np.random.default_rng([seed, 1]).random(labels.shape)
    flip = hard & (u < flip_prob)
    return np.where(flip, partner[labels], labels).astype(np.int32), flip


def label_distribution(labels, hard, partner, flip_prob: float, num_classes: int):
    """The noisy-label distribution ``q(y~|x)`` the generator samples from, ``[N, K]``."""
    labels = np.asarray(labels)
    q = np.zeros((len(labels), num_classes))
    rows = np.arange(len(labels))
    p = np.where(hard, flip_prob, 0.0)
    q[rows, labels] += 1.0 - p
    q[rows, partner[labels]] += p
    return q


def noise_audit(labels, noisy, flipped, hard, partner) -> dict:
    """What one label draw did: flips, the flip rate among the hard images, and the flips that left the
    hard images or went elsewhere than the partner class (both 0 when the generator does what it says);
    ``labels_sha1`` identifies the draw (equal across arms and runs with the same seed)."""
    labels, noisy = np.asarray(labels), np.asarray(noisy)
    changed = noisy != labels
    return {"flipped": int(flipped.sum()), "changed": int(changed.sum()),
            "labels_sha1": hashlib.sha1(noisy.astype(np.int32).tobytes()).hexdigest()[:16],
            "hard_flip_rate": float(flipped[hard].mean()) if hard.any() else math.nan,
            "outside_hard": int((changed & ~hard).sum()),
            "not_to_partner": int((changed & (noisy != partner[labels])).sum())}


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int):
    """``[steps, batch]`` example indices: concatenated per-epoch permutations (seeded)."""
    rng = np.random.default_rng([seed, 2])
    need = steps * batch_size
    perms = [rng.permutation(num_examples) for _ in range(-(-need // num_examples))]
    return np.concatenate(perms)[:need].reshape(steps, batch_size).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Statistics and report
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Model and training (JAX)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunConfig:
    widths: tuple = (256, 64)
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_factors: int = 4
    train_samples: int = 16
    eval_samples: int = 64
    init_scale: float = 0.1
    tau_init: float = 1.0
    learn_tau: bool = True
    param_efficient: bool = True


def temperature_config(cfg: RunConfig):
    from hetclip import heads

    return heads.TemperatureConfig(kind="bounded", init=cfg.tau_init, tau_lo=0.05, tau_hi=5.0)


def build_model(arm: str, cfg: RunConfig, num_classes: int):
    import flax.linen as nn

    from hetclip import supervised_heads as heads

    if arm not in ARMS:
        raise ValueError(f"arm {arm!r} is not one of {ARMS}")
    tau = temperature_config(cfg)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, key=None, deterministic=False, example_ids=None):
            for i, w in enumerate(cfg.widths):
                x = nn.relu(nn.Dense(w, name=f"dense_{i}")(x))  # the last one is the pre-logits φ(x)
            if arm in ("DET", "DET-T"):
                return heads.DetClassifier(num_classes, temperature=tau if arm == "DET-T" else None,
                                           name="head")(x)
            cls = heads.HetClassifier if arm == "HET" else heads.HetXLClassifier
            return cls(num_classes, num_factors=cfg.num_factors, mc_samples=cfg.train_samples,
                       param_efficient=cfg.param_efficient, temperature=tau, sample_chunk=cfg.train_samples,
                       init_scale=cfg.init_scale, name="head")(x, key, deterministic=deterministic,
                                                              example_ids=example_ids)

    return Net()


def count_params(tree) -> int:
    import jax

    return int(sum(np.size(v) for v in jax.tree_util.tree_leaves(tree)))


def make_runner(arm: str, cfg: RunConfig, num_classes: int, num_features: int):
    """``run(seed, x_tr, y_tr, order, x_te) -> (test log-probs of the predictive, test log-probs of the
    mean logits, train log-probs of the predictive, diagnostics, per-step losses)``, jitted once per arm
    and config (seeds and noise levels reuse the compiled program)."""
    import jax
    import jax.numpy as jnp
    import optax

    from hetclip import supervised_heads as heads
    from hetclip import noise as noise_lib

    model = build_model(arm, cfg, num_classes)
    noisy = arm in ("HET", "HET-XL")
    tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(cfg.lr)
    frozen_tau = not cfg.learn_tau

    def init(seed):
        k_init, k_noise, k_eval = jax.random.split(jax.random.PRNGKey(seed), 3)
        x0 = jnp.zeros((2, num_features), jnp.float32)
        params = model.init(k_init, x0, k_noise)["params"]
        return params, k_noise, k_eval

    def mask_grads(g):
        if not frozen_tau:
            return g
        return jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.zeros_like(v) if any(getattr(p, "key", None) == "temperature" for p in path) else v, g)

    @jax.jit
    def run(seed, x_tr, y_tr, order, x_te):
        params, k_noise, k_eval = init(seed)
        opt = tx.init(params)

        def loss_fn(p, idx, step):
            key = jax.random.fold_in(k_noise, step)
            out = model.apply({"params": p}, x_tr[idx], key, example_ids=idx) if noisy else \
                model.apply({"params": p}, x_tr[idx])
            return heads.classifier_loss(out, y_tr[idx])

        def body(carry, xs):
            p, o = carry
            idx, step = xs
            loss, g = jax.value_and_grad(loss_fn)(p, idx, step)
            upd, o = tx.update(mask_grads(g), o, p)
            return (optax.apply_updates(p, upd), o), loss

        (params, _), losses = jax.lax.scan(body, (params, opt), (order, jnp.arange(order.shape[0])))

        def predict(x):
            if not noisy:
                out = model.apply({"params": params}, x)
                return out["log_probs"], out["log_probs"]
            det = model.apply({"params": params}, x, deterministic=True)["log_probs"]
            mc_model = build_model(arm, dataclasses.replace(cfg, train_samples=cfg.eval_samples), num_classes)
            mc = mc_model.apply({"params": params}, x, k_eval)["log_probs"]
            return mc, det

        mc_te, det_te = predict(x_te)
        mc_tr, _ = predict(x_tr)
        top2 = jax.lax.top_k(det_te, 2)[0]
        diag = {"margin": jnp.mean(top2[:, 0] - top2[:, 1])}
        if arm != "DET":
            scale = heads.Temperature(temperature_config(cfg)).apply({"params": params["head"]["temperature"]})
            diag["tau"] = 1.0 / scale
        if noisy:
            out = model.apply({"params": params}, x_te, deterministic=True)
            cov = noise_lib.covariance(out["noise"])
            if arm == "HET-XL":
                w = params["head"]["classifier"]["kernel"]
                var = jnp.einsum("dk,bde,ek->bk", w, cov, w)
            else:
                var = jnp.diagonal(cov, axis1=1, axis2=2)
            diag["noise_std"] = jnp.mean(jnp.sqrt(var)) / diag["tau"]
        return mc_te, det_te, mc_tr, diag, losses

    return run


def evaluate(mc_te, det_te, y_te, q_te, mc_tr, y_noisy, flipped) -> dict:
    from hetclip.zero_shot import metrics as zm

    mc_te, det_te, mc_tr = (np.asarray(a, np.float64) for a in (mc_te, det_te, mc_tr))
    pred_tr = mc_tr.argmax(1)
    return {
        "top1": float((mc_te.argmax(1) == y_te).mean()),
        "nll": zm.nll(mc_te, y_te),
        "ece": zm.ece(mc_te, y_te),
        "nll_noisy": float(-(q_te * mc_te).sum(1).mean()),
        "det_top1": float((det_te.argmax(1) == y_te).mean()),
        "det_nll": zm.nll(det_te, y_te),
        "det_ece": zm.ece(det_te, y_te),
        # memorisation: fraction of flipped training images predicted with their (wrong) noisy label
        "flipped_fit": float((pred_tr[flipped] == y_noisy[flipped]).mean()) if flipped.any() else math.nan,
    }


def head_extra_params(arm: str, cfg: RunConfig, num_classes: int, num_features: int):
    """``(head params, extra params over DET's head)`` from the initialised models."""
    import jax
    import jax.numpy as jnp

    def head(a):
        m = build_model(a, cfg, num_classes)
        p = m.init(jax.random.PRNGKey(0), jnp.zeros((2, num_features)), jax.random.PRNGKey(1))["params"]
        return count_params(p["head"])

    n = head(arm)
    return n, n - head("DET")


# ---------------------------------------------------------------------------------------------
# Experiment driver
# ---------------------------------------------------------------------------------------------

def noise_setup(test_size: int, split_seed: int, hard_rule: str, hard_fraction: float):
    """Data, confusion partners and hard masks: ``(x_tr, y_tr, x_te, y_te, partner, hard_tr, hard_te,
    placement)``; ``placement`` says how sure the clean reference model is (out-of-fold probability of
    the true label) on the hard and on the other training images."""
    x_tr, y_tr, x_te, y_te = load_digits_split(test_size, split_seed)
    k = int(y_tr.max()) + 1
    partner, s_tr, s_te, conf_tr = reference_scores(x_tr, y_tr, x_te, y_te, k)
    if hard_rule == "ink":
        s_tr, s_te = ink_score(x_tr), ink_score(x_te)
    hard_tr = hard_mask(y_tr, s_tr, hard_fraction)
    hard_te = hard_mask(y_te, s_te, hard_fraction)
    placement = {"ref_conf_hard": float(conf_tr[hard_tr].mean()) if hard_tr.any() else math.nan,
                 "ref_conf_easy": float(conf_tr[~hard_tr].mean()) if (~hard_tr).any() else math.nan}
    return x_tr, y_tr, x_te, y_te, partner, hard_tr, hard_te, placement


def run_all(args, cfg: RunConfig, log=print) -> dict:
    """Every (steps, p) regime × split × seed × arm; within a regime, the arms' result lists are
    aligned by (split, seed), which is the pairing unit of the intervals."""
    splits = args.split_seed
    setups = {s: noise_setup(args.test_size, s, args.hard_rule, args.hard_fraction) for s in splits}
    x0, y0 = setups[splits[0]][0], setups[splits[0]][1]
    k = int(y0.max()) + 1
    arms = args.arms
    results: dict = {}
    regimes: dict = {}
    timing: dict = {a: 0.0 for a in arms}
    t0 = time.time()
    for steps in args.steps:
        run_cfg = dataclasses.replace(cfg, steps=steps)
        runners = {a: make_runner(a, run_cfg, k, x0.shape[1]) for a in arms}
        for p in args.flip_probs:
            label = regime_label(steps, p, len(args.steps) > 1)
            regimes[label] = {"steps": steps, "p": p}
            for split in splits:
                x_tr, y_tr, x_te, y_te, partner, hard_tr, hard_te, _ = setups[split]
                q_te = label_distribution(y_te, hard_te, partner, p, k)
                for seed in range(args.seeds):
                    y_noisy, flipped = noisy_labels(y_tr, hard_tr, partner, p, seed)
                    order = batch_order(len(y_tr), cfg.batch_size, steps, seed)
                    for arm in arms:
                        t = time.time()
                        mc_te, det_te, mc_tr, diag, _ = runners[arm](seed, x_tr, y_noisy, order, x_te)
                        res = evaluate(mc_te, det_te, y_te, q_te, mc_tr, y_noisy, flipped)
                        res.update({name: float(v) for name, v in diag.items()})
                        res["seconds"] = time.time() - t
                        timing[arm] += res["seconds"]
                        results.setdefault(label, {}).setdefault(arm, []).append(res)
                        log(f"[{time.time() - t0:.0f}s] {label} split {split} seed {seed} {arm}: "
                            f"top1 {res['top1']:.3f} nll {res['nll']:.3f} ece {res['ece']:.3f} "
                            f"nll_noisy {res['nll_noisy']:.3f} flipped_fit {res['flipped_fit']:.2f} "
                            f"margin {res['margin']:.2f} tau {res.get('tau', 1):.3f} "
                            f"noise_std {res.get('noise_std', 0):.3f} ({res['seconds']:.1f}s)")
    params = {a: dict(zip(("head", "extra"), head_extra_params(a, cfg, k, x0.shape[1]))) for a in arms}
    first = setups[splits[0]]
    placements = [setups[s][-1] for s in splits]
    data = {"train": int(len(first[1])), "test": int(len(first[3])), "classes": k, "partner": first[4].tolist(),
            "hard_train": int(first[5].sum()), "splits": list(splits),
            **{key: statistics.mean(pl[key] for pl in placements) for key in placements[0]},
            "hard_per_class": [int(first[5][first[1] == c].sum()) for c in range(k)],
            "train_per_class": [int((first[1] == c).sum()) for c in range(k)]}
    audits = {f"{p:g}": [noise_audit(setups[sp][1], *noisy_labels(setups[sp][1], setups[sp][5], setups[sp][4], p, s),
                                     setups[sp][5], setups[sp][4]) for sp in splits for s in range(args.seeds)]
              for p in args.flip_probs}
    data["flipped_train"] = {p: [a["flipped"] for a in runs] for p, runs in audits.items()}
    data["label_noise"] = audits  # per p: one audit per (split, seed), split-major
    if len(splits) > 1:
        data["partner_by_split"] = {str(sp): setups[sp][4].tolist() for sp in splits}
    return {"results": results, "regimes": regimes, "params": params, "data": data,
            "wall_seconds": time.time() - t0, "arm_seconds": timing}


def regime_label(steps: int, p: float, with_steps: bool) -> str:
    return f"{steps} steps, p={p:g}" if with_steps else f"{p:g}"


def regimes_of(report: dict) -> dict:
    """``{label: {"steps", "p"}}`` (reports with one step count key their results by ``p`` alone)."""
    return report.get("regimes") or {k: {"steps": report["config"]["steps"], "p": float(k)}
                                     for k in report["results"]}


def render(report: dict) -> str:
    a = report["args"]
    arms = a["arms"]
    primary = a["primary"]
    cfg = report["config"]
    lines = [
        f"# {a.get('title') or 'Supervised DET vs HET vs HET-XL under input-dependent label noise'}",
        "",
        f"Produced by `bench/evidence_supervised.py`; raw numbers in `{a['json']}`. Command: `{report['command']}`. "
        f"Machine: {report['machine']}; load average at the start {report.get('load_start', '?')}, "
        f"at the end {report.get('load_end', '?')}; wall time {report['wall_seconds'] / 60:.1f} min"
        + (f", CPU time {report['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in report else "") + ".",
        "",
        f"Data: scikit-learn digits, {report['data']['train']} training / {report['data']['test']} clean test "
        f"images, {report['data']['classes']} classes. Confusion partner of each class (0-9): "
        f"{report['data']['partner']}{' (first split; every split in the JSON)' if 'partner_by_split' in report['data'] else ''}. Per class the {a['hard_fraction']:.0%} "
        f"{HARD_RULES[a.get('hard_rule', 'partner')]} training images "
        f"({report['data']['hard_train']}) take the partner's label with probability p; the others stay clean."
        + (f" A clean reference model (logistic regression, out-of-fold) gives the true label of the hard images "
           f"probability {report['data']['ref_conf_hard']:.3f} on average, of the others "
           f"{report['data']['ref_conf_easy']:.3f}." if "ref_conf_hard" in report["data"] else ""),
        "",
        f"Model: MLP {' → '.join(str(w) for w in [64] + list(cfg['widths']))} (ReLU; the last layer is the "
        f"pre-logits), then the head. Adam lr {cfg['lr']}, batch {cfg['batch_size']}, "
        f"{', '.join(str(v) for v in sorted({r['steps'] for r in regimes_of(report).values()}))} steps, "
        f"weight decay {cfg['weight_decay']}. HET / HET-XL: R={cfg['num_factors']} factors "
        f"({'parameter-efficient' if cfg['param_efficient'] else 'full'} V(x)), {cfg['train_samples']} MC samples "
        f"in training, {cfg['eval_samples']} at test, noise init scale {cfg['init_scale']}, bounded temperature "
        f"τ ∈ [0.05, 5] starting at {cfg['tau_init']} ({'learned' if cfg['learn_tau'] else 'fixed'}). {ARM_HELP}.",
        "",
        f"{pairs_text(report)}; within a seed every arm sees the same label draw, batches and shared-layer "
        f"initialisation. Primary metric (named before the run): clean-test **{primary}**. Mean ± std over seeds; "
        f"Δ = arm − DET, paired 95 % t-interval over seeds.",
        "",
        "Columns: `top1`, `nll`, `ece` of the predictive on clean test labels (MC average for HET/HET-XL); "
        "`nll_noisy`: NLL against the noisy-label distribution of the test images (how well the noise itself "
        "is modelled); `det_*`: the mean-logit prediction; `flipped_fit`: fraction of flipped training images "
        "predicted with their wrong label (memorisation); `margin`: mean gap between the top two scaled logits "
        "on test; `tau`: learned temperature; `noise_std`: mean std of the head's noise on each scaled logit "
        "(HET: Σ(x) diagonal; HET-XL: Wᵀ Σ'(x) W diagonal), divided by τ.",
        "",
        "## Extra parameters of each head",
        "",
        "| arm | head parameters | extra over DET |",
        "|---|---|---|",
    ]
    for arm in arms:
        pr = report["params"][arm]
        lines.append(f"| {arm} | {pr['head']:,} | {pr['extra']:,} |")
    cols = [m for m in METRICS]
    regimes = regimes_of(report)
    for label, by_arm in report["results"].items():
        reg = regimes[label]
        flips = report["data"]["flipped_train"].get(f"{reg['p']:g}", [])
        lines += ["", f"## {reg['steps']} steps, flip probability p = {reg['p']:g}" +
                  (f" ({statistics.mean(flips):.0f} training labels flipped on average)" if flips else ""), "",
                  "| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for arm in arms:
            rs = by_arm[arm]
            lines.append(f"| {arm} | " + " | ".join(mean_spread_or_nan([r.get(m) for r in rs]) for m in cols) + " |")
        if "DET" in by_arm:
            lines += ["", "| Δ vs DET | metric | mean Δ | 95 % interval | reading |", "|---|---|---|---|---|"]
            for arm in arms:
                if arm == "DET":
                    continue
                for m in (primary, "nll", "ece", "nll_noisy"):
                    iv = paired_interval([r[m] for r in by_arm["DET"]], [r[m] for r in by_arm[arm]])
                    lines.append(f"| {arm} | {m} | {iv['mean']:+.4f} | [{iv['lo']:+.4f}, {iv['hi']:+.4f}] | "
                                 f"{verdict(iv, HIGHER_IS_BETTER.get(m, False))} |")
            splits = report["data"].get("splits") or []
            if len(splits) > 1:
                lines += ["", f"Pairs on the same split share its test set, so the split is also checked as the "
                              f"unit: per-split mean Δ {primary} (splits {', '.join(map(str, splits))}) and the "
                              f"95 % interval over the {len(splits)} split means:", ""]
                for arm in arms:
                    if arm != "DET":
                        per = split_means(by_arm["DET"], by_arm[arm], primary, len(splits))
                        iv = paired_interval([0.0] * len(per), per)
                        lines.append(f"- {arm}: {', '.join(f'{v:+.4f}' for v in per)}; interval "
                                     f"[{iv['lo']:+.4f}, {iv['hi']:+.4f}], "
                                     f"{verdict(iv, HIGHER_IS_BETTER.get(primary, False))}")
    if report.get("figure"):
        lines += ["", f"![clean-test metrics against label noise]({report['figure']})"]
    if report.get("interpretation"):
        lines += ["", "**Interpretation** (written by hand for this recorded run, stored in the JSON): "
                  + report["interpretation"]]
    return "\n".join(lines) + "\n"


def split_means(det_runs, arm_runs, metric: str, num_splits: int):
    """Mean ``arm - DET`` difference of ``metric`` per split (runs are ordered split-major)."""
    if len(det_runs) != len(arm_runs) or len(det_runs) % num_splits:
        raise ValueError(f"{len(det_runs)} DET and {len(arm_runs)} arm runs do not split into {num_splits} splits")
    n = len(det_runs) // num_splits
    d = [b[metric] - a[metric] for a, b in zip(det_runs, arm_runs)]
    return [statistics.mean(d[i * n:(i + 1) * n]) for i in range(num_splits)]


def pairs_text(report: dict) -> str:
    splits = report["data"].get("splits") or [report["args"].get("split_seed", 0)]
    if isinstance(splits[0], list):
        splits = splits[0]
    seeds = report["args"]["seeds"]
    if len(splits) == 1:
        return f"{seeds} seeds per arm (train/test split seed {splits[0]})"
    return (f"{len(splits)} train/test splits (seeds {', '.join(map(str, splits))}) × {seeds} seeds = "
            f"{len(splits) * seeds} pairs per arm, mean ± std and intervals over all pairs")


def mean_spread_or_nan(values) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return mean_std(vals) if vals else "–"


def plot(report: dict, path: str) -> None:
    """Four panels against the regime axis (training steps if several, else the flip probability):
    clean-test top-1 (mean ± std), the paired top-1 difference to DET (mean and 95 % interval), NLL, ECE."""
    matplotlib = require_matplotlib(path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = regimes_of(report)
    arms = report["args"]["arms"]
    steps = sorted({r["steps"] for r in regimes.values()})
    ps = sorted({r["p"] for r in regimes.values()})
    by_steps = len(steps) > 1
    series = ps if by_steps else steps
    xvals = steps if by_steps else ps

    def points(other):
        pts = [(r["steps"] if by_steps else r["p"], report["results"][lab])
               for lab, r in regimes.items() if (r["p"] if by_steps else r["steps"]) == other]
        return sorted(pts, key=lambda t: t[0])

    def shift(v, i):
        return v * (1 + 0.025 * (i - (len(arms) - 1) / 2)) if by_steps else v + (i - (len(arms) - 1) / 2) * 0.006

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = (("top1", "clean-test top-1 (mean ± std)"), ("dtop1", "top-1 − DET, paired 95 % interval"),
              ("nll", "clean-test NLL (mean ± std)"), ("ece", "clean-test ECE (mean ± std)"))
    for ax, (m, title) in zip(axes, panels):
        for i, arm in enumerate(arms):
            if m == "dtop1" and (arm == "DET" or "DET" not in arms):
                continue
            for j, other in enumerate(series):
                pts = points(other)
                if m == "dtop1":
                    ivs = [paired_interval([x["top1"] for x in res["DET"]], [x["top1"] for x in res[arm]])
                           for _, res in pts]
                    mu = [iv["mean"] for iv in ivs]
                    err = [[iv["mean"] - iv["lo"] if math.isfinite(iv["lo"]) else 0.0 for iv in ivs],
                           [iv["hi"] - iv["mean"] if math.isfinite(iv["hi"]) else 0.0 for iv in ivs]]
                else:
                    mu = [statistics.mean(x[m] for x in res[arm]) for _, res in pts]
                    err = [statistics.stdev([x[m] for x in res[arm]]) if len(res[arm]) > 1 else 0.0
                           for _, res in pts]
                name = arm + (f", p={other:g}" if by_steps and len(series) > 1 else
                              f", {other} steps" if not by_steps and len(series) > 1 else "")
                ax.errorbar([shift(v, i) for v, _ in pts], mu, yerr=err, marker="o", capsize=3, label=name,
                            color=f"C{i}", linestyle=("-", "--", ":", "-.")[j % 4])
        if m == "dtop1":
            ax.axhline(0.0, color="black", linewidth=0.8)
        if by_steps:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xvals, [f"{v:g}" for v in xvals])
        ax.set_xlabel("training steps" if by_steps else "flip probability p on the hard images")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    rule = HARD_RULES[report["args"].get("hard_rule", "partner")]
    fig.suptitle(f"digits, {pairs_text(report)}; noisy labels on the {rule} half of each class", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _floats(s: str):
    return [float(v) for v in s.split(",") if v.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--flip-probs", type=_floats, default=[0.0, 0.2, 0.4])
    p.add_argument("--hard-fraction", type=float, default=0.5)
    p.add_argument("--hard-rule", choices=tuple(HARD_RULES), default="partner",
                   help="which images of a class get noisy labels: " +
                        "; ".join(f"{k}: the {v}" for k, v in HARD_RULES.items()))
    p.add_argument("--arms", type=lambda s: [a for a in s.split(",") if a], default=["DET", "HET", "HET-XL"],
                   help=f"comma-separated subset of {','.join(ARMS)} ({ARM_HELP})")
    p.add_argument("--primary", default="top1", choices=("top1", "nll", "ece", "nll_noisy"))
    p.add_argument("--steps", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[RunConfig.steps],
                   help="training steps; a comma list makes training length a regime axis")
    p.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    p.add_argument("--lr", type=float, default=RunConfig.lr)
    p.add_argument("--weight-decay", type=float, default=RunConfig.weight_decay)
    p.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=RunConfig.widths)
    p.add_argument("--num-factors", type=int, default=RunConfig.num_factors)
    p.add_argument("--train-samples", type=int, default=RunConfig.train_samples)
    p.add_argument("--eval-samples", type=int, default=RunConfig.eval_samples)
    p.add_argument("--init-scale", type=float, default=RunConfig.init_scale)
    p.add_argument("--tau-init", type=float, default=RunConfig.tau_init)
    p.add_argument("--fixed-tau", action="store_true", help="freeze the temperature at --tau-init")
    p.add_argument("--full-rank-form", action="store_true", help="full V(x) instead of the parameter-efficient form")
    p.add_argument("--test-size", type=int, default=600)
    p.add_argument("--split-seed", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[0],
                   help="train/test split seed(s); with several, (split, seed) is the pairing unit")
    p.add_argument("--title", default="")
    p.add_argument("--out", default="bench/results/evidence_supervised.md")
    p.add_argument("--json", default="bench/results/evidence_supervised.json")
    p.add_argument("--figure", default=None,
                   help="PNG path; default: beside --out with the same stem, .png ('' = no figure)")
    p.add_argument("--from-json", action="store_true",
                   help="re-write the report (and figure) from --json without training")
    args = p.parse_args(argv)
    figure = os.path.splitext(args.out)[0] + ".png" if args.figure is None else args.figure
    if figure:
        require_matplotlib(figure)  # before the runs, not after
    if args.from_json:
        with open(args.json) as f:
            report = json.load(f)
        report["args"]["json"] = args.json
        if "ref_conf_hard" not in report["data"]:  # deterministic in the recorded arguments: derive it
            a = report["args"]
            split = a.get("split_seed", 0)
            report["data"].update(noise_setup(a.get("test_size", 600), split[0] if isinstance(split, list) else split,
                                              a.get("hard_rule", "partner"), a["hard_fraction"])[-1])
    else:
        bad = [a for a in args.arms if a not in ARMS]
        if bad or not args.arms:
            p.error(f"--arms: {bad or 'empty'} not in {ARMS}")
        if args.seeds < 1 or not args.steps or min(args.steps) < 1:
            p.error("--seeds and --steps must be >= 1")
        if not args.flip_probs or not all(0.0 <= v <= 1.0 for v in args.flip_probs):
            p.error(f"--flip-probs {args.flip_probs}: each must lie in [0, 1]")
        if not 0.0 < args.hard_fraction <= 1.0:
            p.error(f"--hard-fraction {args.hard_fraction} must lie in (0, 1]")
        cfg = RunConfig(widths=args.widths, steps=args.steps[0], batch_size=args.batch_size, lr=args.lr,
                        weight_decay=args.weight_decay, num_factors=args.num_factors,
                        train_samples=args.train_samples, eval_samples=args.eval_samples,
                        init_scale=args.init_scale, tau_init=args.tau_init, learn_tau=not args.fixed_tau,
                        param_efficient=not args.full_rank_form)
        from hetclip.xla import cpu_description

        load_start = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
        report = run_all(args, cfg, log=lambda s: print(s, flush=True))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        report.update({
            "cpu_seconds": usage.ru_utime + usage.ru_stime,  # this process: what a quiet machine needs
            "args": {k: v for k, v in vars(args).items() if k not in ("from_json",)},
            "config": {**dataclasses.asdict(cfg), "steps": args.steps},
            "command": shlex.join(["python", "bench/evidence_supervised.py"] +
                                  list(argv if argv is not None else sys.argv[1:])),
            "machine": cpu_description(),
            "load_start": " ".join(load_start) if isinstance(load_start, list) else load_start,
            "load_end": " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?",
            "interpretation": "",  # written by hand into the JSON after looking at a run, never generated
        })
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    report["figure"] = ""
    if figure:
        plot(report, figure)
        report["figure"] = os.path.relpath(figure, os.path.dirname(os.path.abspath(args.out)))
    text = render(report)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
