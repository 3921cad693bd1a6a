"""Runs that survive real use: relocatable run directories, exit codes of the installed commands,
checkpoint integrity and fallback, the run lock, disk full, validation before writing, no diverged
state saved. Each test injects the fault on a copy of one small trained run."""
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from hetclip import checkpoint as ckpt_lib
from hetclip import config as config_lib
from hetclip import train as train_lib
from hetclip import workdir as workdir_lib
from hetclip.configs._base import base_config

BIN = os.path.dirname(sys.executable)

CONFIG = """
from hetclip.configs._base import base_config


def get_config(arg=""):
    c = base_config("tiny", vision=dict(width=32, layers=1, heads=2, patch_size=8, image_size=16),
                    text=dict(width=32, layers=1, heads=2, context_length=16), embed_dim=16)
    c.batch_size = 16
    c.total_steps = {steps}
    c.log_every = 1
    c.tensorboard = False
    c.optim.update(lr={lr}, warmup_steps=1)
    c.data.update(image_size=16, num_workers=0, synthetic={synthetic}, shuffle_buffer=32,
                  tokenizer=dict(kind="hf", path="", context_length=16, lower_case=True))
    c.checkpoint.update(every_steps={every}, keep=5, async_save=True)
    c.evals = []
    c.demo.update(enabled=True, dir={demo!r},
                  params=dict(num_train=96, shard_size=48, image_size=16, eval_per_class=2, eval_per_combo=1,
                              vocab_size=600, context_length=16))
    return c
"""


def write_config(path, demo, *, steps=4, every=2, lr=1e-3, synthetic=False):
    path.write_text(CONFIG.format(steps=steps, every=every, lr=lr, synthetic=synthetic, demo=str(demo)))
    return str(path)


def load_cfg(path):
    return config_lib.load_config(path)


