# Shared body of the hpcllm sbatch templates; sourced, not run. Defines
# hpcllm_run JOB [ARGS...] and hpcllm_array_input LIST.
#
# hpcllm_run: runs `srun --mpi=pmi2 hpcllm JOB ARGS...` in the background and
# waits for it. USR1 and TERM sent to the batch shell (Slurm's
# --signal=B:USR1@300, scancel --batch --signal=...) are forwarded to srun as
# USR1, which srun forwards to every rank; hpcllm then stops at the next batch
# boundary, keeps only complete shards, writes OUT/STOPPED.json and exits 75
# (EXIT_REQUEUE in hpcllm/signals.py). On 75 this script runs
# `scontrol requeue $SLURM_JOB_ID`; the job comes back with
# SLURM_RESTART_COUNT+1 and hpcllm resumes from the complete shards. Any
# other exit code ends the job with that code.
#
# Knobs (environment of the submitting shell; sbatch --export=ALL passes it):
#   HPCLLM_CMD           command that runs hpcllm (default: hpcllm), split on
#                        spaces, e.g. "python -m hpcllm.cli"
#   HPCLLM_SRUN_ARGS     extra srun arguments, split on spaces (e.g. "--cpu-bind=cores")
#   HPCLLM_MAX_RESTARTS  do not requeue once SLURM_RESTART_COUNT reaches this (default 10)

HPCLLM_EXIT_REQUEUE=75

_hpcllm_log() { echo "[hpcllm-slurm $(date +%H:%M:%S)] $*"; }

hpcllm_run() {
    local job=$1; shift
    local restarts=${SLURM_RESTART_COUNT:-0}
    local array=""
    [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && array=" array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    if [ "$restarts" -gt 0 ]; then
        _hpcllm_log "restart $restarts of job ${SLURM_JOB_ID}${array}"
    fi
    _hpcllm_log "start job ${SLURM_JOB_ID}${array} restart_count=$restarts ntasks=${SLURM_NTASKS:-?} nodes=${SLURM_JOB_NODELIST:-?}: ${HPCLLM_CMD:-hpcllm} $job $*"

    # Traps first: a signal that arrives before srun exists is kept and sent on
    # as soon as srun runs (the default action would kill this shell).
    _hpcllm_srun="" _hpcllm_signal=""
    trap '_hpcllm_forward USR1' USR1
    trap '_hpcllm_forward TERM' TERM
    # shellcheck disable=SC2086  # the two knobs are word lists on purpose
    srun --mpi=pmi2 ${HPCLLM_SRUN_ARGS:-} ${HPCLLM_CMD:-hpcllm} "$job" "$@" &
    _hpcllm_srun=$!
    [ -n "$_hpcllm_signal" ] && _hpcllm_forward "$_hpcllm_signal"

    # A trapped signal interrupts `wait` (status > 128) while srun still runs:
    # wait again. bash keeps the exit status of a finished child, so a second
    # wait after srun ended returns srun's real status.
    local rc
    while :; do
        _hpcllm_signal=""
        wait "$_hpcllm_srun"; rc=$?
        [ -z "$_hpcllm_signal" ] && break
    done
    # srun has ended: a late signal must not kill this shell before it can requeue.
    trap '' USR1 TERM
    _hpcllm_finish "$rc"
}

# srun passes SIGUSR1 on to every task, but on SIGTERM it kills the step
# ("forcing job termination"), so a TERM is forwarded as USR1: hpcllm treats
# both alike (stop at the next batch boundary).
_hpcllm_forward() {
    _hpcllm_signal=$1
    [ -n "$_hpcllm_srun" ] || return 0
    _hpcllm_log "got SIG$1, forwarding it to srun (pid $_hpcllm_srun) as SIGUSR1"
    kill -s USR1 "$_hpcllm_srun" 2>/dev/null || true
}

_hpcllm_finish() {
    local rc=$1 max=${HPCLLM_MAX_RESTARTS:-10} restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$rc" -ne "$HPCLLM_EXIT_REQUEUE" ]; then
        _hpcllm_log "end job ${SLURM_JOB_ID} exit=$rc"
        exit "$rc"
    fi
    if [ "$restarts" -ge "$max" ]; then
        _hpcllm_log "stopped early (exit $rc) but restart count $restarts reached HPCLLM_MAX_RESTARTS=$max: not requeueing"
        exit "$rc"
    fi
    _hpcllm_log "stopped early (exit $rc): requeueing job ${SLURM_JOB_ID}"
    # Requeueing a running job ends this script; the exit below is only reached
    # if the requeue was refused (e.g. a job submitted with --no-requeue).
    scontrol requeue "${SLURM_JOB_ID}" || _hpcllm_log "scontrol requeue ${SLURM_JOB_ID} failed"
    exit "$rc"
}

# Print the corpus for this array task: the line numbered SLURM_ARRAY_TASK_ID
# (0-based) of LIST, counting only lines that are not blank or # comments.
hpcllm_array_input() {
    local list=$1 line
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || { echo "hpcllm-slurm: error: not an array job (submit with --array=0-N)" >&2; return 2; }
    [ -r "$list" ] || { echo "hpcllm-slurm: error: cannot read corpus list $list" >&2; return 2; }
    line=$(grep -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$list" | sed -n "$((SLURM_ARRAY_TASK_ID + 1))p")
    [ -n "$line" ] || { echo "hpcllm-slurm: error: $list has no entry $SLURM_ARRAY_TASK_ID (array indices are 0-based)" >&2; return 2; }
    echo "$line"
}
