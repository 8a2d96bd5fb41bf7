#!/bin/bash
# A real single-node SLURM cluster on this machine (Debian/Ubuntu, root, no systemd needed), for tests
# and local trials of slurm/train.sh.
#
#   eval "$(bash slurm/local_cluster.sh up)"   # install the packages if missing, start, print `export SLURM_CONF=...`
#   bash slurm/local_cluster.sh env            # print the `export SLURM_CONF=...` line only
#   bash slurm/local_cluster.sh down           # cancel the cluster's jobs, stop its daemons
#   bash slurm/local_cluster.sh install        # only install the packages if missing (as `up` does)
#
# All state (slurm.conf, munge key and socket, spool, state, logs, PID files) lives in $SLURM_LOCAL_DIR
# (default ${TMPDIR:-/tmp}/grounded-attention-slurm). `up` always starts from empty job state; a cluster
# already running from the same directory is stopped first. Daemons are found by their PID files and
# checked by name and command line before they are signalled; nothing is killed by name.
# Environment: SLURM_LOCAL_DIR, SLURM_LOCAL_CTLD_PORT (default 6817), SLURM_LOCAL_SLURMD_PORT (6818),
# SLURM_LOCAL_TIMEOUT (seconds to wait for an idle node, default 60).
# Logs go to stderr; stdout carries only the export line.
set -euo pipefail
umask 022

DIR=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/grounded-attention-slurm}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CONF=$DIR/etc/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local_cluster: $*" >&2; }
fail() {
    say "error: $*"
    local f
    for f in "$DIR"/log/*.log; do
        [[ -f $f ]] && { echo "--- $f (last lines)" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}
usage() {
    echo "usage: $0 up|down|env|install   (state in \$SLURM_LOCAL_DIR, now $DIR)" >&2
    exit 2
}

# pid_of NAME: the PID from $DIR/run/NAME.pid if that process is alive, is NAME, and was started with our $DIR.
pid_of() {
    local name=$1 file=$DIR/run/$1.pid pid
    [[ -s $file ]] || return 1
    pid=$(cat "$file" 2>/dev/null) || return 1   # the daemon may remove its pid file as it stops
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/" || return 1
    grep -q '^[^)]*) Z' "/proc/$pid/stat" 2>/dev/null && return 1   # a zombie has stopped
    echo "$pid"
}

install_packages() {
    if [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] &&
        command -v sbatch >/dev/null && command -v scontrol >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || fail "SLURM is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || fail "SLURM is not installed and there is no apt-get: install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || fail "apt-get update failed"
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2 ||
        fail "apt-get install ${PACKAGES[*]} failed"
}

write_conf() {
    local host node mem
    host=$(hostname -s)
    # The node line as slurmd sees the hardware; keep 10% of the memory for the daemons and the OS.
    node=$(/usr/sbin/slurmd -C | head -n 1)
    [[ $node =~ RealMemory=([0-9]+) ]] || fail "unexpected 'slurmd -C' output: $node"
    mem=${BASH_REMATCH[1]}
    node=${node/RealMemory=$mem/RealMemory=$((mem * 9 / 10))}
    mkdir -p "$DIR/etc"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a one-node cluster on localhost, everything under $DIR.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: works the same on any host.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Start batch jobs at submit time, not on the next 3-s scheduling tick; a backfill pass every second starts
# requeued jobs as soon as their BeginTime (requeue + cred_expire) has passed, not up to 30 s later.
SchedulerParameters=batch_sched_delay=0,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
# Reject at submit what this node can never run (else it pends forever and sbatch --wait hangs).
EnforcePartLimits=ALL
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
# sbatch --wait polls every 2 s only while MinJobAge/2 <= 2 (longer ages back off to 8 and 32 s).
MinJobAge=5
Waittime=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null | head -n 1; }

stop_daemons() {
    local name pid i
    if pid_of slurmctld >/dev/null && [[ -f $CONF ]]; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    for name in slurmd slurmctld munged; do
        pid=$(pid_of "$name") || { rm -f "$DIR/run/$name.pid"; continue; }
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 75; i++)); do
            pid_of "$name" >/dev/null || break
            sleep 0.2
        done
        if pid_of "$name" >/dev/null; then
            say "$name did not stop, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/run/$name.pid"
    done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up() {
    install_packages
    export SLURM_CONF=$CONF
    stop_daemons
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    mkdir -p "$DIR/state" "$DIR/spool/slurmd-$(hostname -s)" "$DIR/log" "$DIR/run" "$DIR/munge"
    write_conf
    local port
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_in_use "$port" && fail "port $port is in use (another cluster? set SLURM_LOCAL_CTLD_PORT/SLURM_LOCAL_SLURMD_PORT)"
    done
    getent hosts "$(hostname -s)" >/dev/null ||
        say "warning: $(hostname -s) does not resolve; jobs need MASTER_ADDR=127.0.0.1"

    # munged refuses a socket directory that is not world-executable and a key readable by others.
    chmod 755 "$DIR/munge"
    local d=$DIR
    while [[ $d != / ]]; do
        (((8#$(stat -c %a "$d") & 1) == 1)) ||
            fail "munged needs every directory above its socket to be world-executable: chmod o+x $d, or choose another SLURM_LOCAL_DIR"
        d=$(dirname "$d")
    done
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    /usr/sbin/munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/munge/munged.seed" \
        --log-file="$DIR/log/munged.log" || fail "munged did not start"
    munge -n -S "$DIR/munge/munge.socket" | unmunge -S "$DIR/munge/munge.socket" >/dev/null ||
        fail "munge credential round trip failed"

    /usr/sbin/slurmctld -f "$CONF" || fail "slurmctld did not start"
    local i
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep -q 'is UP' || fail "slurmctld does not answer after ${TIMEOUT}s"
    /usr/sbin/slurmd -f "$CONF" || fail "slurmd did not start"
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        [[ $(node_state) == idle ]] && break
        sleep 0.2
    done
    [[ $(node_state) == idle ]] || fail "node $(hostname -s) is '$(node_state)', not idle, after ${TIMEOUT}s"
    say "up: node $(hostname -s) idle; state in $DIR"
    echo "export SLURM_CONF=$CONF"
}

case ${1:-} in
up) up ;;
down)
    stop_daemons
    say "down"
    ;;
env) echo "export SLURM_CONF=$CONF" ;;
install) install_packages ;;
*) usage ;;
esac
