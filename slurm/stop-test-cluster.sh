#!/usr/bin/env bash
# Stop the one-node test cluster started by slurm/start-test-cluster.sh:
# slurmd, slurmctld, then munged, each by the pid in its pid file. Running
# jobs are killed with their slurmd. Safe to run when nothing is running.
set -uo pipefail

stop_pidfile() {  # name pidfile
    local pid
    [ -s "$2" ] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop-test-cluster: $1 ($pid) ignores SIGTERM, sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$2"
}

[ "$(id -u)" = 0 ] || { echo "stop-test-cluster: error: must run as root" >&2; exit 1; }
stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid
echo "stop-test-cluster: stopped"
