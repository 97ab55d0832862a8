#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests/slurm/ (Debian's slurm-wlm and munge; root).
#
#   tests/slurm/cluster.sh start      munged (unless one answers), slurmctld, and slurmd for:
#                                       - node "$(hostname)" at 127.0.0.1, partition `local` (default)
#                                       - two more nodes dsv3n1 / dsv3n2, each in its own network
#                                         namespace (veth to a bridge, 10.213.77.0/24, eth0 inside),
#                                         partition `twonode`; skipped with a message where
#                                         `ip netns add` is not allowed
#   tests/slurm/cluster.sh stop       stop what start started; remove the namespaces, the bridge,
#                                     the /etc/hosts lines and the state directory
#   tests/slurm/cluster.sh status     sinfo of the running cluster
#   eval "$(tests/slurm/cluster.sh env)"   SLURM_CONF for sbatch/srun/scontrol in this shell
#
# Everything lives in $DSV3_SLURM_DIR (default /tmp/dsv3-slurm): slurm.conf, state, spool, logs,
# pid files. The tests find the cluster through SLURM_CONF or that directory, and skip when it is
# not running (DSV3_REQUIRE_SLURM=1 turns the skip into a failure; .ci/run sets it).
#
# Why these settings (DESIGN.md, known pitfalls): slurmctld -D -c -i (foreground, fresh state,
# ignore stale files); proctrack/linuxproc and task/none (no cgroup plugins, which a container
# rarely allows); select/cons_tres; SlurmctldHost is the machine's real hostname, with the
# bridge address when namespace nodes must reach it; slurmd in a namespace starts through
# `nsenter --net=` (`ip netns exec` remounts /sys and slurmd then fails on cgroups).
# Traffic stays on this machine: loopback and the addresses of the namespaces made here.
set -euo pipefail

DIR=${DSV3_SLURM_DIR:-/tmp/dsv3-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname)
SUBNET=10.213.77            # the bridge is .1 (slurmctld's address for the namespace nodes)
BRIDGE=dsv3br0
NS_NODES=(dsv3n1 dsv3n2)    # node i+1 lives in namespace dsv3n{i+1} at $SUBNET.$((i+2))
HOSTS_TAG="# dsv3-slurm-test"

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

need_tools() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd and munged run as root here)"
    local t
    for t in slurmctld slurmd sbatch srun scontrol sinfo munged munge; do
        command -v "$t" >/dev/null || die "$t not found: apt-get install slurm-wlm munge"
    done
}

# ---------------------------------------------------------------------------------- munge
start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already answers; using it"
        return
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
    runuser -u munge -- munged          # daemonises; writes /run/munge/munged.pid
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$DIR/munged.pid"   # ours: stop ends it
}

# ------------------------------------------------------------------- network namespaces
netns_up() {
    # Returns 1 (and leaves nothing behind) where namespaces or bridges are not allowed.
    ip netns add dsv3probe 2>/dev/null || return 1
    ip netns del dsv3probe
    ip link add "$BRIDGE" type bridge 2>/dev/null || return 1
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i ns addr
    for i in "${!NS_NODES[@]}"; do
        ns=${NS_NODES[$i]}; addr=$SUBNET.$((i + 2))
        ip netns add "$ns"
        ip link add "dsv3v$((i + 1))" type veth peer name "dsv3p$((i + 1))"
        ip link set "dsv3v$((i + 1))" master "$BRIDGE" up
        ip link set "dsv3p$((i + 1))" netns "$ns"
        # the same interface name in every namespace, so one GLOO_SOCKET_IFNAME fits all nodes
        ip -n "$ns" link set "dsv3p$((i + 1))" name eth0
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        echo "$addr $ns $HOSTS_TAG" >>/etc/hosts
    done
    # slurmctld's name must resolve too; inside a namespace 127.0.0.1 is that namespace's own
    # loopback, so the nodes reach slurmctld at the bridge address given in SlurmctldHost.
    return 0
}

