"""``hetclip-train``: contrastive pretraining on a device mesh, from a config, resumable.

    hetclip-train --config demo --workdir runs/demo [--config.batch_size=256 ...]

A run reads top to bottom: ``runsetup.setup`` (config, demo data, tokenizer, mesh, evaluators, the run
directory) -> ``runsetup.init_state`` (fresh or resumed) -> the loop (``step.make_train_step`` under the
non-finite guard; the ``policies``: log window, checkpoint saver, signals; the evaluators' schedule) ->
the finish (final save, evaluators at the end, export, ``summary.json``).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import jax

from hetclip import checkpoint as ckpt_lib
from hetclip import config as config_lib
from hetclip import distributed as dist
from hetclip import runlog
from hetclip.data.loader import TooManyBadSamples
from hetclip.evals import flat_scalars, headline
from hetclip.data.workers import DataWorkerError
from hetclip.files import write_json_atomic
from hetclip.model import DualEncoder
from hetclip.optim import frozen_groups
from hetclip.policies import LogWindow, Saver, StopRequest
from hetclip.prefetch import DevicePrefetcher
from hetclip.runsetup import Run, init_state, make_data, metadata, setup
from hetclip.step import TrainingError, check_guard, guarded, make_train_step, new_guard


def train(cfg, workdir: str, *, allow_config_change: bool = False, progress: bool = True,
          max_steps: int | None = None) -> dict:
    """Train (or resume) a run in ``workdir``; returns a summary dict. ``max_steps`` stops early (tests)."""
    if max_steps is not None and max_steps < 1:
        raise config_lib.ConfigError(f"max_steps={max_steps} must be >= 1")
    run = setup(cfg, workdir, allow_config_change)
    try:
        return _train(run, progress=progress, max_steps=max_steps)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(run: Run, *, progress: bool, max_steps: int | None) -> dict:
    cfg, mesh = run.cfg, run.mesh
    main = dist.is_main_process()
    ckpt = ckpt_lib.Checkpointer(os.path.join(run.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
    init = init_state(run, ckpt)
    state, rng, step = init.train, init.rng, init.start_step
    step_fn = jax.jit(guarded(make_train_step(run.model_cfg, init.optimizer, mesh, cfg.accum_steps,
                                              frozen_groups(cfg))), donate_argnums=(0, 1))
    guard = jax.device_put(new_guard(), dist.replicated(mesh))
    loop_key = jax.random.wrap_key_data(rng)
    data = make_data(cfg, run.tokenizer, local_batch=cfg.batch_size // jax.process_count(), state=init.data_state)
    data_pos = data.state()  # the loader position of the last batch a step consumed
    writer = runlog.MetricsWriter(run.workdir, enabled=main, tensorboard=cfg.get("tensorboard", True),
                                  resume_step=step)
    end_step = run.total_steps if max_steps is None else min(run.total_steps, max_steps)
    bar = runlog.Progress(run.total_steps, initial=step, enabled=main and progress)
    say = bar.write if main else None
    logit_scale = jax.jit(lambda p: DualEncoder(run.model_cfg).apply({"params": p}, method=DualEncoder.logit_scale))
    saver = Saver(ckpt, cfg.checkpoint.every_steps, metadata(run), logit_scale, step)
    window = LogWindow(cfg.log_every, cfg.batch_size)
    summary = {"workdir": run.workdir, "start_step": step, "total_steps": run.total_steps}
    last_eval = {}
    feed = DevicePrefetcher(data, lambda local: dist.global_batch(local, mesh), depth=2)
    in_flight: collections.deque = collections.deque()
    try:
        with StopRequest() as stop:
            while step < end_step:
                waited = feed.wait_seconds
                try:
                    batch, data_pos_next = next(feed)
                except StopIteration:
                    raise TrainingError(f"the data ran out at step {step} (set data.epochs higher or "
                                        "data.epoch_size correctly)") from None
                except (DataWorkerError, TooManyBadSamples) as e:
                    raise TrainingError(f"input data at step {step + 1}: {e}") from None
                state, guard, metrics = step_fn(state, guard, batch, jax.random.fold_in(loop_key, step))
                data_pos = data_pos_next
                step += 1
                window.step_done(feed.wait_seconds - waited)
                # At most two steps queued on the devices: their batches are the only ones held there.
                in_flight.append(metrics["loss"])
                if len(in_flight) > 2:
                    in_flight.popleft().block_until_ready()
                ckpt.poll()
                if window.due(step, end_step):
                    check_guard(jax.device_get(guard))
                    summary["last_metrics"] = _log_line(step, end_step, metrics, window, init.schedule, writer, bar)
                if saver.due(step):
                    saver.save(step, state, guard, rng, data_pos)
                due = run.evals.due(step, end_step)
                if due:
                    check_guard(jax.device_get(guard))
                    last_eval = run.evals.run(due, state["params"], step, writer=writer, say=say,
                                              workdir=run.workdir if main else None)
                if stop.signal is not None:
                    if saver.saved != step:  # this step may just have been saved by the periodic save
                        bar.write(f"signal {stop.signal} received: saving a checkpoint at step {step} and stopping")
                        saver.save(step, state, guard, rng, data_pos)
                    else:
                        bar.write(f"signal {stop.signal} received: stopping at step {step} (its checkpoint is saved)")
                    ckpt.wait()
                    summary.update(stopped_by_signal=int(stop.signal), step=step)
                    return summary
            if ckpt.latest_step() != step:
                saver.save(step, state, guard, rng, data_pos)
            ckpt.wait()
    finally:
        failing = sys.exc_info()[0]
        feed.close()
        bar.close()
        data.close()
        try:
            ckpt.close()
        except ckpt_lib.CheckpointError:
            if failing is None:  # else the error already under way is the one to report
                raise
        if failing is not None and issubclass(failing, KeyboardInterrupt):  # a second signal: no save
            raise KeyboardInterrupt(f"stopped at step {step} without saving; " + (
                "nothing was saved (no checkpoint yet)" if saver.saved is None
                else f"the newest checkpoint is step {saver.saved}")) from None
    summary.update(step=step, data=data.stats())
    if step >= run.total_steps:
        summary["eval"] = _finish(run, state["params"], step, writer, last_eval)
        if cfg.get("export") and cfg.export.get("format") and main:
            summary["export"] = export(run)
    writer.close()
    if main:
        write_json_atomic(os.path.join(run.workdir, "summary.json"), summary)
    return summary


def _log_line(step: int, end_step: int, metrics, window: LogWindow, schedule, writer, bar) -> dict:
    """One log window's scalars to the metrics file and the progress bar; returns them."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    timing = window.close()
    scalars.update(lr=float(schedule(step - 1)), samples_per_sec=timing["samples_per_sec"],
                   data_wait_frac=timing["data_wait_frac"])
    writer.write(step, scalars)
    bar.update(step, {"loss": scalars["loss"], "T": scalars["temperature"], "sps": scalars["samples_per_sec"],
                      "wait": scalars["data_wait_frac"],
                      "eta": f"{(end_step - step) * timing['seconds_per_step'] / 60:.1f}m"})
    return dict(scalars, step=step)


