"""Processes, devices and shardings: ``jax.distributed`` start-up, the device mesh, FSDP rules.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose
parameters and optimizer state are also sharded). The batch is split over both; a parameter is
split over ``fsdp`` along its largest dimension that divides evenly (big_vision's rule), else kept
whole on every device.
"""
from __future__ import annotations

import logging
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


# Environment variables JAX 0.10's cluster detectors (jax/_src/clusters/) read. SLURM: one process per
# task, the coordinator on the step's first node, each process sees the device numbered by its local
# task id. Open MPI: mpirun's URI names the coordinator host.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OMPI_VARS = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
TPU_HOSTS_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def _tpu_chips() -> int:
    """TPU chips on this host (JAX's own PCI scan; 0 where it is unavailable)."""
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 - a private helper; without it, no TPU detection
        return 0


def detect_cluster(environ=None, tpu_chips=None) -> str | None:
    """The multi-process cluster this process runs in, as JAX's auto-detection would find it
    (``jax.distributed.initialize()`` without arguments), or ``None``.

    ``"slurm"``: inside an ``srun`` step of more than one task; ``"ompi"``: started by Open MPI's
    ``mpirun``/``mpiexec``; ``"tpu"``: a Cloud TPU VM (TPU chips on the PCI bus, or GKE's TPU worker
    list of more than one host). One-task SLURM steps and single-host runs are not clusters.
    """
    env = os.environ if environ is None else environ
    if all(v in env for v in SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if all(v in env for v in OMPI_VARS) and int(env["OMPI_COMM_WORLD_SIZE"]) > 1:
        return "ompi"
    hosts = next((env[v] for v in TPU_HOSTS_VARS if env.get(v)), "")
    if len(hosts.split(",")) > 1:
        return "tpu"
    if (_tpu_chips() if tpu_chips is None else tpu_chips) > 0:
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True) -> str | None:
    """Start ``jax.distributed`` when several processes are asked for; returns how (``"explicit"``, the
    detected cluster's name, or ``None`` for a single process).

    Explicit values come from the arguments or from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``. Without any of them and with ``auto``, a cluster that JAX detects by itself
    (``detect_cluster``: SLURM, Open MPI, Cloud TPU) is initialised with JAX's auto-detection. With
    neither (one process) this does nothing.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if not coordinator and not num_processes:
        cluster = detect_cluster() if auto else None
        if cluster is None:
            return None
        jax.distributed.initialize()
        # one line per process on stderr: which cluster JAX found and who this process is
        print(f"jax.distributed ({cluster}, auto-detected): process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices", file=sys.stderr, flush=True)
        return cluster
    if not coordinator or num_processes is None or process_id is None:
        raise ValueError("multi-process training needs all of coordinator address, number of processes and "
                         f"process id; got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", process_id,
             num_processes, jax.local_device_count(), jax.device_count())
    return "explicit"


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all); ``-1`` takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or (data != -1 and data < 1):
        raise ValueError(f"mesh sizes must be positive (or -1 for data); got data={data}, fsdp={fsdp}")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} × fsdp={fsdp} = {data * fsdp} but there are {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_check(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh "
                         f"{dict(mesh.shape)}; use a multiple of {n}")
    if global_batch % jax.process_count():
        raise ValueError(f"{what}={global_batch} is not divisible by the {jax.process_count()} processes")


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2 ** 12) -> P:
    """Partition spec for one parameter: its largest evenly divisible dimension over ``fsdp``."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, tree):
    """NamedShardings for a tree of arrays (or shape structs) under the FSDP rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global ``jax.Array`` sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def barrier(name: str) -> None:
    """All processes wait here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    return jax.process_index() == 0
