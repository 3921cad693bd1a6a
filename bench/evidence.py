"""The contrastive comparison at a scale this machine can run: writes a markdown report (default
``bench/results/evidence.md``; ``docs/RESULTS_contrastive.md`` collects the recorded ones), the JSON and a PNG
figure beside the report.

    python bench/evidence.py [--seeds 3] [--steps 400] [--noise 0.5] [--noise-easy 0] [--quick]

1. DET vs HET-XL (learned temperature) on the demo data with **input-dependent caption noise**
   (small / low-contrast objects get a wrong shape or colour word with probability ``--noise``),
   several seeds each; zero-shot accuracy, NLL and ECE on the clean held-out split.
2. HET-XL with a learned temperature vs fixed temperatures (``freeze.temperature``).
3. DET / HET / HET-XL parameter counts at the paper's scales (JFT-4B, ImageNet-21k).

Every number in the report comes from runs made by this script; nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

from _common import require_matplotlib

TASKS = ("shape", "color", "shape_color")
METRICS = ("top1", "nll", "ece")


def run(recipe: str, overrides: list[str], workdir: str) -> dict:
    from hetclip import config as config_lib
    from hetclip import train as train_lib

    cfg = config_lib.apply_overrides(config_lib.load_config(recipe), overrides)
    summary = train_lib.train(cfg, workdir, progress=False)
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float))} for task, res in summary["eval"].items()}


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: dict[str, list[dict]], keys: list[tuple[str, str]]) -> str:
    head = "| model | " + " | ".join(f"{task} {m}" for task, m in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for name, results in rows.items():
        cells = [mean_spread([r[task][m] for r in results]) for task, m in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CHANCE = {"shape": 1 / 8, "color": 1 / 8, "shape_color": 1 / 64}


def reading(results: dict[str, list[dict]]) -> str:
    """What the DET vs HET-XL numbers say, computed from them (differences against the seed spread)."""
    if "DET" not in results or "HET-XL" not in results:
        return "(needs both DET and HET-XL runs)"
    lines = []
    for task in TASKS:
        det = [r[task]["top1"] for r in results["DET"]]
        lines.append(f"- {task}: DET top1 {statistics.mean(det):.3f} vs chance {CHANCE[task]:.3f}"
                     + (" (at most 1.5x chance: this task was not learned, so it cannot separate the methods)"
                        if statistics.mean(det) < 1.5 * CHANCE[task] else ""))
        for m in METRICS:
            a = [r[task][m] for r in results["DET"]]
            b = [r[task][m] for r in results["HET-XL"]]
            diff = statistics.mean(b) - statistics.mean(a)
            spread = max(statistics.stdev(a) if len(a) > 1 else 0.0, statistics.stdev(b) if len(b) > 1 else 0.0)
            verdict = ("no spread to compare with (one seed)" if spread == 0 else
                       "beyond" if abs(diff) > spread else "within")
            better = (diff > 0) if m == "top1" else (diff < 0)
            lines.append(f"  - {m}: HET-XL - DET = {diff:+.3f} ({'better' if better else 'worse'} for HET-XL), "
                         f"{verdict}{' one seed standard deviation' if spread else ''} ({spread:.3f})")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: str, title: str) -> None:
    """Zero-shot top-1 and NLL per task, DET vs HET-XL (mean ± std over seeds) and the fixed-τ runs."""
    matplotlib = require_matplotlib(path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n in ("DET", "HET-XL")] + [n for n in results if n not in ("DET", "HET-XL")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(names)
    for ax, m in zip(axes, ("top1", "nll")):
        for i, name in enumerate(names):
            vals = [[r[t][m] for r in results[name]] for t in TASKS]
            mu = [statistics.mean(v) for v in vals]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(TASKS))]
            ax.bar(xs, mu, width, yerr=sd, capsize=3, label=f"{name} ({len(results[name])} seed(s))")
        ax.set_xticks(range(len(TASKS)), TASKS)
        ax.set_title(f"zero-shot {m} (clean held-out)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def params_section() -> str:
    from hetclip.params import SCALES, extra_ratio, head_table

    out = []
    for name in ("jft4b", "imagenet21k"):
        s = SCALES[name]
        out.append(f"**{name}** (K={s['num_classes']:,}, D={s['dim']:,}, R={s['num_factors']}, "
                   f"{'parameter-efficient' if s['param_efficient'] else 'full'} V(x)), "
                   f"command: `hetclip-params --scale {name}`\n")
        out.append("```\n" + head_table(**s) + "\n```")
        out.append(f"\nHET extra / HET-XL extra = **{extra_ratio(**s):.2f}×**\n")
    return "\n".join(out)


def _machine() -> str:
    from hetclip.towers import compute_dtype
    from hetclip.xla import cpu_description

    return f"{cpu_description()}; demo dtype 'auto' = {compute_dtype('auto').__name__}"


def train_all(args) -> dict[str, list[dict]]:
    common = [f"total_steps={args.steps}", f"demo.dir={args.demo_dir}", f"demo.params.noise_prob={args.noise}",
              f"demo.params.noise_prob_easy={args.noise_easy}",
              "export.format=", "checkpoint.every_steps=0", "tensorboard=false",
              f"optim.warmup_steps={max(1, args.steps // 12)}"]
    results: dict[str, list[dict]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as root:
        def go(name, recipe, extra, seed):
            work = os.path.join(root, f"{name.replace(' ', '_')}_{seed}")
            res = run(recipe, common + [f"seed={seed}"] + extra, work)
            results.setdefault(name, []).append(res)
            print(f"[{time.time() - t0:.0f}s] {name} seed {seed}: " +
                  ", ".join(f"{t} top1 {res[t]['top1']:.3f}" for t in TASKS), flush=True)

        for seed in range(args.seeds):
            go("DET", "demo", [], seed)
            go("HET-XL", "demo:het", [], seed)  # the recipe evaluates with 16 samples
        for tau in [float(t) for t in args.fixed_temperatures.split(",") if t]:
            go(f"HET-XL fixed τ={tau:g}", "demo:het", ["freeze.temperature=true", f"model.temperature.init={tau}"], 0)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--noise", type=float, default=0.5, help="caption corruption probability for hard samples")
    p.add_argument("--noise-easy", type=float, default=0.0,
                   help="caption corruption probability for the other (easy) samples")
    p.add_argument("--fixed-temperatures", default="0.03,0.1,0.3")
    p.add_argument("--quick", action="store_true", help="1 seed, 60 steps (a smoke run, not evidence)")
    p.add_argument("--out", default="bench/results/evidence.md")
    p.add_argument("--figure", default=None,
                   help="PNG path; default: beside --out with the same stem, .png ('' = no figure)")
    p.add_argument("--json", default="bench/results/evidence.json")
    p.add_argument("--from-json", action="store_true",
                   help="re-write the report from --json without training (the command line stays the one recorded)")
    p.add_argument("--demo-dir", default=os.path.join(tempfile.gettempdir(), "hetclip_evidence_demo"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 60
    figure = os.path.splitext(args.out)[0] + ".png" if args.figure is None else args.figure
    if figure:
        require_matplotlib(figure)  # before an hour of training, not after
    if args.from_json:
        with open(args.json) as f:
            saved = json.load(f)
        results, cmd = saved["results"], saved.get("command", "python bench/evidence.py")
        machine = saved.get("machine", "not recorded")
        interpretation = saved.get("interpretation", "")
        for k in ("seeds", "steps", "noise"):
            setattr(args, k, saved["args"][k])
        args.noise_easy = saved["args"].get("noise_easy", 0.0)  # absent: no noise on easy samples
    else:
        results = train_all(args)
        machine = _machine()
        interpretation = ""  # written by hand into the JSON after looking at a run, never generated
        cmd = shlex.join(["python", "bench/evidence.py"] + list(argv if argv is not None else sys.argv[1:]))
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "command": cmd, "machine": machine, "results": results}, f, indent=2)
    if figure:
        plot(results, figure, f"demo, caption noise {args.noise} (hard) / {args.noise_easy} (easy), "
                              f"{args.steps} steps; mean ± std over seeds")
    main_keys = [(t, m) for t in TASKS for m in METRICS]
    mc_keys = [(t, f"mc_{m}") for t in TASKS for m in METRICS]
    het_only = {k: v for k, v in results.items() if k.startswith("HET-XL") and "mc_top1" in v[0]["shape"]}
    sweep = {k: v for k, v in results.items() if k.startswith("HET-XL")}
    text = [
        "# Contrastive DET vs HET-XL at small scale (demo data)",
        "",
        f"Produced by `bench/evidence.py`; raw numbers in `{args.json}`. "
        f"Command: `{cmd}` ({args.seeds} seed(s), {args.steps} steps of the `demo` recipe, "
        f"caption noise {args.noise} on hard samples, {args.noise_easy} on the others). Mean ± standard deviation over seeds. "
        f"Machine: {machine}.",
        "",
        "## DET vs HET-XL (learned temperature), deterministic prediction (mean embedding)",
        "",
        table({k: v for k, v in results.items() if k in ("DET", "HET-XL")}, main_keys),
        "",
        "## HET-XL, MC-averaged predictive (16 samples)",
        "",
        table(het_only, mc_keys) if het_only else "(no HET-XL runs)",
        "",
        "## HET-XL: learned vs fixed temperature (seed 0 for the fixed ones)",
        "",
        table(sweep, [(t, "top1") for t in TASKS] + [("shape", "nll"), ("shape", "ece")]),
        "",
    ] + ([f"![zero-shot top-1 and NLL, DET vs HET-XL]"
           f"({os.path.relpath(figure, os.path.dirname(os.path.abspath(args.out)))})", ""] if figure else []) + [
        "## Reading these numbers (computed from the table above)",
        "",
        reading(results),
        "",
    ] + (["**Interpretation** (written by hand for this recorded run, stored in the JSON): " + interpretation, ""]
         if interpretation else []) + [
        "## Parameter counts at the paper's scales",
        "",
        params_section(),
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    from hetclip.allocator import reexec_with_mimalloc

    reexec_with_mimalloc()  # train as hetclip-train does (glibc's allocator makes XLA's steps much slower)
    main()
