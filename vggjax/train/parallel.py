"""Data parallelism with jax.sharding: a 1-D "data" mesh, replicated state, batches split across devices.

No pmap and no hand-written collectives: the step functions are ordinary `jax.jit` programs whose
inputs carry shardings, and XLA inserts the gradient all-reduce.

Multi-host launch (one process per host, every process runs the same script)::

    # on each host i of N; host 0's address is the coordinator
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \\
        python examples/finetune_catsdogs.py ...

    # or under Slurm / Open MPI, which JAX detects by itself:
    srun --ntasks-per-node=1 python examples/finetune_catsdogs.py ...

The example calls `initialize_distributed()` (with --data-parallel) before any other JAX call.
Each process runs its own input pipeline over its share of the data (`data.Split.shard`: of
every global batch of `--batch-size` examples, process i reads rows i*B/n .. (i+1)*B/n), and
`shard_batch` assembles the per-process rows into one global array; the global batch must
divide by the total device count.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> bool:
    """Call jax.distributed.initialize() when the environment describes a multi-process job.

    Multi-process means JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) is
    set, or Slurm (SLURM_NTASKS > 1) or Open MPI (OMPI_COMM_WORLD_SIZE > 1) launched several
    tasks. Returns True when it initialized, False for a single-process run (nothing to do).
    Must run before any other JAX call.
    """
    if coordinator := os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three "
                             "to launch a multi-process run")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()  # JAX reads the cluster's own variables
        return True
    return False


def make_mesh(devices=None) -> Mesh:
    """1-D mesh named "data" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: shardings are annotations XLA propagates, not part of the array types.
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis across the "data" axis of `mesh`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """Put a full copy of every leaf of `tree` (parameters, optimizer state) on every device."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch, mesh: Mesh):
    """This process's batch (dict of NumPy arrays, leading axis B) -> global jax.Arrays split over devices.

    Each process passes its own B examples; the global batch is B * jax.process_count().
    ValueError when that does not divide by the number of devices in `mesh`.
    """
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()

    def put(x):
        x = np.asarray(x)
        global_size = x.shape[0] * n_proc
        if global_size % mesh.size:
            raise ValueError(
                f"global batch {global_size} ({x.shape[0]} per process x {n_proc} process(es)) "
                f"does not divide by the {mesh.size} devices of the mesh; use a batch size that "
                f"is a multiple of {mesh.size // np.gcd(mesh.size, n_proc)} per process")
        return jax.make_array_from_process_local_data(sharding, x, (global_size, *x.shape[1:]))

    return jax.tree.map(put, batch)
