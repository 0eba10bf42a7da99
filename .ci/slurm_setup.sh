#!/usr/bin/env bash
# Starts a one-machine Slurm cluster with two nodes (two slurmd daemons, n1 and n2, on distinct ports), CPU only,
# for tests/launch/test_slurm.py. Needs root and Debian's packages; exits non-zero saying why when it cannot.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm_setup: needs root"; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null
fi
host=$(hostname -s)
mkdir -p /etc/munge /etc/slurm /run/munge /var/lib/munge /var/log/munge /var/log/slurm /var/spool/slurmctld \
  /var/spool/slurmd-n1 /var/spool/slurmd-n2
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge: /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged --force
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=fp8pb
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd-%n
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=2000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=2000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 1
slurmctld -c
slurmd -N n1
slurmd -N n2
for _ in $(seq 60); do
  if [ "$(sinfo -h -o '%D %t' 2>/dev/null | awk '$2=="idle"{n+=$1} END{print n+0}')" -ge 2 ]; then
    sinfo; exit 0
  fi
  sleep 1
done
echo "slurm_setup: the two nodes did not come up idle:"; sinfo || true
tail -n 20 /var/log/slurm/*.log || true
exit 1
