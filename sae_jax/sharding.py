"""Spreading a grid over devices: a 1-D mesh ('grid',), per-cell leaves sharded on it.

Every leaf of a size group has a leading cell axis; groups are padded (grid.init_grid's
`pad_multiple`, `grid.padded_size`) to a multiple of the device count, so that axis splits
evenly, and so that a device holds a single cell only of a group that has one. The step counter,
the data key and the toy world are replicated, so every device draws the same batch and no
collective is needed: the cells never communicate.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax import grid
from sae_jax.errors import UsageError

AXIS = "grid"
HEARTBEAT_S = int(os.environ.get("SAE_JAX_HEARTBEAT_TIMEOUT", "60"))  # seconds, --distributed


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `devices` visible devices (all of them by default)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise UsageError(f"`devices` must be in [1, {len(available)}] (visible devices), got {n}", field="devices")
    return Mesh(np.array(available[:n]), (AXIS,))


def cell_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(state: grid.GridState, mesh: Mesh) -> grid.GridState:
    """The sharding of every leaf: groups on 'grid', the rest replicated."""
    groups = tuple(jax.tree.map(lambda _: cell_sharding(mesh), g) for g in state.groups)
    return grid.GridState(groups, replicated(mesh), replicated(mesh))


def to_host(tree):
    """Every leaf as a NumPy array in this process. On several processes it is an all-gather:
    every process must call it at the same point."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(a):  # only arrays spanning other processes' devices need the gather
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return multihost_utils.process_allgather(a, tiled=True)
        return jax.device_get(a)
    return jax.tree.map(one, tree)


def gather_to_host(state: grid.GridState) -> grid.GridState:
    """On several processes, every process gets the whole grid (for evaluation and outputs)."""
    return state if jax.process_count() == 1 else to_host(state)


def replicate(tree, mesh: Mesh):
    """Host values every process holds alike, as arrays replicated over the mesh."""
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), replicated(mesh)), tree)


def shard_state(state: grid.GridState, mesh: Mesh) -> grid.GridState:
    """Places the state on the mesh; each group's cell count must divide evenly."""
    for g in state.groups:
        if g.valid.shape[0] % mesh.devices.size:
            raise ValueError(f"a group of {g.valid.shape[0]} cells does not split over "
                             f"{mesh.devices.size} devices; init_grid(pad_multiple=...)")
    return jax.device_put(state, state_shardings(state, mesh))


def initialize_distributed() -> None:
    """jax.distributed.initialize(): JAX's cluster detection (TPU pods, SLURM, Open MPI), or
    JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment."""
    kwargs = {}
    try:
        for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if os.environ.get(env):
                kwargs[arg] = int(os.environ[env])
    except ValueError:
        raise UsageError("--distributed: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
    # A process whose peer died learns it at its next collective (cli.main prints one line and
    # exits) or from the coordination service within ~HEARTBEAT_S seconds; it never waits on.
    jax.config.update("jax_enable_preemption_service", False)  # its own noisy error path
    try:
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=HEARTBEAT_S,
                                   shutdown_timeout_seconds=HEARTBEAT_S)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's cluster setup
        addr = os.environ.get("JAX_COORDINATOR_ADDRESS", "unset")
        raise UsageError(f"--distributed: jax.distributed.initialize() failed "
                         f"(JAX_COORDINATOR_ADDRESS={addr}): {str(e).splitlines()[0]}") from None
