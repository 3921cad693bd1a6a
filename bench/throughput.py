"""Training and inference throughput of hetclip vs open_clip, measured side by side, interleaved.

    python bench/throughput.py --openclip-python ../ocvenv/bin/python [--quick] [--cases tiny,B/32]

Each framework runs in its own persistent subprocess (compilation / warm-up is paid once per
variant); the driver alternates short timed blocks of every variant of a case for several rounds,
so load from other processes on a shared machine hits all variants alike. Every block starts with
untimed steps (``--block-warmup``, default 1: the first step after a worker sat idle can be much
slower on a VM, see bench/README.md). A case is a ``hetclip.model`` preset: both sides build its
architecture (open_clip's ``CLIP`` from the preset's dimensions, sent to its worker by the driver;
parameter counts are asserted equal), the same batch, resolution and precision (fp32, or bf16 =
``torch.autocast(cpu, bfloat16)`` vs hetclip ``dtype='bfloat16'``: bf16 matmul inputs, fp32
parameters/accumulation),
the same loss (CLIP softmax), AdamW with global-norm clipping 1.0, and the same thread count.
hetclip trains with ``hetclip.step.make_train_step`` on a 1-device mesh (donated state) and infers
through ``hetclip.model.Encoders``. HET-XL variants (S MC samples) run on hetclip only.

Writes ``<out>.json`` and ``<out>.md`` (default ``bench/results/throughput``): samples/s, step-time
median and IQR, achieved GFLOP/s (analytic matmul FLOPs, train = 3x forward), the hetclip/open_clip
throughput ratio and the HET-XL/DET step-time ratios. Installs nothing; see bench/README.md for the
open_clip environment.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import REPO, RESULTS, timed

BATCH = {"tiny": 64}  # default batch per preset; the others use DEFAULT_BATCH
DEFAULT_BATCH = 32


def arch(model: str) -> dict:
    """The dimensions of ``hetclip.model.preset(model)`` both workers build from (the open_clip worker
    runs without hetclip, so the driver sends them), plus the case's default batch."""
    from hetclip.model import preset

    c = preset(model)
    v, t = c.vision, c.text
    if v.activation != t.activation:
        raise ValueError(f"preset {model!r}: open_clip's CLIP has one activation for both towers, the preset has "
                         f"{v.activation!r} (vision) and {t.activation!r} (text)")
    return dict(embed=c.embed_dim, vw=v.width, vl=v.layers, vh=v.heads, patch=v.patch_size, image=v.image_size,
                tw=t.width, tl=t.layers, th=t.heads, vocab=t.vocab_size, ctx=t.context_length, eos=t.eos_token_id,
                act=v.activation, batch=BATCH.get(model, DEFAULT_BATCH))


