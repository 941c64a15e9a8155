#!/usr/bin/env bash
# A one-node Slurm cluster for tests/test_slurm.py (Debian slurm-wlm 22.05, no systemd needed).
#
#   bash tests/slurm_cluster.sh install     # apt-get slurm-wlm munge if missing; never fails (make test runs it)
#   bash tests/slurm_cluster.sh start DIR   # slurm.conf, state, logs, munge key and socket in DIR
#   bash tests/slurm_cluster.sh stop DIR    # kill DIR's daemons by pid file and wait; fine if already gone
#
# Then run Slurm commands with SLURM_CONF=DIR/slurm.conf. Everything is private to DIR: its own munged (own
# key and socket) and free ports, so clusters of concurrent test sessions, or a system Slurm, do not meet.
# The daemons run as root (SlurmUser=root, munged --force): start and stop need root.
set -euo pipefail

install() {
    if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ]; then
        echo "slurm: installed already ($(/usr/sbin/slurmctld -V))"
    elif [ "$(id -u)" != 0 ]; then
        echo "slurm: not installed, and installing needs root; tests/test_slurm.py will skip its cluster tests"
    elif ! command -v apt-get >/dev/null; then
        echo "slurm: not installed, and there is no apt-get; tests/test_slurm.py will skip its cluster tests"
    elif ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
        >/tmp/slurm-install.log 2>&1; then
        echo "slurm: apt-get install slurm-wlm munge failed (see /tmp/slurm-install.log); the cluster tests will skip"
    else
        echo "slurm: installed $(/usr/sbin/slurmctld -V)"
    fi
}

alive() {  # alive PIDFILE: the process named in the file runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

free_ports() {  # two TCP ports nothing listens on now
    python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))'
}

write_conf() {  # write_conf DIR CTLD_PORT SLURMD_PORT
    local dir=$1 cpus memory
    cpus=$(nproc)
    # Well under what the machine has: slurmd drains a node that reports less memory than configured.
    memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 2 ))
    cat >"$dir/slurm.conf" <<EOF
ClusterName=pixart-test
SlurmctldHost=localhost
SlurmctldPort=$2
SlurmdPort=$3
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Shorter waits than Slurm's defaults, for test speed: cred_expire also delays a requeued job's restart
# (120 s), the main scheduler runs every sched_interval (60 s), and a cancelled or requeued job's processes
# get KillWait seconds between SIGTERM and SIGKILL (30 s). Finished jobs stay in scontrol for MinJobAge.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
SchedulerParameters=sched_interval=2
KillWait=5
MinJobAge=600
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory
PartitionName=debug Nodes=localhost Default=YES State=UP MaxTime=INFINITE
EOF
}

start() {
    local dir ports
    dir=$(realpath -m "$1")
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 700 "$dir/munge"
    export SLURM_CONF=$dir/slurm.conf
    if alive "$dir/slurmctld.pid" || alive "$dir/slurmd.pid"; then
        echo "slurm: $dir runs already; keeping its slurm.conf"
    else
        read -r -a ports < <(free_ports)
        write_conf "$dir" "${ports[@]}"
    fi
    [ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key"
    alive "$dir/munge/munged.pid" || /usr/sbin/munged --force --key-file="$dir/munge/munge.key" \
        --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    alive "$dir/slurmctld.pid" || /usr/sbin/slurmctld -f "$SLURM_CONF"
    alive "$dir/slurmd.pid" || /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost  # -N: the hostname may differ
    local deadline=$((SECONDS + 20))
    while [ $SECONDS -lt $deadline ]; do
        if [[ "$(timeout 5 sinfo -h -n localhost -o %t 2>/dev/null)" =~ ^(idle|mix|alloc)$ ]]; then
            echo "slurm: cluster up (SLURM_CONF=$SLURM_CONF, $(nproc) CPUs)"
            return 0
        fi
        sleep 0.2
    done
    echo "slurm: the node did not come up in 20 s; logs in $dir/log" >&2
    timeout 5 sinfo >&2 || true
    return 1
}

stop() {
    local dir pids=() file pid left
    dir=$(realpath -m "$1")
    if alive "$dir/slurmctld.pid"; then  # jobs first, so no slurmstepd outlives the cluster
        SLURM_CONF=$dir/slurm.conf timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(SLURM_CONF=$dir/slurm.conf timeout 5 squeue -h 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    for file in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if alive "$file"; then pids+=("$(cat "$file")"); fi
    done
    [ ${#pids[@]} = 0 ] && return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        [ $left = 0 ] && { echo "slurm: cluster stopped"; return 0; }
        sleep 0.2
    done
    echo "slurm: still running after 10 s, killing: ${pids[*]}" >&2
    kill -9 "${pids[@]}" 2>/dev/null || true
}

case "${1:-}" in
    install) install ;;
    start) [ $# = 2 ] || { echo "usage: $0 start DIR" >&2; exit 2; }; start "$2" ;;
    stop) [ $# = 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$2" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
