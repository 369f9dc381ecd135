#!/usr/bin/env bash
# A real Slurm 22.05 cluster of four nodes on this one machine, for tests and benchmarks:
# munged, MariaDB + slurmdbd (accounting: without it submitit cannot see a killed job),
# slurmctld, and four slurmd (n1..n4, all on 127.0.0.1, ports 17001-17004), 8 fake GPUs each
# (gres files are symlinks to /dev/null). Needs root and Debian's packages, which `install` adds.
#
#   bash scripts/slurm_cluster.sh install   # apt-get the packages (idempotent)
#   bash scripts/slurm_cluster.sh up        # install if needed, start every daemon, wait for idle nodes
#   bash scripts/slurm_cluster.sh down      # stop the daemons this script started
#   bash scripts/slurm_cluster.sh status    # exit 0 when all four nodes answer
#
# `up` is idempotent: when the cluster already answers it only checks. It refuses to overwrite a
# /etc/slurm/slurm.conf that it did not write (a real cluster's configuration).
set -euo pipefail

NODES=4
GPUS_PER_NODE=8
CPUS_PER_NODE=16
MEMORY_MB=64000
CLUSTER=deepeyes
RUN=/run/deepeyes-slurm
LOGS=/var/log/deepeyes-slurm
MARK="# written by deepeyes scripts/slurm_cluster.sh"
PACKAGES="slurmctld slurmd slurmdbd slurm-client munge mariadb-server"

log() { echo "slurm_cluster: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (it writes /etc/slurm and starts system daemons)"; exit 2
  fi
}

install_packages() {
  need_root
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
     && command -v mariadbd >/dev/null && command -v sbatch >/dev/null; then
    return
  fi
  log "installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null; }
}

nodes_answer() {
  # All nodes known to slurmctld and none down / not responding.
  local states
  states=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -cE '^n[0-9]+ (idle|mix|alloc|comp)')" -ge "$NODES" ]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out after ${seconds}s waiting for $what (logs: $LOGS)"; exit 1; fi
    sleep 0.2
  done
}

write_config() {
  local host; host=$(hostname)
  if [ -f /etc/slurm/slurm.conf ] && ! grep -qF "$MARK" /etc/slurm/slurm.conf; then
    log "/etc/slurm/slurm.conf exists and was not written by this script; not touching a real cluster"; exit 2
  fi
  mkdir -p /etc/slurm "$RUN" "$LOGS" /var/spool/deepeyes-slurm/ctld /var/spool/deepeyes-slurm/d
  for i in $(seq 0 $((GPUS_PER_NODE - 1))); do ln -sf /dev/null "$RUN/gpu$i"; done
  # Every node name resolves to loopback; they all share this machine's hostname, so jobs learn
  # which node they are on from SLURMD_NODENAME.
  for i in $(seq 1 $NODES); do
    grep -qE "^127\.0\.0\.1 n$i\$" /etc/hosts || echo "127.0.0.1 n$i" >> /etc/hosts
  done
  cat > /etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials expire after 10 s instead of 120 s: a requeued job restarts ~25 s after its signal, not ~140 s.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/deepeyes-slurm/ctld
SlurmdSpoolDir=/var/spool/deepeyes-slurm/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
# Nodes claim the CPUs, memory and GPUs written here, not what this machine has.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS_PER_NODE RealMemory=$MEMORY_MB Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > /etc/slurm/gres.conf <<EOF
$MARK
AutoDetect=off
NodeName=n[1-$NODES] Name=gpu File=$RUN/gpu[0-$((GPUS_PER_NODE - 1))]
EOF
  cat > /etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=deepeyes-local
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

running() {  # running PIDFILE: it names a live process that is one of these daemons. /run is on
  # disk here, so a machine restored from a snapshot finds old pidfiles whose pids others now hold.
  local pid
  [ -f "$1" ] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null \
    && grep -qxE 'munged|mariadbd|slurmdbd|slurmctld|slurmd' "/proc/$pid/comm" 2>/dev/null
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  if ! running /run/munge/munged.pid; then
    runuser -u munge -- munged
  fi
  wait_for 10 munged munge -n
}

start_mariadb() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! running /run/mysqld/mysqld.pid; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 --skip-log-bin \
      >>"$LOGS/mariadb.log" 2>&1 < /dev/null &
  fi
  wait_for 60 mariadb mariadb -e 'select 1'
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'deepeyes-local';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm() {
  running "$RUN/slurmdbd.pid" || slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  local restarted=0
  running "$RUN/slurmctld.pid" || { slurmctld; restarted=1; }
  wait_for 30 slurmctld scontrol ping
  for i in $(seq 1 $NODES); do
    running "$RUN/slurmd-n$i.pid" || slurmd -N "n$i"
  done
  wait_for 60 "$NODES idle nodes" nodes_answer
  [ $restarted = 0 ] || clear_stale_jobs
}

clear_stale_jobs() {
  # A controller started afresh recovers the jobs of its last run from its state files (a machine
  # restored from a snapshot taken mid-job, or daemons killed under a test). Their processes are
  # gone, yet the controller holds their nodes until it notices, which took 32 minutes once: every
  # new job pends behind them. On this one-machine cluster nothing can have survived, so cancel them.
  local stale
  stale=$(squeue -h -o %i | tr '\n' ' ')
  [ -n "${stale// }" ] || return 0
  log "cancelling jobs recovered from the controller's last run (their processes are gone): $stale"
  # shellcheck disable=SC2086
  scancel $stale
  wait_for 60 "the stale jobs to leave the queue" test -z "$(squeue -h -o %i)"
}

up() {
  need_root
  if [ -f /etc/slurm/slurm.conf ] && grep -qF "$MARK" /etc/slurm/slurm.conf && nodes_answer; then
    return
  fi
  install_packages
  write_config
  start_munge
  start_mariadb
  start_slurm
  log "up: $(sinfo -h -o '%D nodes %G %t' | tr '\n' ' ')"
}

stop_pidfile() {  # stop_pidfile PIDFILE: TERM the daemon it names, then wait for it to exit
  local pidfile=$1 pid
  running "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  need_root
  for i in $(seq 1 $NODES); do stop_pidfile "$RUN/slurmd-n$i.pid"; done
  stop_pidfile "$RUN/slurmctld.pid"
  stop_pidfile "$RUN/slurmdbd.pid"
  stop_pidfile /run/mysqld/mysqld.pid
  stop_pidfile /run/munge/munged.pid
}

case "${1:-}" in
  install) install_packages ;;
  up) up ;;
  down) down ;;
  status) nodes_answer ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