def command(name, *args, cwd=None, timeout=600, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1")
    return subprocess.run([os.path.join(BIN, name), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (in-process, 8 simulated devices)."""
    root = tmp_path_factory.mktemp("faults")
    cfg_path = write_config(root / "cfg.py", root / "demo")
    run = root / "run"
    train_lib.train(load_cfg(cfg_path), str(run), progress=False)
    return {"root": root, "config": cfg_path, "run": run, "demo": root / "demo"}


def copy_run(trained, dest):
    shutil.copytree(trained["run"], dest)
    return dest


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def params_data_files(run, step):
    """The OCDBT data files of a step's params. Some hold bytes the committed version no longer refers
    to (the per-process files are merged into the step's own b-tree on commit), so damage is injected
    into all of them: damaging one unreferenced file changes nothing, and restoring proves it (digests)."""
    files = [f for f in glob.glob(os.path.join(run, "checkpoints", str(step), "params", "**", "d", "*"),
                                  recursive=True) if os.path.isfile(f)]
    assert files, f"no OCDBT data files under step {step}'s params"
    return files


# --------------------------------------------------------------------------------------------------
# Relocatable run directories and the installed commands' exit codes


@pytest.mark.slow
def test_moved_run_works_from_another_directory_and_commands_exit_0(trained, tmp_path):
    moved = copy_run(trained, tmp_path / "elsewhere" / "moved_run")
    step, meta = ckpt_lib.read_meta(str(moved))
    assert meta["tokenizer"]["path"] == "tokenizer"  # stored relative to the run directory
    shape = trained["demo"] / "eval" / "shape"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    zs = command("hetclip-zero-shot", "--checkpoint", str(moved), "--data", str(shape), "--classnames",
                 str(shape / "classnames.txt"), "--templates", str(shape / "templates.txt"), "--no-progress",
                 "--out", "zs.json", cwd=cwd)
    assert zs.returncode == 0, zs.stderr[-3000:]
    assert "top1" in zs.stdout and zs.stderr == ""  # the results only: no absl/orbax warnings
    assert "acc1" in json.loads((cwd / "zs.json").read_text())["metrics"]
    rt = command("hetclip-retrieval", "--checkpoint", str(moved), "--data",
                 str(trained["demo"] / "train" / "00000.tar"), "--limit", "16", "--no-progress", cwd=cwd)
    assert rt.returncode == 0, rt.stderr[-3000:]
    ex = command("hetclip-export", "--checkpoint", str(moved), "--format", "hf", "--out", "hf", cwd=cwd)
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert (ex.stdout + ex.stderr).strip() == "hetclip-export: wrote hf export to hf"
    assert (cwd / "hf" / "model.safetensors").is_file() and (cwd / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_user_errors_are_one_message_and_exit_2(trained, tmp_path):
    zs = command("hetclip-zero-shot", "--checkpoint", str(trained["run"]), "--data", str(tmp_path / "missing"),
                 "--no-progress")
    assert zs.returncode == 2 and "Traceback" not in zs.stderr
    assert zs.stderr.strip().splitlines()[-1].startswith("hetclip-zero-shot: error:")
    assert "missing" in zs.stderr
    # --out on the run directory itself, even with --force: refused, the run untouched
    before = sorted(os.listdir(trained["run"]))
    ex = command("hetclip-export", "--checkpoint", str(trained["run"]), "--format", "hf", "--out",
                 str(trained["run"]), "--force")
    assert ex.returncode == 2 and "run directory" in ex.stderr and "Traceback" not in ex.stderr
    assert sorted(os.listdir(trained["run"])) == before


def test_export_out_guard(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for bad in (run, tmp_path, run / "checkpoints", run / "checkpoints" / "4"):
        with pytest.raises(ValueError, match="--out"):
            workdir_lib.check_output_dir(str(bad), str(run))
    other = tmp_path / "other_run"
    (other / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds a training run"):
        workdir_lib.check_output_dir(str(other), str(run))
    workdir_lib.check_output_dir(str(run / "export_hf"), str(run))  # where hetclip-train exports
    workdir_lib.check_output_dir(str(tmp_path / "fresh"), str(run))


def test_old_cwd_relative_tokenizer_paths_resolve_inside_the_run(tmp_path):
    run = tmp_path / "moved"
    (run / "tokenizer").mkdir(parents=True)
    spec = {"kind": "hf", "path": "runs/demo/tokenizer"}
    assert workdir_lib.resolve_tokenizer_spec(spec, str(run))["path"] == str(run / "tokenizer")
    assert workdir_lib.resolve_tokenizer_spec({"kind": "hf", "path": "tokenizer"}, str(run))["path"] == \
        str(run / "tokenizer")
    with pytest.raises(FileNotFoundError, match="not in the run directory"):
        workdir_lib.resolve_tokenizer_spec({"kind": "hf", "path": "elsewhere/vocab"}, str(run))


# --------------------------------------------------------------------------------------------------
# Integrity


def test_digest_ignores_sharding_and_sees_one_flipped_bit():
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7
    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    tree = {"a": x, "b": np.arange(5, dtype=np.int32), "c": jax.numpy.ones((3,), jax.numpy.bfloat16)}
    ref = ckpt_lib.tree_report(tree)
    assert ckpt_lib.tree_report(dict(tree, a=sharded)) == ref
    flipped = x.copy()
    flipped.view(np.uint32)[3, 2] ^= 1 << 7
    assert ckpt_lib.tree_report(dict(tree, a=flipped))["a"][0] != ref["a"][0]
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert ckpt_lib.tree_report(dict(tree, a=swapped))["a"][0] != ref["a"][0]  # position-weighted
    nan = x.copy()
    nan[1, 1] = np.nan
    assert ckpt_lib.non_finite(ckpt_lib.tree_report(dict(tree, a=nan))) == ["a"]


def test_non_finite_state_is_never_saved(tmp_path):
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    params = {"w": np.ones((2, 3), np.float32), "temperature": {"log_scale": np.array(np.inf, np.float32)}}
    with pytest.raises(ckpt_lib.CheckpointError, match=r"refusing to save step 7: .*temperature/log_scale"):
        ck.save(7, params=params, opt_state={"mu": np.zeros(2, np.float32)}, rng=np.zeros(2, np.uint32),
                data_state={}, meta={})
    ck.close()
    assert not os.path.exists(tmp_path / "checkpoints" / "7")


def flip_bytes(run, step):
    rng = np.random.default_rng(0)
    for target in params_data_files(run, step):   # 64 flipped bytes in the middle half of each
        data = bytearray(open(target, "rb").read())
        for i in rng.choice(len(data) // 2, min(64, len(data) // 2), replace=False) + len(data) // 4:
            data[i] ^= 0xA5
        open(target, "wb").write(bytes(data))


def test_a_damaged_step_reads_as_one_error_from_the_installed_command(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    flip_bytes(run, 4)
    zs = command("hetclip-zero-shot", "--checkpoint", str(run), "--data", str(trained["demo"] / "eval" / "shape"),
                 "--no-progress")
    assert zs.returncode == 2 and "checkpoint step 4 is damaged" in zs.stderr
    assert_short(zs.stderr, most=1)  # no orbax event-loop tracebacks after the handled error


def test_flipped_bytes_are_refused_by_evaluation_and_export(trained, tmp_path):
    from hetclip import export
    from hetclip.zero_shot import cli

    run = copy_run(trained, tmp_path / "run")
    rng = np.random.default_rng(0)
    for target in params_data_files(run, 4):   # 64 flipped bytes in the middle half of each
        data = bytearray(open(target, "rb").read())
        for i in rng.choice(len(data) // 2, min(64, len(data) // 2), replace=False) + len(data) // 4:
            data[i] ^= 0xA5
        open(target, "wb").write(bytes(data))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint step 4 .*params"):
        ckpt_lib.load_params(str(run))
    shape = trained["demo"] / "eval" / "shape"
    assert cli.main(["--checkpoint", str(run), "--data", str(shape), "--no-progress"]) == 2
    out = tmp_path / "exported"
    assert export.main(["--checkpoint", str(run), "--format", "hf", "--out", str(out)]) == 2
    assert not out.exists()
    step, params, _ = ckpt_lib.load_params(str(run), step=2)  # the older step is intact
    assert step == 2


@pytest.mark.parametrize("item", ["params", "data"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(trained, tmp_path, item, caplog):
    run = copy_run(trained, tmp_path / "run")
    if item == "params":
        victims = params_data_files(run, 4)
    else:
        victims = [next(f for f in glob.glob(os.path.join(run, "checkpoints", "4", "data", "*")) if os.path.isfile(f))]
    for victim in victims:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    straight = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    with caplog.at_level(logging.WARNING, logger="hetclip.train"):
        summary = train_lib.train(load_cfg(trained["config"]), str(run), progress=False)
    assert summary["start_step"] == 2 and summary["step"] == 4
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step 4" in warning and os.path.join("4", item) in warning and "resuming from step 2" in warning
    assert os.path.isdir(os.path.join(run, "damaged_checkpoints", "4", item))  # kept, not deleted
    rows = [r["step"] for r in metrics(run) if "loss" in r]
    assert rows == [1, 2, 3, 4]  # the rows of steps 3-4 written before the fallback were replaced, not kept twice
    resumed = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert resumed[3] == pytest.approx(straight[3], rel=1e-5) and resumed[4] == pytest.approx(straight[4], rel=1e-5)


def test_no_intact_checkpoint_is_an_error_that_moves_nothing(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    for step in (2, 4):
        for victim in params_data_files(run, step):
            with open(victim, "r+b") as f:
                f.truncate(1)
    with pytest.raises(train_lib.TrainingError, match=r"no intact checkpoint[\s\S]*step 4[\s\S]*step 2"):
        train_lib.train(load_cfg(trained["config"]), str(run), progress=False)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4"]


# --------------------------------------------------------------------------------------------------
# Validation before anything is written; diverged states


@pytest.mark.parametrize("override,match", [
    ("total_steps=-5", "total_steps=-5 must be >= 0"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1 must be >= 0"),
    ("log_every=0", "log_every=0 must be >= 1"),
    ("optim.lr=nan", "optim.lr=nan must be >= 0"),
    ("optim.weight_decay=inf", "optim.weight_decay=inf must be a finite number"),
])
def test_bad_values_are_refused_before_anything_is_written(trained, tmp_path, override, match, capsys):
    work = tmp_path / "w"
    rc = train_lib.main(["--config", trained["config"], "--workdir", str(work), f"--config.{override}",
                         "--no-progress"])
    assert rc == 2 and match in capsys.readouterr().err
    assert not work.exists()


def test_bad_max_steps_and_recipe_variant(tmp_path, capsys):
    assert train_lib.main(["--config", "demo:hett", "--workdir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe variant 'hett'" in err and "did you mean 'het'" in err
    assert train_lib.main(["--config", "demo", "--workdir", str(tmp_path / "b"), "--max-steps", "-5"]) == 2
    assert "max_steps=-5 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_file_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    assert train_lib.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"config file {bad}: syntax error at line 1" in err and "Traceback" not in err


def test_diverging_run_saves_only_finite_states(trained, tmp_path):
    cfg_path = write_config(tmp_path / "cfg.py", trained["demo"], steps=8, every=1, lr=1e6, synthetic=True)
    work = tmp_path / "w"
    with pytest.raises((train_lib.TrainingError, ckpt_lib.CheckpointError), match=r"(non-finite .*step \d|refusing to save step \d+: the temperature is not finite)"):
        train_lib.train(load_cfg(cfg_path), str(work), progress=False)
    for step in ckpt_lib.Checkpointer(str(work / "checkpoints")).steps():
        _, params, _ = ckpt_lib.load_params(str(work), step)  # verified: every tensor finite
        scale = np.exp(min(float(params["temperature"]["log_scale"]), np.log(100.0)))
        assert 0 < scale < np.inf, step  # so the temperature 1/scale is finite too


# --------------------------------------------------------------------------------------------------
# Shards that are missing, unreadable or empty


def assert_short(err, most=5):
    """A handled error reads in a few lines: no traceback, at most ``most`` lines."""
    lines = err.strip().splitlines()
    assert lines and len(lines) <= most and "Traceback" not in err, err[-3000:]


def own_data(trained, shards, *more):
    """hetclip-train arguments training the test config on ``shards`` with the demo's tokenizer."""
    return ["--config", trained["config"], "--config.demo.enabled=False", f"--config.data.shards={shards}",
            f"--config.data.tokenizer.path={trained['demo'] / 'tokenizer'}", "--no-progress", *more]


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_shards_are_refused_before_training_all_named(trained, tmp_path, capsys, workers):
    work = tmp_path / "w"
    pattern = str(trained["demo"] / "train" / "{00000,missing1,missing2}.tar")
    rc = train_lib.main(own_data(trained, pattern, "--workdir", str(work), f"--config.data.num_workers={workers}"))
    err = capsys.readouterr().err
    assert rc == 2 and "2 of the 3 shards" in err and "missing1.tar" in err and "missing2.tar" in err
    assert_short(err)
    assert not work.exists()


def test_failed_shards_are_listed_in_the_summary(trained, tmp_path):
    import tarfile

    shard_dir = tmp_path / "shards"
    shutil.copytree(trained["demo"] / "train", shard_dir)
    with tarfile.open(shard_dir / "empty.tar", "w"):
        pass
    work = tmp_path / "w"
    cfg = config_lib.apply_overrides(load_cfg(trained["config"]), [
        "demo.enabled=False", f"data.shards={shard_dir}/{{00000,00001,empty}}.tar",
        f"data.tokenizer.path={trained['demo'] / 'tokenizer'}", "data.max_bad_shard_fraction=0.5",
        "total_steps=8", "data.epoch_size=96"])  # 128 samples: every shard read
    with pytest.warns(UserWarning, match="empty.tar: empty_shard"):
        train_lib.train(cfg, str(work), progress=False)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["data"]["bad_shards"] == {str(shard_dir / "empty.tar"): {
        "reason": "empty_shard", "detail": "the shard holds no sample (no member named KEY.EXT)"}}
    with pytest.raises(train_lib.TrainingError, match=r"1 of 3 shards failed .*empty\.tar \(empty_shard\)"):
        with pytest.warns(UserWarning):
            train_lib.train(config_lib.apply_overrides(cfg, ["data.max_bad_shard_fraction=0.01"]),
                            str(tmp_path / "w2"), progress=False)


# --------------------------------------------------------------------------------------------------
# Log output


LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} %s hetclip\.%s: %s$"


def test_info_lines_reach_the_user_in_the_trainers_format(trained, tmp_path, capsys):
    import re

    assert logging.getLogger().handlers  # importing orbax left a WARNING handler on the root logger
    cfg_path = write_config(tmp_path / "cfg.py", trained["demo"], steps=4, every=2, synthetic=True)
    args = ["--config", cfg_path, "--workdir", str(tmp_path / "w"), "--no-progress"]
    assert train_lib.main(args + ["--max-steps", "2"]) == 0
    capsys.readouterr()
    assert train_lib.main(args + ["--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert re.search(LOG_LINE % ("INFO", "train", r"resumed from \S+ at step 2"), err, re.M), err[-2000:]
    assert train_lib.main(args + ["--quiet"]) == 0
    err = capsys.readouterr().err
    assert " INFO " not in err and "resumed" not in err, err[-2000:]


def test_log_levels_and_other_libraries(capsys):
    import re

    from hetclip.cli import configure_logging

    for verbosity in ("info", "quiet", "verbose"):
        configure_logging(verbosity)
        logging.getLogger("hetclip.workdir").info("took over the lock")
        logging.getLogger("hetclip.train").warning("a warning")
        logging.getLogger("hetclip.train").debug("a detail")
        logging.getLogger("absl").info("orbax chatter")
        logging.getLogger("absl").warning("orbax warning")
        err = capsys.readouterr().err
        assert re.search(LOG_LINE % ("WARNING", "train", "a warning"), err, re.M), err
        assert ("took over the lock" in err) == (verbosity != "quiet")
        assert ("a detail" in err) == ("orbax chatter" in err) == ("orbax warning" in err) == (verbosity == "verbose")
    configure_logging("info")


# --------------------------------------------------------------------------------------------------
# Signals


def _signal_after(monkeypatch, cls, method, when, times=1):
    """Make ``cls.method`` send this process SIGINT ``times`` times after the call where ``when(args)``."""
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if when(args):
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(cls, method, wrapped)


def test_ctrl_c_on_a_checkpoint_step_stops_with_130_and_no_error(trained, tmp_path, capsys, monkeypatch):
    _signal_after(monkeypatch, ckpt_lib.Checkpointer, "save", lambda args: args[0] == 2)
    work = tmp_path / "w"
    rc = train_lib.main(["--config", trained["config"], "--workdir", str(work), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 130 and "error" not in err, err[-3000:]
    assert "stopping at step 2 (its checkpoint is saved)" in out
    assert ckpt_lib.Checkpointer(str(work / "checkpoints")).steps() == [2]


def test_a_second_ctrl_c_before_any_checkpoint_says_nothing_was_saved(trained, tmp_path, capsys, monkeypatch):
    from hetclip import runlog

    _signal_after(monkeypatch, runlog.MetricsWriter, "write", lambda args: args[0] == 1, times=2)
    work = tmp_path / "w"
    rc = train_lib.main(["--config", trained["config"], "--workdir", str(work), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and "hetclip-train: interrupted: stopped at step 1 without saving; nothing was saved" in err
    assert_short(err)
    assert not (work / "checkpoints").exists() or not os.listdir(work / "checkpoints")


# --------------------------------------------------------------------------------------------------
# The run lock


def test_a_held_lock_refuses_a_second_trainer_and_a_dead_holder_is_taken_over(trained, tmp_path, caplog):
    work = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from hetclip.workdir import RunLock
        RunLock({str(work)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirBusy, match=rf"in use by pid {holder.pid} on host"):
            train_lib.train(load_cfg(trained["config"]), str(work), progress=False)
        assert not (work / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.INFO, logger="hetclip.workdir"):
        with workdir_lib.RunLock(str(work)):
            pass
    assert f"left by pid {holder.pid}" in caplog.text


@pytest.mark.slow
def test_two_installed_trainers_on_one_workdir(trained, tmp_path):
    cfg_path = write_config(tmp_path / "cfg.py", trained["demo"], steps=400, every=1000, synthetic=True)
    work = tmp_path / "w"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", HF_HUB_OFFLINE="1")
    first = subprocess.Popen([os.path.join(BIN, "hetclip-train"), "--config", cfg_path, "--workdir", str(work),
                              "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (work / "metrics.jsonl").exists():
            assert time.time() < deadline and first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.2)
        second = command("hetclip-train", "--config", cfg_path, "--workdir", str(work), "--no-progress")
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)


# --------------------------------------------------------------------------------------------------
# Disk full


def _mount_tmpfs(path, size):
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


@pytest.mark.slow
def test_disk_full_stops_at_the_failed_save_and_keeps_earlier_steps(trained, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2500k"):
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    try:
        cfg_path = write_config(tmp_path / "cfg.py", trained["demo"], steps=40, every=1, synthetic=True)
        work = disk / "run"
        out = command("hetclip-train", "--config", cfg_path, "--workdir", str(work), "--no-progress")
        assert out.returncode == 2, out.stderr[-3000:]
        assert_short(out.stderr, most=1)  # no orbax tracebacks, absl errors or asyncio noise
        assert out.stderr.strip().endswith("-- No space left on device"), out.stderr[-3000:]
        assert out.stderr.startswith("hetclip-train: error: saving the checkpoint of step ")
        steps = ckpt_lib.Checkpointer(str(work / "checkpoints")).steps()
        assert steps and steps[-1] < 40
        for step in steps:
            ckpt_lib.load_params(str(work), step)  # every kept step intact
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_metrics_rows_of_steps_run_again_are_replaced(tmp_path):
    from hetclip import runlog

    w = runlog.MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3, 4):
        w.write(step, {"loss": float(step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a row cut by a kill
    w = runlog.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=2)  # resumed from the step-2 checkpoint
    for step in (3, 4):
        w.write(step, {"loss": 10.0 + step})
    w.close()
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