def _finish(run: Run, params, step: int, writer, last_eval: dict) -> dict:
    """The evaluators marked ``at_end`` on the final parameters (the last periodic results otherwise)."""
    final = run.evals.at_end()
    if not final:
        return last_eval
    say = (lambda m: print(m, flush=True)) if dist.is_main_process() else None
    return run.evals.run(final, params, step, writer=writer, say=say,
                         workdir=run.workdir if dist.is_main_process() else None)


def export(run: Run) -> dict:
    from hetclip import export as export_lib

    out = os.path.join(run.workdir, run.cfg.export.get("dir") or f"export_{run.cfg.export.format}")
    export_lib.export_checkpoint(run.workdir, run.cfg.export.format, out, force=True)
    return {"format": run.cfg.export.format, "dir": out}


# --------------------------------------------------------------------------------------------
# CLI


def parse(argv: list[str]):
    spec, overrides, rest = config_lib.split_argv(argv)
    parser = argparse.ArgumentParser(prog="hetclip-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_lib.help_epilog())
    parser.add_argument("--workdir", help="run directory (default: runs/<recipe>)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a work directory even though its saved config differs")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument("--coordinator", help="multi-process: coordinator address host:port (default: JAX's "
                        "auto-detection under SLURM, Open MPI or on Cloud TPU VMs)")
    parser.add_argument("--num-processes", type=int, help="multi-process: number of processes (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's id 0..N-1 (with --coordinator)")
    parser.add_argument("--no-cluster-detection", action="store_true",
                        help="run as one process even inside a SLURM step, mpirun or a TPU pod")
    parser.add_argument("--max-steps", type=int, help="stop after this step (the schedule still uses total_steps)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help="log warnings and errors only (no INFO lines)")
    loud.add_argument("--verbose", action="store_true", help="log DEBUG lines, and other libraries' INFO (orbax)")
    args = parser.parse_args(rest)
    if spec is None:
        parser.error("--config is required (a config file or one of the recipes: "
                     f"{', '.join(config_lib.available_recipes())})")
    cfg = config_lib.apply_overrides(config_lib.load_config(spec), overrides)
    workdir = args.workdir or cfg.get("workdir") or os.path.join("runs", os.path.splitext(os.path.basename(
        spec.partition(":")[0]))[0])
    return cfg, workdir, args


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user error (one message naming the file, key or step), 128+N stopped by signal N."""
    from hetclip.cli import guarded as with_exit_status

    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg, workdir, args = parse(argv)
        dist.initialize(args.coordinator, args.num_processes, args.process_id, auto=not args.no_cluster_detection)
        summary = train(cfg, workdir, allow_config_change=args.allow_config_change, progress=not args.no_progress,
                        max_steps=args.max_steps)
        if "stopped_by_signal" in summary:
            return 128 + summary["stopped_by_signal"]
        print(_summary_text(summary), flush=True)
        return 0

    return with_exit_status("hetclip-train", body, argv)


def _summary_text(summary: dict) -> str:
    lines = [f"trained {summary['workdir']}: step {summary['step']} of {summary['total_steps']}"]
    last = summary.get("last_metrics") or {}
    if "het/angular" in last:
        lines.append(f"  HET-XL head at step {last['step']}: angular noise {last['het/angular']:.4f} rad "
                     f"(spread across images {last['het/angular_spread']:.4f}), per-coordinate std "
                     f"{last['het/noise_std']:.4f}, |mean| {last['het/mean_norm']:.2f}, temperature "
                     f"{last['temperature']:.4f}")
    for name, res in (summary.get("eval") or {}).items():
        top = {k: v for k, v in flat_scalars(res).items() if k in ("top1", "top5")}
        shown = "  ".join(f"{k} {v:.4f}" for k, v in top.items()) or headline(res)
        lines.append(f"  {'zero-shot ' if top else 'eval '}{name}: {shown}")
    if summary.get("export"):
        lines.append(f"  exported ({summary['export']['format']}) to {summary['export']['dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    from hetclip.allocator import reexec_with_mimalloc

    reexec_with_mimalloc()  # as the console script does (python -m is kept on re-execution)
    sys.exit(main())
