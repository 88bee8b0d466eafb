"""How this process was launched: by an MPI launcher (mpiexec, srun) with several ranks, or alone.

``launched_world`` lets a command that also runs without MPI (``hpcllm
convert``, ``hpcllm filter``) use the world when there is one, and never
initialise MPI when there is none.  ``check_launch`` catches a Slurm step
whose tasks were not wired to MPI: rank numbers never come from Slurm's
environment (they come from MPI), and with a launcher that does not speak
Slurm's PMI every task sees ``SLURM_PROCID`` 0..n-1 but MPI gives each of them
a world of size 1, so the job would silently run n copies of the same work.
"""

import os

from hpcllm.errors import HpcllmError

# What MPI launchers put into each rank's environment: the world size (MPICH's Hydra and Slurm's
# PMI-2, Open MPI, PMIx) ...
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
# ... or, with other launchers, only a rank or the ranks on this node.
_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS")


def launcher_size(env=os.environ) -> int | None:
    """The world size an MPI launcher announced in ``env``; 0 when one is seen but gives no size;
    None when none is seen (a plain process)."""
    for key in _SIZE_VARIABLES:
        size = env_int(env.get(key))
        if size is not None:
            return size
    return 0 if any(key in env for key in _RANK_VARIABLES) else None


def launched_world(env=os.environ):
    """mpi4py's ``COMM_WORLD`` when this process is one of several ranks started by mpiexec / srun,
    else None.  MPI is initialised only when the environment shows a launcher that may have
    started several ranks."""
    size = launcher_size(env)
    if size is None or size == 1:
        return None
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return world if world.Get_size() > 1 else None


def check_launch(world_size: int, env=os.environ) -> None:
    """Refuse a Slurm step of several tasks whose MPI world has one rank."""
    ntasks = env_int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))
    if ntasks is not None and ntasks > 1 and world_size == 1:
        raise HpcllmError(
            f"Slurm started {ntasks} tasks but MPI sees a world of 1 rank (task "
            f"{env.get('SLURM_PROCID', '?')} on {env.get('SLURMD_NODENAME', '?')}): every task would redo "
            "the same work; launch with `srun --mpi=pmi2` (see `srun --mpi=list`) so that mpi4py "
            "can talk to Slurm's PMI, or use mpiexec inside the allocation")


def env_int(value) -> int | None:
    """An environment variable's integer value; None when unset or not an integer."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
