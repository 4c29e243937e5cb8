#!/usr/bin/env bash
# Stands up a single-node Slurm cluster on this Debian machine (run as root), for trying kvbench's
# Slurm launcher and for tests/integration/test_slurm.py:
#   - installs slurmctld, slurmd, slurm-client and munge if missing;
#   - starts a private munged and slurmctld + slurmd (SlurmUser root) whose configuration, keys,
#     state, logs and pid files all live under $KVBENCH_SLURM_DIR (default /var/spool/kvbench-slurm),
#     so that scripts/slurm_down.sh can stop them and remove every trace;
#   - links /etc/slurm/slurm.conf to that configuration if no slurm.conf exists there (so sinfo,
#     sbatch and srun need no SLURM_CONF); an existing one is never touched;
#   - waits until `sinfo` shows the node idle.
# Running it again while the cluster is up changes nothing.
# Exit codes: 0 up, 3 the packages cannot be installed here (not root, no apt), 1 anything else.
set -euo pipefail

DIR=${KVBENCH_SLURM_DIR:-/var/spool/kvbench-slurm}
CONF=$DIR/etc/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF

die() { echo "slurm_up.sh: $*" >&2; exit "${2:-1}"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root" 3
  command -v apt-get >/dev/null || die "cannot install ${missing[*]}: no apt-get (not Debian?)" 3
  echo "slurm_up.sh: installing ${missing[*]}"
  # Keep the packages' maintainer scripts from starting system-wide daemons: only the private ones
  # below run, so that slurm_down.sh leaves nothing behind.
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  fi
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
  local rc=0
  "${apt[@]}" >/dev/null || { apt-get update -q >/dev/null && "${apt[@]}" >/dev/null; } || rc=$?
  [ -z "$policy" ] || rm -f "$policy"
  [ "$rc" = 0 ] || die "apt-get install ${missing[*]} failed" 3
}

write_config() {
  # slurmd -C reports this machine's real topology and memory; a node declared with more than it has
  # would be drained by slurmctld.
  local node cpus mem
  node=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs and RealMemory from 'slurmd -C': $node"
  cat >"$CONF" <<EOF
# Written by kvbench scripts/slurm_up.sh; removed by scripts/slurm_down.sh.
ClusterName=kvbench
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that asks for no memory gets its CPUs' share, not the whole node
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
$node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  alive "$DIR/run/munged.pid" && return 0
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  # --force: munged refuses to run as root without it
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  munge -n --socket="$DIR/munge/munge.socket" | unmunge --socket="$DIR/munge/munge.socket" | grep -q "STATUS: *Success" \
    || die "munge -n | unmunge does not succeed (see $DIR/log/munged.log)"
}

wait_idle() {
  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && { echo "slurm_up.sh: node $HOST idle; SLURM_CONF=$CONF"; return 0; }
    sleep 1
  done
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  die "node $HOST not idle after 60 s (state: '${state:-no answer}')"
}

install_packages
[ "$(id -u)" = 0 ] || die "must run as root (the daemons run as root)" 3
mkdir -p "$DIR"/{etc,munge,state,spool,log,run}
chmod 700 "$DIR/munge"
# (re)written unless the controller runs: a stale file may describe another host or memory size
alive "$DIR/run/slurmctld.pid" || write_config
if [ ! -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
  mkdir -p /etc/slurm && ln -s "$CONF" /etc/slurm/slurm.conf
fi
start_munge
alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
wait_idle
