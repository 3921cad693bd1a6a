"""End-to-end training runs in subprocesses: kill -9 and resume, two processes, the README's main job."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TINY = """
from hetclip.configs._base import base_config


def get_config(arg=""):
    het = "het" in arg
    c = base_config("tiny", het=het, vision=dict(width=32, layers=1, heads=2, patch_size=8, image_size=32),
                    text=dict(width=32, layers=1, heads=2, context_length=16), embed_dim=16)
    if het:
        c.model.het.update(num_factors=3, mc_samples=4, sample_chunk=2)
    c.batch_size = 16
    c.total_steps = {steps}
    c.log_every = 1
    c.tensorboard = False
    c.optim.update(lr=1e-3, warmup_steps=2)
    c.data.update(image_size=32, num_workers={workers}, shuffle_buffer=64, synthetic={synthetic},
                  tokenizer=dict(kind="hf", path="", context_length=16, lower_case=True))
    c.checkpoint.update(every_steps={every}, keep=3, async_save=True)
    c.evals = [dict(kind="zero_shot", name=task, at_end={eval_at_end}, batch_size=64, limit=64,
                    mc_samples=4 if het else 0) for task in ("shape", "color", "shape_color")]  # the demo's tasks
    c.export.update(format="{export}")
    c.demo.update(enabled=True, dir="{demo_dir}",
                  params=dict(num_train=384, shard_size=96, image_size=32, eval_per_class=4, eval_per_combo=1,
                              vocab_size=600, context_length=16))
    return c
"""


def write_config(tmp_path, name="cfg.py", *, steps=10, every=3, workers=1, synthetic=False, eval_at_end=False,
                 export="", demo_dir=None):
    path = tmp_path / name
    path.write_text(TINY.format(steps=steps, every=every, workers=workers, synthetic=synthetic,
                                eval_at_end=eval_at_end, export=export,
                                demo_dir=demo_dir or str(tmp_path.parent / "shared_demo")))
    return str(path)


def env(devices=1):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["HF_HUB_OFFLINE"] = "1"
    return e


def train_cmd(config, workdir, *extra):
    return [sys.executable, "-m", "hetclip.train", "--config", config, "--workdir", workdir, "--no-progress", *extra]


def losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path):
    cfg = write_config(tmp_path, steps=12, every=3)
    straight = str(tmp_path / "straight")
    subprocess.run(train_cmd(cfg, straight), check=True, env=env(), timeout=900)

    work = str(tmp_path / "killed")
    proc = subprocess.Popen(train_cmd(cfg, work), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:
        time.sleep(0.2)
        if os.path.exists(os.path.join(work, "metrics.jsonl")) and max(losses(work) or [0]) >= 7:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    workers = data_workers(proc.pid)
    assert workers, "the trainer has no data worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(work))
    assert killed_at < 12, "the run finished before it could be killed"
    deadline = time.time() + 10
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers), "data workers outlived the killed trainer"
    subprocess.run(train_cmd(cfg, work), check=True, env=env(), timeout=900)
    a, b = losses(straight), losses(work)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)


def data_workers(pid):
    """Pids of the data-worker processes among ``pid``'s children (Linux /proc)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:     # threads (XLA's, orbax's) and children come and go while we read
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = f.read().split()
        except FileNotFoundError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"hetclip.data.workers" in c.read():
                        out.append(int(child))
            except FileNotFoundError:
                continue
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_data_worker_stops_the_run_by_name_and_keeps_checkpoints(tmp_path):
    cfg = write_config(tmp_path, steps=400, every=2, workers=2)
    work = str(tmp_path / "w")
    proc = subprocess.Popen(train_cmd(cfg, work), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and not (os.path.exists(os.path.join(work, "metrics.jsonl"))
                                          and max(losses(work) or [0]) >= 3):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    workers = data_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    rc = proc.wait(timeout=300)
    err = proc.stderr.read().decode()
    assert rc == 2, err[-3000:]
    assert f"data worker 1 (pid {workers[1]}) of process 0 was killed by SIGKILL while reading shard " in err
    assert "Traceback" not in err
    assert not alive(workers[0])
    steps = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit())
    assert steps and steps[-1] >= 2
    from hetclip.checkpoint import load_params

    step, params, _ = load_params(work)
    assert step == steps[-1]


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    cfg = write_config(tmp_path, steps=400, every=1000)
    work = str(tmp_path / "term")
    proc = subprocess.Popen(train_cmd(cfg, work), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and not (os.path.exists(os.path.join(work, "metrics.jsonl")) and losses(work)):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    assert rc == 128 + signal.SIGTERM
    steps = [int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit()]
    assert steps and max(steps) >= 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_and_match_one_process(tmp_path):
    cfg = write_config(tmp_path, steps=4, every=2, synthetic=True)
    single = str(tmp_path / "single")
    subprocess.run(train_cmd(cfg, single), check=True, env=env(4), timeout=900)
    work = str(tmp_path / "multi")
    port = _free_port()
    procs = [subprocess.Popen(train_cmd(cfg, work, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                        "--process-id", str(i)), env=env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    a, b = losses(single), losses(work)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=1e-5)


def test_main_job_trains_evaluates_and_exports(tmp_path):
    cfg = write_config(tmp_path, steps=6, every=100, eval_at_end=True, export="hf")
    work = str(tmp_path / "main")
    out = subprocess.run(train_cmd(cfg + ":het", work), env=env(), capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "zero-shot shape: top1" in out.stdout
    summary = json.load(open(os.path.join(work, "summary.json")))
    assert set(summary["eval"]) == {"shape", "color", "shape_color"}
    assert "mc_top1" in summary["eval"]["shape"]
    export_dir = os.path.join(work, "export_hf")
    assert {"config.json", "model.safetensors", "het_head.safetensors", "preprocessor_config.json"} <= set(
        os.listdir(export_dir))
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(export_dir)
    assert model.config.projection_dim == 16

    # zero-shot from the checkpoint and from the exported directory agree
    from hetclip.zero_shot.cli import run as zero_shot_main

    shape_dir = summary_eval_dir = os.path.join(str(tmp_path.parent / "shared_demo"), "eval", "shape")
    common = ["--data", shape_dir, "--classnames", os.path.join(summary_eval_dir, "classnames.txt"),
              "--templates", os.path.join(shape_dir, "templates.txt"), "--limit", "16", "--no-progress",
              "--batch-size", "8"]
    from_ckpt = zero_shot_main(["--checkpoint", work, "--out", str(tmp_path / "a.json"), *common])
    from_export = zero_shot_main(["--checkpoint", export_dir, "--out", str(tmp_path / "b.json"), *common])
    assert from_ckpt["dataset"]["images_evaluated"] == 16
    for k in ("top1", "top5", "nll"):
        assert from_export["metrics"][k] == pytest.approx(from_ckpt["metrics"][k], rel=1e-4, abs=1e-6)


def test_unknown_config_key_is_a_clear_cli_error(tmp_path):
    cfg = write_config(tmp_path)
    out = subprocess.run(train_cmd(cfg, str(tmp_path / "w"), "--config.optim.weight_decy=0"), env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "did you mean 'optim.weight_decay'" in out.stderr
