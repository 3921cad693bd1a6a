"""Multi-process start-up: which environments count as a cluster, and two local processes that find
each other through JAX's SLURM auto-detection (no --coordinator flags)."""
import os
import socket
import subprocess
import sys

import pytest

from hetclip import distributed as dist

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, chips, want", [
    (SLURM, 0, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, 0, None),                       # a one-task step is one process
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, 0, None),  # salloc shell, not a step
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_RANK": "1"}, 0, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, 0, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, 0, None),
    ({}, 4, "tpu"),                                                   # chips on the PCI bus: a TPU VM
    ({}, 0, None),
])
def test_detect_cluster(env, chips, want):
    assert dist.detect_cluster(env, tpu_chips=chips) == want


def test_no_cluster_means_no_initialisation(monkeypatch):
    for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", *dist.SLURM_VARS, *dist.OMPI_VARS,
              *dist.TPU_HOSTS_VARS):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(dist, "_tpu_chips", lambda: 0)
    called = []
    monkeypatch.setattr(dist.jax.distributed, "initialize", lambda *a, **k: called.append((a, k)))
    assert dist.initialize() is None
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    assert dist.initialize(auto=False) is None and not called   # --no-cluster-detection
    assert dist.initialize() == "slurm"
    assert called == [((), {})]                                  # JAX's own auto-detection, no arguments
    with pytest.raises(ValueError, match="needs all of coordinator address"):
        dist.initialize("127.0.0.1:1234")                         # explicit flags keep their checks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHILD = r"""
import logging, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from hetclip import distributed as dist
logging.basicConfig(level=logging.INFO)
how = dist.initialize()
total = multihost_utils.process_allgather(np.array([jax.process_index() + 1]))
print("RESULT", how, jax.process_index(), jax.process_count(), jax.device_count(), int(np.sum(total)), flush=True)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_find_each_other_through_slurm_detection():
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_"))}
        env.update(SLURM, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), JAX_COORDINATOR_PORT=str(port),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    # stdout apart from stderr: native log lines on stderr may interleave with the RESULT line byte by byte
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join((o + e)[-3000:] for o, e in outs)
    results = sorted([ln for ln in o.splitlines() if ln.startswith("RESULT")][0].split()[1:] for o, _ in outs)
    # both processes: detected SLURM, ranks 0 and 1 of 2, 4 global devices, allgather saw both (1 + 2)
    assert results == [["slurm", "0", "2", "4", "3"], ["slurm", "1", "2", "4", "3"]]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hetclip_train_under_slurm_needs_no_coordinator_flags(tmp_path):
    from test_train_e2e import losses, train_cmd, write_config

    cfg = write_config(tmp_path, steps=3, every=3, synthetic=True)
    work = str(tmp_path / "slurm")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_"))}
        env.update(SLURM, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), JAX_COORDINATOR_PORT=str(port),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen(train_cmd(cfg, work), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    for rank, out in enumerate(outs):
        assert f"jax.distributed (slurm, auto-detected): process {rank} of 2, 2 local / 4 global devices" in out
    assert sorted(losses(work)) == [1, 2, 3]
