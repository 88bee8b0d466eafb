"""What hpcllm records about Slurm: the job's provenance.

Rank numbers never come from Slurm's environment (they come from MPI); the
launch sanity check (Slurm tasks but a world of one rank) is
``hpcllm.world.launch.check_launch``.
"""

import os

from hpcllm.world.launch import env_int

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
        out[key] = env_int(value) if key in _INTEGERS and env_int(value) is not None else value
    if "job_id" in out:
        out.setdefault("restart_count", 0)
    return out
