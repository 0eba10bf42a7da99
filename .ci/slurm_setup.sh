#!/usr/bin/env bash
# A one-machine Slurm cluster with two CPU-only nodes, n1 and n2 (two slurmd daemons on distinct ports), for
# tests/launch/test_slurm.py. Debian bookworm packages, daemons started directly (no systemd). Needs root.
#
#   bash .ci/slurm_setup.sh          install if missing, start (or reuse a running cluster of this config), wait idle
#   bash .ci/slurm_setup.sh stop     stop the daemons this script started (by the pids in their pid files)
#
# Environment (defaults make the system-wide cluster that sbatch/sinfo find without settings):
#   FP8PB_SLURM_CONF   slurm.conf to write (default /etc/slurm/slurm.conf; elsewhere, export SLURM_CONF=<it> to use it)
#   FP8PB_SLURM_STATE  state, spool, pid and log files (default /var/spool/fp8pb-slurm)
#   FP8PB_SLURM_PORT   slurmctld port; the nodes listen on the next two (default 17000)
# Exits non-zero with the reason when the cluster cannot be started.
set -euo pipefail
conf=${FP8PB_SLURM_CONF:-/etc/slurm/slurm.conf}
state=${FP8PB_SLURM_STATE:-/var/spool/fp8pb-slurm}
port=${FP8PB_SLURM_PORT:-17000}
export SLURM_CONF=$conf
die() { echo "slurm_setup: $*" >&2; exit 1; }

# Pids of the daemons named by a slurm.conf's pid-file settings, if they still run (not zombies) as slurmctld/slurmd.
conf_pids() {
  [ -f "$conf" ] || return 0
  local ctld node f pid
  ctld=$(sed -n 's/^SlurmctldPidFile=//p' "$conf")
  node=$(sed -n 's/^SlurmdPidFile=//p' "$conf")
  for f in ${ctld:+"$ctld"} $(for n in n1 n2; do [ -n "$node" ] && echo "${node//%n/$n}"; done); do
    pid=$(cat "$f" 2>/dev/null) || continue
    [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" = Z ] && continue
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in slurmctld|slurmd) echo "$pid" ;; esac
  done
}

stop() {
  local pids
  pids=$(conf_pids)
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 30); do
    [ -n "$(conf_pids)" ] || return 0
    sleep 0.5
  done
  die "daemons $pids (from the pid files of $conf) did not stop; stop them and run again"
}

idle_nodes() { sinfo -h -o '%D %t' 2>/dev/null | awk '$2=="idle"{n+=$1} END{print n+0}'; }

if [ "${1:-}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || die "needs root (it installs packages and runs slurmd); run it as root or with sudo"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are missing and apt-get is not here (Debian/Ubuntu only)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed (no network or no Debian mirror?)"
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# munge: one key, one daemon; reused when it already answers
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown -R munge: /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged --force || die "munged did not start; see /var/log/munge/munged.log"
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null 2>&1 || die "munge does not answer after starting munged; see /var/log/munge/munged.log"
fi

host=$(hostname -s)
new_conf=$(cat <<CONF
ClusterName=fp8pb
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
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
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdSpoolDir=$state/slurmd-%n
StateSaveLocation=$state/slurmctld
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=1 RealMemory=2000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=1 RealMemory=2000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
)

if [ -f "$conf" ] && [ "$(cat "$conf")" = "$new_conf" ] && [ "$(idle_nodes)" -ge 2 ]; then
  echo "slurm_setup: the cluster of $conf is already up"; sinfo; exit 0
fi
stop
mkdir -p "$(dirname "$conf")" "$state/slurmctld" "$state/slurmd-n1" "$state/slurmd-n2"
printf '%s\n' "$new_conf" > "$conf"
slurmctld -c || die "slurmctld did not start (port $port in use?); see $state/slurmctld.log"
slurmd -N n1 || die "slurmd -N n1 did not start (port $((port + 1)) in use?); see $state/slurmd-n1.log"
slurmd -N n2 || die "slurmd -N n2 did not start (port $((port + 2)) in use?); see $state/slurmd-n2.log"
for _ in $(seq 60); do
  if [ "$(idle_nodes)" -ge 2 ]; then sinfo; exit 0; fi
  sleep 1
done
sinfo >&2 || true
tail -n 20 "$state"/*.log >&2 || true
die "nodes n1 and n2 did not come up idle within 60 s (logs above)"
