"""The contrastive comparison without the training limit (LiT): a locked image tower pretrained on clean
captions, then a text tower from scratch + temperature + (HET-XL arm) a new head, DET vs HET-XL, trained on
captions with input-dependent noise. Writes a markdown report, the JSON with every per-seed number and a
figure (``docs/RESULTS_lit.md`` collects the recorded reports).

    python bench/evidence_lit.py [--pretrained EXPORT_DIR] [--seeds 5] [--steps 1000] [--noise 0,0.4]
        [--noise-rule color_partner] [--image-tower locked] [--jobs 2] [--root DIR] [--out bench/results/evidence_lit.md]
        [--json bench/results/evidence_lit.json] [--figure bench/results/evidence_lit.png]

1. Pretraining (skipped with ``--pretrained``): the README's main job (``--config demo``, DET, clean demo
   data, 900 steps), exported to Hugging Face format.
2. Per noise level: the demo data regenerated with that caption noise (``--noise-rule``: ``color_partner``
   puts it on warm-coloured objects, always naming the look-alike shape; ``hard`` on small or faint objects,
   a random wrong word), the same images and the clean held-out evaluation split as the pretraining.
3. Per seed and arm: ``--config demo`` (DET) or ``demo:het`` (HET-XL) with ``init_from_hf`` = the export,
   ``init_from_hf_groups=image``, ``freeze.image`` (``--image-tower unlocked``: the image tower is trained
   too, so it can fit the noisy captions), the pretrained tokenizer. Both arms of a seed see the same
   batches and the same initialisation of the shared parameters.
4. Zero-shot on the clean held-out split (shape, colour, shape+colour; deterministic, and MC-averaged for
   HET-XL), and shape on the two halves of it the noise rule separates (for ``color_partner``: warm vs the
   other colours), from the final checkpoint.

Statistics: mean ± std over seeds, paired 95 % t-interval of HET-XL − DET per noise level. Runs that
finished (``summary.json`` beside an identical ``command.json``) are reused, so an interrupted table
continues where it stopped.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

from _common import REPO, machine, mean_std, paired_interval, require_matplotlib, verdict

ARMS = {"DET": "demo", "HET-XL": "demo:het"}
TASKS = ("shape", "color", "shape_color")
METRICS = (("top1", True), ("nll", False), ("ece", False))  # (name, higher is better)


# ---------------------------------------------------------------------------------------------
# Runs


def _train_cmd(recipe: str, workdir: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "hetclip.train", "--config", recipe, "--workdir", workdir, "--no-progress",
            *overrides]


def finished(cmd: list[str], workdir: str) -> dict | None:
    """``{"summary", "seconds", "reused": True}`` if ``cmd`` ran to the end in ``workdir`` before, else None;
    a directory holding anything else is refused (nothing in it is overwritten)."""
    stamp, summary_path = os.path.join(workdir, "command.json"), os.path.join(workdir, "summary.json")
    if os.path.isfile(summary_path) and os.path.isfile(stamp):
        with open(stamp) as f:
            old = json.load(f)
        if old.get("command") == cmd[1:]:  # the interpreter's path is not part of what was run
            with open(summary_path) as f:
                return {"summary": json.load(f), "seconds": old.get("seconds"), "reused": True}
    if os.path.exists(workdir):
        raise SystemExit(f"{workdir} holds an unfinished or different run; remove it or use another --root")
    return None


def run_logged(cmd: list[str], workdir: str) -> dict:
    """Run a training command into ``workdir`` (its log beside it) unless the same command finished there
    before; returns ``{"summary", "seconds", "reused"}``."""
    done = finished(cmd, workdir)
    if done:
        return done
    os.makedirs(workdir)
    t0 = time.perf_counter()
    with open(workdir + ".log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        with open(workdir + ".log") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {proc.returncode}); log {workdir}.log:\n{tail}")
    with open(os.path.join(workdir, "command.json"), "w") as f:
        json.dump({"command": cmd[1:], "seconds": seconds}, f)
    with open(os.path.join(workdir, "summary.json")) as f:
        return {"summary": json.load(f), "seconds": seconds, "reused": False}


def pretrain(args) -> tuple[str, dict]:
    """The export directory of the clean DET model, and what is known of it."""
    if args.pretrained:
        export = os.path.abspath(args.pretrained)
        pre = {"export": export, "made_here": False}
        run_summary = os.path.join(os.path.dirname(export), "summary.json")  # an export inside its run
        if os.path.isfile(run_summary):
            with open(run_summary) as f:
                s = json.load(f)
            pre.update(steps=s.get("step"), eval=_numbers(s.get("eval", {})))
        return export, pre
    work = os.path.join(args.root, "pretrain")
    overrides = [f"--config.demo.dir={os.path.join(args.root, 'data_clean')}", *demo_overrides(args.demo), *args.set,
                 f"--config.total_steps={args.pretrain_steps}", "--config.checkpoint.every_steps=0"]
    if args.pretrain_steps <= 50:  # shorter than the main job's warm-up (smoke tests)
        overrides.append(f"--config.optim.warmup_steps={args.pretrain_steps // 2}")
    got = run_logged(_train_cmd("demo", work, overrides), work)
    export = got["summary"].get("export", {}).get("dir") or os.path.join(work, "export_hf")
    return export, {"export": export, "made_here": True, "steps": args.pretrain_steps, "seconds": got["seconds"],
                    "eval": _numbers(got["summary"]["eval"])}


def demo_overrides(pairs: list[str]) -> list[str]:
    return [f"--config.demo.params.{p}" for p in pairs]


def demo_params(pairs: list[str]) -> dict:
    """``--demo KEY=VALUE`` pairs as demo generator parameters (Python literals, else strings)."""
    out = {}
    for pair in pairs:
        key, raw = pair.split("=", 1)
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def run_dir(args, noise: float, arm: str, seed: int) -> str:
    table = f"{args.noise_rule}_{noise:g}" + ("_unlocked" if args.image_tower == "unlocked" else "")
    samples = f"_S{args.het_samples}" if arm == "HET-XL" and args.het_samples else ""
    return os.path.join(args.root, table, f"{arm}{samples}_s{seed}")


def lit_overrides(args, arm: str, export: str, data_dir: str, noise: float, seed: int) -> list[str]:
    het = [f"--config.model.het.mc_samples={args.het_samples}"] if arm == "HET-XL" and args.het_samples else []
    return [*het, f"--config.init_from_hf={export}", "--config.init_from_hf_groups=image",
            f"--config.freeze.image={args.image_tower == 'locked'}",
            f"--config.data.tokenizer.path={export}", f"--config.demo.dir={data_dir}",
            f"--config.demo.params.noise_rule={args.noise_rule}", f"--config.demo.params.noise_prob={noise}",
            *demo_overrides(args.demo), *args.set, f"--config.total_steps={args.steps}", f"--config.seed={seed}",
            f"--config.optim.warmup_steps={args.warmup}", "--config.checkpoint.every_steps=0",
            "--config.export.format="]


def _numbers(ev: dict) -> dict:
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float))} for task, res in ev.items()}


# ---------------------------------------------------------------------------------------------
# The two halves of the evaluation split the noise rule separates


def split_views(data_dir: str, rule: str, out_root: str) -> dict[str, str]:
    """Class-folder views (symlinks) of the shape task: the images the rule selects for noise and the rest."""
    from hetclip.data import demo

    src = os.path.join(data_dir, "eval", "shape")
    with open(os.path.join(src, "meta.jsonl")) as f:
        metas = [json.loads(line) for line in f if line.strip()]

    views = {}
    for name, keep in (("noisy_half", True), ("clean_half", False)):
        root = os.path.join(out_root, f"{rule}_{name}")
        if not os.path.isdir(root):
            tmp = root + ".tmp"
            for cls in os.listdir(src):  # every class folder, even one this half has no image of
                if os.path.isdir(os.path.join(src, cls)):
                    os.makedirs(os.path.join(tmp, cls))
            for m in metas:
                if demo.noise_selected(rule, m["color"], m["hard_shape"], m["hard_color"]) == keep:
                    dst = os.path.join(tmp, m["path"])
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    os.symlink(os.path.join(src, m["path"]), dst)
            for f in ("classnames.txt", "templates.txt"):
                os.symlink(os.path.join(src, f), os.path.join(tmp, f))
            os.rename(tmp, root)
        views[name] = root
    return views


def eval_views(workdir: str, views: dict[str, str], mc_samples: int) -> dict:
    from hetclip.zero_shot.evaluate import load_model, run_zero_shot

    m = load_model(workdir)
    out = {}
    for name, root in views.items():
        res = run_zero_shot(m["encoders"], m["tokenizer"], root, classnames=os.path.join(root, "classnames.txt"),
                            templates=os.path.join(root, "templates.txt"), image_size=m["image_size"],
                            batch_size=256, mc_samples=mc_samples, workers=0)
        out[name] = {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}
    return out


# ---------------------------------------------------------------------------------------------
# Report


def values(runs: list[dict], task: str, metric: str) -> list[float]:
    return [r["eval"][task][metric] for r in runs]


def comparisons(report: dict) -> list[dict]:
    """Every (noise, where, metric) row: DET and HET-XL mean ± std and the paired interval."""
    rows = []
    for noise, by_arm in report["runs"].items():
        det, het = by_arm["DET"], by_arm["HET-XL"]
        for task in (*TASKS, "noisy_half", "clean_half"):
            for metric, higher in METRICS:
                for mc in (False, True):
                    key = f"mc_{metric}" if mc else metric
                    if task not in het[0]["eval"] or key not in het[0]["eval"][task]:
                        continue
                    a, b = values(det, task, metric), values(het, task, key)
                    iv = paired_interval(a, b)
                    rows.append({"noise": noise, "task": task, "metric": metric, "mc": mc, "det": a, "het": b,
                                 "interval": iv, "verdict": verdict(iv, higher)})
    return rows


def _fmt_iv(iv: dict) -> str:
    if not math.isfinite(iv["lo"]):
        return f"{iv['mean']:+.4f}"
    return f"{iv['mean']:+.4f} [{iv['lo']:+.4f}, {iv['hi']:+.4f}]"


TASK_NAMES = {"shape": "shape", "color": "colour", "shape_color": "shape+colour",
              "noisy_half": "shape, noisy half", "clean_half": "shape, clean half"}


def _timing(report: dict) -> str:
    secs = [r["seconds"] for by_arm in report["runs"].values() for rs in by_arm.values() for r in rs]
    per_arm = {arm: statistics.mean(r["seconds"] for by_arm in report["runs"].values() for r in by_arm[arm])
               for arm in ARMS}
    return (f"{len(secs)} training runs of {sum(secs) / 60:.0f} min in all, {report['args']['jobs']} at a time "
            f"(mean per run: " + ", ".join(f"{arm} {s / 60:.1f} min" for arm, s in per_arm.items())
            + f", evaluation included); this invocation's wall time {report['seconds'] / 60:.1f} min.")


def _eval_sizes(report: dict) -> dict:
    first = next(iter(report["runs"].values()))["DET"][0]["eval"]
    return {t: int(first[t]["num_images"]) for t in (*TASKS, "noisy_half", "clean_half") if t in first}


def render(report: dict) -> str:
    a = report["args"]
    rows = comparisons(report)
    pre = report["pretrained"]
    tower = a.get("image_tower", "locked")
    lines = [f"# Contrastive evidence on a pretrained image tower ({tower}{', LiT' if tower == 'locked' else ''}): "
             f"DET vs HET-XL, {a['noise_rule']} caption noise", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']['cpu']}; load average at the start {report['machine']['loadavg']}, "
             f"at the end {report['load_end']}. {_timing(report)}", ""]
    lines += ["## Setting", "",
              f"- Image tower: {'the README main job (clean demo data, DET, ' + str(pre.get('steps')) + ' steps)' if pre.get('made_here') else '`' + pre['export'] + '`' + (' (' + str(pre['steps']) + ' steps)' if pre.get('steps') else '')}"
              + (f"; its zero-shot shape top-1 {pre['eval']['shape']['top1']:.4f}, colour "
                 f"{pre['eval']['color']['top1']:.4f}" if pre.get("eval") else "")
              + (". Locked (`freeze.image`)." if a.get("image_tower", "locked") == "locked"
                 else ". **Unlocked**: trained with the rest at the same learning rate."),
              f"- Trained: text tower from scratch, temperature, and for HET-XL a new head ("
              f"{report.get('het_config', {}).get('num_factors', '?')} factors, "
              f"{report.get('het_config', {}).get('mc_samples', '?')} MC samples in training); {a['steps']} steps "
              f"(warm-up {a['warmup']}), batch 128, the demo recipe's optimiser. Seeds {a['seeds']}; within a "
              "seed both arms see the same batches and the same initial text tower.",
              f"- Caption noise rule `{a['noise_rule']}`, probability {', '.join(str(n) for n in report['runs'])} on "
              "the samples it selects (`hetclip.data.demo`); zero-shot on the clean held-out split ("
              + ", ".join(f"{TASK_NAMES[t]} {n} images" for t, n in _eval_sizes(report).items())
              + "), deterministic (mean embedding) and, for HET-XL, MC-averaged (16 samples).",
              f"- Primary metric, named before the runs: {TASK_NAMES[primary(report)[0]]} {primary(report)[1]}, "
              "deterministic.", ""]
    for noise in report["runs"]:
        corrupted = report["data"][noise]
        lines += [f"## Noise probability {noise} ({corrupted['num_corrupted']} of {corrupted['num_samples']} "
                  f"training captions changed)", "",
                  "| task | metric | DET | HET-XL | HET-XL − DET, paired 95 % interval | reading |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            if r["noise"] != noise:
                continue
            name = r["metric"] + (" (MC)" if r["mc"] else "")
            lines.append(f"| {TASK_NAMES[r['task']]} | {name} | {mean_std(r['det'])} | {mean_std(r['het'])} | "
                         f"{_fmt_iv(r['interval'])} | {r['verdict']} |")
        lines.append("")
    lines += ["## What the runs learned (last training window, mean over seeds)", "",
              "| noise | arm | loss | temperature τ | learned noise std per dimension (HET-XL) |", "|---|---|---|---|---|"]
    for noise, by_arm in report["runs"].items():
        for arm, rs in by_arm.items():
            def m(key):
                vals = [r["final_train"][key] for r in rs if key in r["final_train"]]
                return f"{statistics.mean(vals):.4f}" if vals else "–"
            lines.append(f"| {noise} | {arm} | {m('loss')} | {m('temperature')} | {m('het/total_std')} |")
    lines += ["", "(The noise std is in the units of the image embedding before its L2 normalisation; how much the "
              "noise moves a prediction shows in the MC rows above, against the deterministic ones.)", ""]
    lines += ["## Answer", "", answer(report, rows), "",
              "Per-seed numbers, run times and the learned temperatures are in the JSON beside this report."]
    return "\n".join(lines) + "\n"


def primary(report: dict) -> tuple[str, str]:
    task, metric = report["args"].get("primary", "shape:top1").split(":")
    return task, metric


def answer(report: dict, rows: list[dict]) -> str:
    """The primary comparison in words, computed from the rows."""
    out = []
    prim_key = primary(report)
    for noise in report["runs"]:
        prim = [r for r in rows if r["noise"] == noise and (r["task"], r["metric"]) == prim_key and not r["mc"]][0]
        beyond = [f"{TASK_NAMES[r['task']]} {r['metric']}{' (MC)' if r['mc'] else ''}: "
                  f"{r['verdict'].split(' (')[0].strip('*')} {_fmt_iv(r['interval'])}"
                  for r in rows if r["noise"] == noise and "excludes" in r["verdict"]]
        out.append(f"- Noise {noise}: primary ({TASK_NAMES[prim_key[0]]} {prim_key[1]}) HET-XL − DET = {_fmt_iv(prim['interval'])}: "
                   f"{prim['verdict']}. Beyond the interval: " + ("; ".join(beyond) if beyond else "nothing") + ".")
    return "\n".join(out)


def plot(report: dict, path: str) -> None:
    require_matplotlib(path).use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in comparisons(report) if r["task"] in ("shape", "noisy_half", "clean_half")
            and r["metric"] in ("top1", "nll") and not r["mc"]]
    noises = list(report["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("top1", "nll")):
        sel = [r for r in rows if r["metric"] == metric]
        tasks = list(dict.fromkeys(r["task"] for r in sel))
        for j, noise in enumerate(noises):
            for i, task in enumerate(tasks):
                r = [x for x in sel if x["noise"] == noise and x["task"] == task][0]
                x = i + (j - (len(noises) - 1) / 2) * 0.25
                diffs = [h - d for d, h in zip(r["det"], r["het"])]
                ax.scatter([x] * len(diffs), diffs, s=12, color=f"C{j}", alpha=0.6,
                           label=f"noise {noise}" if i == 0 else None)
                iv = r["interval"]
                if math.isfinite(iv["lo"]):
                    ax.errorbar([x], [iv["mean"]], yerr=[[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]],
                                fmt="o", color=f"C{j}", capsize=4)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(tasks)), [TASK_NAMES[t] for t in tasks], fontsize=8)
        ax.set_title(f"HET-XL − DET, {metric} ({'higher' if metric == 'top1' else 'lower'} is better)")
        ax.legend(fontsize=8)
    tower = report["args"].get("image_tower", "locked")
    fig.suptitle(f"Demo data, pretrained image tower {tower}{' (LiT)' if tower == 'locked' else ''}, "
                 f"{report['args']['noise_rule']} caption noise: per-seed differences and paired 95 % intervals",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------


def write_report(report: dict, out: str, figure: str) -> None:
    with open(out, "w") as f:
        f.write(render(report))
    if figure:
        plot(report, figure)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="", help="an HF export of the clean image tower (default: train it)")
    ap.add_argument("--pretrain-steps", type=int, default=900, help="steps of the pretraining (the main job's)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed ... first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--noise", type=_floats, default=[0.0, 0.4], help="comma list of caption noise probabilities")
    ap.add_argument("--noise-rule", default="color_partner", choices=["color_partner", "hard"])
    ap.add_argument("--image-tower", default="locked", choices=["locked", "unlocked"],
                    help="locked: LiT; unlocked: the pretrained image tower is trained too (it can fit the noise)")
    ap.add_argument("--primary", default="shape:top1", choices=[f"{t}:{m}" for t in TASK_NAMES for m, _ in METRICS],
                    help="the primary comparison, named before the runs (TASK:METRIC)")
    ap.add_argument("--het-samples", type=int, default=0,
                    help="HET-XL's MC samples in training (default: the demo:het recipe's)")
    ap.add_argument("--demo", action="append", default=[], metavar="KEY=VALUE",
                    help="a demo data parameter for every data set (e.g. num_train=4000); repeatable")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=lambda kv: f"--config.{kv}",
                    help="a training config override for the pretraining and every run (e.g. optim.lr=1e-3); "
                         "repeatable")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    ap.add_argument("--root", default=os.path.join(REPO, "runs", "evidence_lit"), help="data and run directories")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "evidence_lit.md"))
    ap.add_argument("--json", default=os.path.join(REPO, "bench", "results", "evidence_lit.json"))
    ap.add_argument("--figure", default=None, help="PNG path (default: --out with .png; '' for none)")
    ap.add_argument("--from-json", action="store_true", help="only write the report and figure from --json")
    args = ap.parse_args(argv)
    figure = os.path.splitext(args.out)[0] + ".png" if args.figure is None else args.figure
    if figure:
        require_matplotlib(figure)
    if args.from_json:
        with open(args.json) as f:
            report = json.load(f)
        write_report(report, args.out, figure)
        return 0
    if args.seeds < 1 or args.steps <= args.warmup or not args.noise:
        ap.error("need --seeds >= 1, --steps > --warmup and at least one --noise level")
    for flag, pairs in (("--demo", args.demo), ("--set", [kv[len("--config."):] for kv in args.set])):
        for pair in pairs:
            if "=" not in pair:
                ap.error(f"{flag} {pair!r}: expected KEY=VALUE")
    args.root = os.path.abspath(args.root)
    os.makedirs(args.root, exist_ok=True)
    start, load_start = time.perf_counter(), machine()
    export, pre = pretrain(args)
    print(f"pretrained image tower: {export}", flush=True)

    from hetclip.data import demo

    report = {"command": "python bench/evidence_lit.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": load_start, "args": {**vars(args), "noise": args.noise}, "pretrained": pre,
              "runs": {}, "data": {}}
    jobs = []
    for noise in args.noise:
        data_dir = os.path.join(args.root, f"data_{args.noise_rule}_{noise:g}")
        paths = demo.ensure_demo(data_dir, workers=2, **demo_params(args.demo), noise_rule=args.noise_rule,
                                 noise_prob=noise)
        train_info = demo.read_manifest(paths.root)["train"]
        report["data"][f"{noise:g}"] = {k: train_info[k] for k in ("num_samples", "num_corrupted")}
        views = split_views(paths.root, args.noise_rule, os.path.join(args.root, "views"))
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for arm, recipe in ARMS.items():
                work = run_dir(args, noise, arm, seed)
                cmd = _train_cmd(recipe, work, lit_overrides(args, arm, export, paths.root, noise, seed))
                jobs.append((f"{noise:g}", arm, seed, cmd, work, views))

    for job in jobs:  # refuse a directory in the way before any run starts
        finished(job[3], job[4])

    def one(job):
        noise, arm, seed, cmd, work, views = job
        got = run_logged(cmd, work)
        took = "reused" if got["reused"] else f"{got['seconds']:.0f} s"
        print(f"noise {noise} {arm} seed {seed}: shape top1 {got['summary']['eval']['shape']['top1']:.4f} ({took})",
              flush=True)
        return got

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(one, jobs))
    for (noise, arm, seed, cmd, work, views), got in zip(jobs, done):
        ev = _numbers(got["summary"]["eval"])
        ev.update(eval_views(work, views, mc_samples=16 if arm == "HET-XL" else 0))
        with open(os.path.join(work, "metrics.jsonl")) as f:
            last = [m for m in map(json.loads, filter(str.strip, f)) if "loss" in m][-1]  # last training window
        report["runs"].setdefault(noise, {}).setdefault(arm, []).append(
            {"seed": seed, "eval": ev, "seconds": got["seconds"], "final_train": last})
    het_run = [job[4] for job in jobs if job[1] == "HET-XL"][0]
    with open(os.path.join(het_run, "config.json")) as f:
        report["het_config"] = json.load(f)["model"]["het"]
    report["seconds"] = time.perf_counter() - start
    report["load_end"] = machine()["loadavg"]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    write_report(report, args.out, figure)
    print(answer(report, comparisons(report)))
    print(f"wrote {args.out}, {args.json}" + (f", {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
