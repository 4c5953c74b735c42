#!/usr/bin/env bash
# A one-node SLURM cluster on this Debian machine, for trying the cluster path and for CI.
#   sudo scripts/local_slurm.sh        start it (idempotent: a running cluster is left as it is);
#                                      prints the partition name
#   sudo scripts/local_slurm.sh stop   stop it
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge. No cgroups, no accounting:
# ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, one node with this machine's CPUs and
# memory, one partition ($SLURM_PARTITION, default "debug").
set -euo pipefail
PARTITION=${SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
}

if [[ "${1:-start}" == stop ]]; then
  stop
  echo "local SLURM cluster stopped"
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "local_slurm.sh: run it as root: it starts munged, slurmctld and slurmd" >&2
  exit 2
fi
for cmd in munged slurmctld slurmd sinfo; do
  command -v "$cmd" >/dev/null || { echo "local_slurm.sh: $cmd not found: apt-get install -y slurm-wlm munge" >&2; exit 2; }
done

if sinfo -h -p "$PARTITION" -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
  echo "$PARTITION"
  exit 0
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 60); do
  if sinfo -h -p "$PARTITION" -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    echo "$PARTITION"
    exit 0
  fi
  sleep 1
done
echo "local_slurm.sh: the node did not come up; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" >&2
exit 1