netns_down() {
    local i
    for i in "${!NS_NODES[@]}"; do
        ip netns del "${NS_NODES[$i]}" 2>/dev/null || true     # also removes the veth pair
        ip link del "dsv3v$((i + 1))" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
        # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file
        local kept; kept=$(grep -v "$HOSTS_TAG" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

# ------------------------------------------------------------------------------ config
write_conf() {
    local two=$1 cpus ctl
    cpus=$(nproc)
    ctl=$HOST
    [ "$two" = 1 ] && ctl="$HOST($SUBNET.1)"
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a test cluster on one machine.
ClusterName=dsv3test
SlurmctldHost=$ctl
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again cred_expire + 1 s after the requeue (default 120 s)
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
# time for a job to save its checkpoint between SIGTERM (scancel) and SIGKILL
KillWait=60
# finished jobs stay visible to scontrol for 10 minutes (there is no accounting database)
MinJobAge=600
# schedule every 2 s, not 60: a requeued job starts as soon as it is eligible again
SchedulerParameters=sched_interval=2,bf_interval=1
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if [ "$two" = 1 ]; then
        cat >>"$CONF" <<EOF
NodeName=${NS_NODES[0]} NodeAddr=$SUBNET.2 CPUs=$cpus State=UNKNOWN
NodeName=${NS_NODES[1]} NodeAddr=$SUBNET.3 CPUs=$cpus State=UNKNOWN
PartitionName=twonode Nodes=${NS_NODES[0]},${NS_NODES[1]} Default=NO MaxTime=INFINITE State=UP
EOF
    fi
}

wait_idle() {
    local want=$1 n
    for _ in $(seq 120); do
        n=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l)
        [ "$n" -ge "$want" ] && return 0
        sleep 0.5
    done
    SLURM_CONF=$CONF sinfo -N >&2 || true
    return 1
}

# ------------------------------------------------------------------------------ verbs
start() {
    need_tools
    if [ -f "$DIR/slurmctld.launcher.pid" ]; then
        log "a cluster from an earlier start is in $DIR: stopping it first"
        stop
    fi
    rm -rf "$DIR"; mkdir -p "$DIR/state" "$DIR/spool"
    getent hosts "$HOST" >/dev/null || { echo "127.0.0.1 $HOST $HOSTS_TAG" >>/etc/hosts; }
    start_munge
    local two=0 nodes=1
    netns_down                          # leftovers of an earlier run that was killed
    if netns_up; then two=1; nodes=3; else
        netns_down
        log "network namespaces not available here: only the one-node partition 'local'"
    fi
    write_conf "$two"
    slurmctld -D -c -i -f "$CONF" >>"$DIR/slurmctld.out" 2>&1 &
    echo $! >"$DIR/slurmctld.launcher.pid"
    slurmd -D -f "$CONF" -N "$HOST" >>"$DIR/slurmd-$HOST.out" 2>&1 &
    echo $! >"$DIR/slurmd-$HOST.launcher.pid"
    if [ "$two" = 1 ]; then
        local ns
        for ns in "${NS_NODES[@]}"; do
            nsenter --net="/var/run/netns/$ns" slurmd -D -f "$CONF" -N "$ns" >>"$DIR/slurmd-$ns.out" 2>&1 &
            echo $! >"$DIR/slurmd-$ns.launcher.pid"
        done
    fi
    if ! wait_idle "$nodes"; then
        tail -n 20 "$DIR"/*.log >&2 || true
        die "nodes did not come up idle within 60 s (logs in $DIR)"
    fi
    log "running: $(SLURM_CONF=$CONF sinfo -h -o '%P %D %t' | tr '\n' ';')  (SLURM_CONF=$CONF)"
}

stop() {
    local f pid
    if [ -f "$CONF" ]; then
        SLURM_CONF=$CONF timeout 10 scancel --user=root --full 2>/dev/null || true
    fi
    for f in "$DIR"/slurmd-*.launcher.pid "$DIR"/slurmctld.launcher.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null || true
    done
    for f in "$DIR"/slurmd-*.launcher.pid "$DIR"/slurmctld.launcher.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -f "$DIR/munged.pid" ]; then
        kill -TERM "$(cat "$DIR/munged.pid")" 2>/dev/null || true
    fi
    netns_down
    rm -rf "$DIR"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