def forward_flops(a: dict, mode: str) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sample's forward pass through the given tower(s)."""
    def tower(w, layers, t):
        return layers * (24 * t * w * w + 4 * t * t * w)

    n_patch = (a["image"] // a["patch"]) ** 2
    img = 2 * n_patch * a["patch"] ** 2 * 3 * a["vw"] + tower(a["vw"], a["vl"], n_patch + 1) + 2 * a["vw"] * a["embed"]
    txt = tower(a["tw"], a["tl"], a["ctx"]) + 2 * a["tw"] * a["embed"]
    return {"image": img, "text": txt, "train": img + txt}[mode]


# ------------------------------------------------------------------------------------------------
# Workers: read one JSON command per line on stdin, answer one JSON line on stdout.


def _serve(handlers: dict) -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            reply = handlers[msg["op"]](msg)
        except Exception as e:  # noqa: BLE001 - reported to the driver
            import traceback

            reply = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if msg["op"] == "quit":
            return


def hetclip_model_cfg(spec: dict):
    """The hetclip preset of a benchmark spec (model, dtype, het)."""
    from hetclip.model import preset

    over = dict(dtype=spec["dtype"])
    if spec["het"]:
        over["het"] = {"enabled": True, "mc_samples": spec["het"]}
    return preset(spec["model"], **over)


def hetclip_inputs(spec: dict):
    """Random images ``[b, H, W, 3]`` and token ids ``[b, ctx]`` (one EOS per row) for a spec."""
    import numpy as np

    a = spec["arch"]
    b = spec["batch"]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((b, a["image"], a["image"], 3), dtype=np.float32)
    tokens = rng.integers(1, a["vocab"] - 1, (b, a["ctx"]), dtype=np.int32)
    tokens[np.arange(b), rng.integers(5, a["ctx"], b)] = a["eos"]
    return images, tokens


def hetclip_train_parts(spec: dict, cfg, params, images, tokens):
    """What the benchmark's training step is made of: ``(jitted step, state, device batch)``.

    The step is ``hetclip.step.make_train_step`` on a 1-device mesh with the base recipe's optimizer,
    jitted with the state donated; call it as ``step(state, batch, key)``."""
    import jax
    import jax.numpy as jnp

    from hetclip import distributed as dist
    from hetclip.configs import _base
    from hetclip.optim import make_optimizer
    from hetclip.step import make_train_step

    run_cfg = _base.base_config(spec["model"])
    run_cfg.optim.warmup_steps = 10
    mesh = dist.make_mesh(1, 1, devices=jax.devices()[:1])
    optimizer, _ = make_optimizer(run_cfg, params, 1000)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    step_fn = jax.jit(make_train_step(cfg, optimizer, mesh), donate_argnums=(0,))
    batch = dist.global_batch({"image": images, "text": tokens}, mesh)
    return step_fn, state, batch


def hetclip_worker(threads: int, xla_config: bool) -> None:
    # What hetclip's console scripts do (HETCLIP_ALLOCATOR=system measures glibc's allocator instead).
    from hetclip.allocator import loaded_allocator, reexec_with_mimalloc

    reexec_with_mimalloc()
    if xla_config:
        from hetclip.xla import configure_cpu_flags

        configure_cpu_flags()
    import jax
    import numpy as np

    from hetclip.model import Encoders, count_params, init_params

    jax.config.update("jax_platforms", "cpu")
    variants = {}

    def setup(msg):
        spec = msg["spec"]
        cfg = hetclip_model_cfg(spec)
        images, tokens = hetclip_inputs(spec)
        params = init_params(cfg, jax.random.key(0))
        n_params = count_params({k: v for k, v in params.items() if k != "het_head"})
        n_head = count_params(params.get("het_head", {}))
        t0 = time.perf_counter()
        if spec["mode"] == "train":
            step_fn, state, batch = hetclip_train_parts(spec, cfg, params, images, tokens)
            holder = {"state": state, "i": 0}
            key = jax.random.key(1)

            def run():
                holder["state"], metrics = step_fn(holder["state"], batch, jax.random.fold_in(key, holder["i"]))
                holder["i"] += 1
                loss = float(metrics["loss"])  # the training loop reads metrics every step too
                if not np.isfinite(loss):
                    raise FloatingPointError("non-finite loss")
        else:
            enc = Encoders(cfg, params)
            if spec["mode"] == "image":
                def run():
                    jax.block_until_ready(enc.image_embeddings(images))
            else:
                def run():
                    jax.block_until_ready(enc.text_embeddings(tokens))
        # 3 calls: the 2nd can recompile once the donated state comes back with the step's shardings
        warm = timed(run, 3)
        variants[msg["id"]] = run
        return {"params": n_params, "head_params": n_head, "first_s": time.perf_counter() - t0, "warm": warm[-1],
                "devices": len(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def run(msg):
        return {"times": timed(variants[msg["id"]], msg["n"])}

    def free(msg):
        variants.pop(msg["id"], None)
        import gc

        gc.collect()
        return {"ok": True}

    _serve({"setup": setup, "run": run, "free": free, "quit": lambda m: {"ok": True},
            "info": lambda m: {"jax": jax.__version__, "backend": jax.default_backend(),
                                           "xla_flags": os.environ.get("XLA_FLAGS", ""),
                                           "hetclip_allocator": loaded_allocator()}})


def openclip_worker(threads: int) -> None:
    import torch

    # torchvision's meta registrations need its compiled ops; open_clip only uses its transforms.
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
    import open_clip
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    variants = {}

    def build(a):
        return open_clip.CLIP(
            embed_dim=a["embed"],
            vision_cfg=dict(layers=a["vl"], width=a["vw"], head_width=a["vw"] // a["vh"], patch_size=a["patch"],
                            image_size=a["image"], mlp_ratio=4.0),
            text_cfg=dict(context_length=a["ctx"], vocab_size=a["vocab"], width=a["tw"], heads=a["th"],
                          layers=a["tl"], mlp_ratio=4.0),
            quick_gelu=a["act"] == "quick_gelu")

    def setup(msg):
        spec = msg["spec"]
        if spec["het"]:
            raise ValueError("open_clip has no HET-XL head")
        a = spec["arch"]
        b = spec["batch"]
        torch.manual_seed(0)
        model = build(a)
        n_params = sum(p.numel() for p in model.parameters())
        images = torch.randn(b, 3, a["image"], a["image"])
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(1, a["vocab"] - 1, (b, a["ctx"]), generator=g)
        tokens[torch.arange(b), torch.randint(5, a["ctx"], (b,), generator=g)] = a["eos"]
        bf16 = spec["dtype"] == "bfloat16"

        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

        t0 = time.perf_counter()
        if spec["mode"] == "train":
            model.train()
            loss_fn = open_clip.ClipLoss()
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
            no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=5e-5, betas=(0.9, 0.999), eps=1e-8)

            def run():
                with autocast():
                    img_f, txt_f, scale = model(images, tokens)[:3]
                    loss = loss_fn(img_f, txt_f, scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, 4.6052)
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite loss")
        else:
            model.eval()
            if spec["mode"] == "image":
                def run():
                    with torch.inference_mode(), autocast():
                        F.normalize(model.encode_image(images), dim=-1).float()
            else:
                def run():
                    with torch.inference_mode(), autocast():
                        F.normalize(model.encode_text(tokens), dim=-1).float()
        warm = timed(run, 2)
        variants[msg["id"]] = run
        return {"params": n_params, "head_params": 0, "first_s": time.perf_counter() - t0, "warm": warm[-1],
                "threads": torch.get_num_threads()}

    def run(msg):
        return {"times": timed(variants[msg["id"]], msg["n"])}

    def free(msg):
        variants.pop(msg["id"], None)
        return {"ok": True}

    _serve({"setup": setup, "run": run, "free": free, "quit": lambda m: {"ok": True},
            "info": lambda m: {"torch": torch.__version__, "open_clip": open_clip.__version__,
                               "threads": torch.get_num_threads()}})


# ------------------------------------------------------------------------------------------------
# Driver


class Worker:
    def __init__(self, name: str, argv: list[str], env: dict):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                     cwd=REPO)

    def call(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} worker: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def close(self):
        try:
            self.call(op="quit")
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _stats(times: list[float], batch: int, flops_per_sample: float) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    return {"n": len(times), "median_s": med, "q1_s": q[0], "q3_s": q[2], "min_s": min(times), "max_s": max(times),
            "samples_per_s": batch / med, "gflops_per_s": batch * flops_per_sample / med / 1e9}


def plan(args) -> list[dict]:
    """Groups of variants timed against each other (one group = one model/mode/dtype)."""
    groups = []
    for model in args.cases:
        a = arch(model)
        batch = args.batch or (a["batch"] // (2 if args.quick else 1))
        for dtype in args.dtypes:
            for mode in args.modes:
                variants = [("open_clip", 0), ("hetclip", 0)]
                if mode == "train" and model in args.het_models:
                    variants += [("hetclip", s) for s in args.het_samples]
                groups.append({"model": model, "arch": a, "mode": mode, "dtype": dtype, "batch": batch,
                               "variants": variants})
    return groups


def run_group(group, workers, args, log) -> dict:
    a = group["arch"]
    mult = 3 if group["mode"] == "train" else 1
    flops = mult * forward_flops(a, group["mode"])
    entries = []
    for fw, het in group["variants"]:
        spec = {k: group[k] for k in ("model", "arch", "mode", "dtype", "batch")} | {"het": het}
        vid = f"{fw}|{group['model']}|{group['mode']}|{group['dtype']}|{group['batch']}|{het}"
        info = workers[fw].call(op="setup", id=vid, spec=spec)
        log(f"  setup {fw} het={het}: {info['params']:,} params, first+warm {info['first_s']:.1f}s, "
            f"step {info['warm']:.3f}s")
        entries.append({"framework": fw, "het_samples": het, "id": vid, "setup": info, "times": []})
    counts = {e["framework"] for e in entries if e["het_samples"] == 0}
    p = {e["framework"]: e["setup"]["params"] for e in entries if e["het_samples"] == 0}
    if len(counts) == 2 and p["hetclip"] != p["open_clip"]:
        raise AssertionError(f"{group['model']}: parameter counts differ: hetclip {p['hetclip']:,} vs "
                             f"open_clip {p['open_clip']:,}")
    for r in range(args.rounds):
        for e in (entries if r % 2 == 0 else entries[::-1]):
            n = max(1, min(args.max_steps_per_block, round(args.block_seconds / max(e["setup"]["warm"], 1e-4))))
            times = workers[e["framework"]].call(op="run", id=e["id"], n=n + args.block_warmup)["times"]
            e["times"] += times[args.block_warmup:]
    for e in entries:
        workers[e["framework"]].call(op="free", id=e["id"])
        e["stats"] = _stats(e["times"], group["batch"], flops)
    by = {(e["framework"], e["het_samples"]): e for e in entries}
    oc, hc = by.get(("open_clip", 0)), by[("hetclip", 0)]
    result = {k: group[k] for k in ("model", "arch", "mode", "dtype", "batch")}
    result.update(params=hc["setup"]["params"], flops_per_sample=flops, loadavg_1min_end=os.getloadavg()[0],
                  results=[{k: e[k] for k in ("framework", "het_samples", "stats", "times")} for e in entries])
    if oc is not None:
        result["speedup_vs_open_clip"] = oc["stats"]["median_s"] / hc["stats"]["median_s"]
    result["hetxl_over_det"] = {str(s): by[("hetclip", s)]["stats"]["median_s"] / hc["stats"]["median_s"]
                                for _, s in group["variants"] if s}
    return result


def markdown(report: dict) -> str:
    lines = [f"# hetclip vs open_clip throughput ({report['date']})", "",
             f"`{report['command']}`", "",
             f"Machine: {report['machine']}; {report['threads']} threads each; hetclip JAX {report['versions'].get('jax')}"
             f" (XLA_FLAGS=`{report['xla_flags']}`, allocator {report['versions'].get('hetclip_allocator', 'system')})"
             f", open_clip {report['versions'].get('open_clip')} on torch "
             f"{report['versions'].get('torch')}. Interleaved: {report['rounds']} rounds of ~{report['block_seconds']} s "
             f"blocks per variant, each after {report.get('block_warmup', 0)} untimed step(s). "
             "Step time = median (IQR); GFLOP/s from analytic matmul FLOPs (train = 3x forward). "
             f"1-min load average during the run: {report.get('loadavg', '?')} (other jobs share the 2 cores).", "",
             "| model | mode | dtype | batch | framework | samples/s | step ms median (IQR) | GFLOP/s | hetclip / open_clip |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in report["groups"]:
        for r in g["results"]:
            s = r["stats"]
            name = r["framework"] + (f" HET-XL S={r['het_samples']}" if r["het_samples"] else "")
            ratio = ""
            if r["framework"] == "hetclip" and not r["het_samples"] and "speedup_vs_open_clip" in g:
                ratio = f"**{g['speedup_vs_open_clip']:.2f}x**"
            elif r["het_samples"]:
                ratio = f"(step {g['hetxl_over_det'][str(r['het_samples'])]:.2f}x DET)"
            lines.append(f"| {g['model']} | {g['mode']} | {g['dtype']} | {g['batch']} | {name} | "
                         f"{s['samples_per_s']:.1f} | {1e3 * s['median_s']:.1f} ({1e3 * s['q1_s']:.1f}–"
                         f"{1e3 * s['q3_s']:.1f}) | {s['gflops_per_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openclip-python", default="../ocvenv/bin/python",
                    help="python of a venv with open_clip_torch (see bench/README.md); '' to skip open_clip")
    ap.add_argument("--hetclip-python", default=sys.executable)
    ap.add_argument("--cases", default="tiny,B/32", help="comma list of hetclip.model presets")
    ap.add_argument("--modes", default="train,image,text")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--het-samples", default="8,32", help="HET-XL sample counts (hetclip training only)")
    ap.add_argument("--het-models", default=None, help="models with HET-XL variants (default: all cases)")
    ap.add_argument("--batch", type=int, default=0,
                    help=f"override the batch (default {', '.join(f'{b} {m}' for m, b in BATCH.items())}, "
                         f"{DEFAULT_BATCH} other presets)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 4, --quick 2)")
    ap.add_argument("--block-seconds", type=float, default=0.0, help="time per block (default 3, --quick 1)")
    ap.add_argument("--max-steps-per-block", type=int, default=20)
    ap.add_argument("--block-warmup", type=int, default=1,
                    help="untimed steps at the start of every block (default 1): the first step after a "
                         "worker sat idle can pay for memory the VM's host took back meanwhile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-xla-config", action="store_true", help="don't apply hetclip.xla.configure_cpu_flags()")
    ap.add_argument("--quick", action="store_true", help="tiny only, half batch, fewer/shorter rounds")
    ap.add_argument("--out", default=os.path.join(RESULTS, "throughput"))
    ap.add_argument("--worker", choices=["hetclip", "open_clip"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker == "hetclip":
        hetclip_worker(args.threads, not args.no_xla_config)
        return 0
    if args.worker == "open_clip":
        openclip_worker(args.threads)
        return 0

    if args.quick and args.cases == "tiny,B/32":
        args.cases = "tiny"
    args.cases = [c for c in args.cases.split(",") if c]
    from hetclip.model import PRESETS  # not at the top: the open_clip worker runs this file without hetclip

    for c in args.cases:
        if c not in PRESETS:
            ap.error(f"--cases: unknown model {c!r} (hetclip.model presets: {', '.join(PRESETS)})")
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in ("train", "image", "text"):
            ap.error(f"--modes: unknown mode {m!r} (train, image, text)")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for d in args.dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtypes: unknown dtype {d!r} (float32, bfloat16)")
    if args.block_warmup < 0:
        ap.error(f"--block-warmup: must be >= 0, got {args.block_warmup}")
    args.het_samples = [int(s) for s in args.het_samples.split(",") if s]
    args.het_models = args.cases if args.het_models is None else [m for m in args.het_models.split(",") if m]
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.block_seconds = args.block_seconds or (1.0 if args.quick else 3.0)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    me = os.path.abspath(__file__)
    common = [me, "--threads", str(args.threads)] + (["--no-xla-config"] if args.no_xla_config else [])
    workers = {"hetclip": Worker("hetclip", [args.hetclip_python] + common + ["--worker", "hetclip"], env)}
    if args.openclip_python:
        workers["open_clip"] = Worker("open_clip", [args.openclip_python] + common + ["--worker", "open_clip"], env)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from hetclip.xla import cpu_description  # not at the top: the open_clip worker runs this file without hetclip

    t_start = time.time()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", "bench/throughput.py"] +
                                                                           (argv if argv is not None else sys.argv[1:])),
              "machine": cpu_description(),
              "threads": args.threads, "rounds": args.rounds, "block_seconds": args.block_seconds,
              "block_warmup": args.block_warmup, "groups": []}
    try:
        versions = workers["hetclip"].call(op="info")
        if "open_clip" in workers:
            versions |= workers["open_clip"].call(op="info")
        report["xla_flags"] = versions.pop("xla_flags")
        report["versions"] = versions
        for group in plan(args):
            if "open_clip" not in workers:
                group["variants"] = [v for v in group["variants"] if v[0] != "open_clip"]
            log(f"{group['model']} {group['mode']} {group['dtype']} batch {group['batch']}")
            res = run_group(group, workers, args, log)
            report["groups"].append(res)
            msg = " ".join(f"{r['framework']}{'/S' + str(r['het_samples']) if r['het_samples'] else ''}="
                           f"{r['stats']['samples_per_s']:.1f}/s" for r in res["results"])
            if "speedup_vs_open_clip" in res:
                msg += f"  ratio {res['speedup_vs_open_clip']:.2f}x"
            log("  " + msg)
    finally:
        for w in workers.values():
            w.close()
    report["wall_s"] = time.time() - t_start
    loads = [g["loadavg_1min_end"] for g in report["groups"]]
    report["loadavg"] = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
