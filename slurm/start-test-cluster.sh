#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (for tests and trying
# the sbatch templates). Debian packages: slurm-wlm (slurmctld, slurmd,
# slurm-client) and munge. Must run as root; no systemd needed.
#
# Idempotent: if the node already answers `sinfo` as idle/mixed/allocated,
# it does nothing. Stop everything with slurm/stop-test-cluster.sh.
#
# Knobs (environment):
#   SLURM_TEST_CPUS      CPUs the node advertises (default 4). The node may
#                        advertise more CPUs than it has, so tests can run
#                        `-n 4` on a 2-core machine: SlurmdParameters=
#                        config_overrides makes slurmd trust slurm.conf
#                        instead of draining the node for "low CPU count".
#   SLURM_TEST_TIMEOUT   seconds to wait for the node to become idle (30).
#   SLURM_TEST_CLUSTER   ClusterName (default hpcllm-test).
#   SLURM_TEST_CRED_EXPIRE  step credential lifetime, s (default 5; Slurm's
#                        default is 120). A requeued job cannot start again
#                        before it has passed (its old credential is revoked),
#                        so this is also the requeue delay the tests wait for.
#
# MPI: MpiDefault=pmi2. The PyPI `mpich` wheel (MPICH 4/5, built-in PMI
# client) talks to Slurm's pmi2 plugin as is: `srun --mpi=pmi2 -n 2 python
# -c "from mpi4py import MPI; ..."` gives a world of size 2.
#
# Plugins are the cgroup-free ones (proctrack/linuxproc, task/none, no
# accounting) because containers and VMs without systemd have no delegated
# cgroup tree; the daemons and jobs run as root.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CPUS=${SLURM_TEST_CPUS:-4}
TIMEOUT=${SLURM_TEST_TIMEOUT:-30}
CLUSTER=${SLURM_TEST_CLUSTER:-hpcllm-test}
CRED_EXPIRE=${SLURM_TEST_CRED_EXPIRE:-5}
NODE=$(hostname -s)

die() { echo "start-test-cluster: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (starts munged, slurmctld, slurmd)"

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }

node_ready() {
    case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "start-test-cluster: installing slurm-wlm munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
}

# munged refuses a key or directories not owned by the user it runs as; the
# Debian package lays them out for the `munge` user, so run it as that user
# when it exists (the daemon is still started by root), else as root.
start_munge() {
    if pgrep -x munged >/dev/null && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown "$user:" /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    if [ "$user" = root ]; then
        munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    else
        runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    for _ in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munge does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
    # The node line: real sockets/memory from `slurmd -C`, CPU count from
    # SLURM_TEST_CPUS (one socket, one thread per core, so CPUs == cores).
    local hw mem
    hw=$(slurmd -C | head -n1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [ -n "$mem" ] || die "cannot read RealMemory from 'slurmd -C': $hw"
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    cat >"$CONF.tmp" <<EOF
# Written by hpcllm slurm/start-test-cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
# Look at pending jobs every few seconds (a requeued job becomes eligible by time, not by an event).
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_slurm() {
    if ! pgrep -x slurmctld >/dev/null; then
        slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
    fi
    if ! pgrep -x slurmd >/dev/null; then
        slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
    fi
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state
    while [ $SECONDS -lt $deadline ]; do
        state=$(node_state)
        case "$state" in
            idle|mixed|allocated) return 0 ;;
            down|drained|draining|drain)
                # Left over from an earlier run (e.g. a killed slurmd).
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE not idle after ${TIMEOUT}s (state: '${state:-no answer}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

# sinfo retries for ~10 s when no controller answers: ask only if the daemons run.
if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && node_ready; then
    echo "start-test-cluster: already up ($NODE $(node_state))"
    exit 0
fi
install_packages
start_munge
# Rewrite slurm.conf only while slurmctld is down: a running controller keeps
# the config it started with.
pgrep -x slurmctld >/dev/null || write_conf
start_slurm
wait_idle
echo "start-test-cluster: up: node $NODE idle, $CPUS CPUs, partition debug"
