"""What hpcllm needs to know about Slurm: a launch sanity check and provenance.

Rank numbers never come from here (they come from MPI): with a launcher that
does not wire MPI to Slurm's PMI, every task sees ``SLURM_PROCID`` 0..n-1 but
MPI gives each of them a world of size 1, and the job would silently run n
copies of the same work. ``check_launch`` catches that.
"""

import os

from hpcllm.errors import HpcllmError

# Result attribute name -> Slurm environment variable (present only in a job).
_PROVENANCE = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT",
    "job_name": "SLURM_JOB_NAME",
    "nodelist": "SLURM_JOB_NODELIST",
    "ntasks": "SLURM_NTASKS",
    "cluster": "SLURM_CLUSTER_NAME",
}
_INTEGERS = {"job_id", "array_job_id", "array_task_id", "restart_count", "ntasks"}


def check_launch(world_size: int, env=os.environ) -> None:
    """Refuse a Slurm step of several tasks whose MPI world has one rank."""
    ntasks = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))
    if ntasks is not None and ntasks > 1 and world_size == 1:
        raise HpcllmError(
            f"Slurm started {ntasks} tasks but MPI sees a world of 1 rank (task "
            f"{env.get('SLURM_PROCID', '?')} on {env.get('SLURMD_NODENAME', '?')}): every task would redo "
            "the same work; launch with `srun --mpi=pmi2` (see `srun --mpi=list`) so that mpi4py "
            "can talk to Slurm's PMI, or use mpiexec inside the allocation")


def provenance(env=os.environ) -> dict:
    """Slurm job id, array job id/index, restart count, node list, ntasks: those present.

    Empty outside Slurm. ``restart_count`` is 0 on a first run inside Slurm
    (Slurm sets SLURM_RESTART_COUNT only after a requeue).
    """
    out = {}
    for key, var in _PROVENANCE.items():
        value = env.get(var)
        if value is None or value == "":
            continue
        out[key] = _int(value) if key in _INTEGERS and _int(value) is not None else value
    if "job_id" in out:
        out.setdefault("restart_count", 0)
    return out


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
