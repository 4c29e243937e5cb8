#!/usr/bin/env bash
# Stops the single-node Slurm cluster of scripts/slurm_up.sh and removes its directory
# ($KVBENCH_SLURM_DIR, default /var/spool/kvbench-slurm): cancels its jobs, stops slurmd, slurmctld
# and munged by their pid files, and removes the /etc/slurm/slurm.conf link if it points there.
# The Debian packages stay installed. Running it again, or with no cluster up, does nothing.
set -euo pipefail

DIR=${KVBENCH_SLURM_DIR:-/var/spool/kvbench-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops the daemon of pid file $1: SIGTERM, then SIGKILL after 20 s.
stop() {
  alive "$1" || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid"
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  echo "slurm_down.sh: pid $pid ignored SIGTERM, killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
}

[ -d "$DIR" ] || { echo "slurm_down.sh: nothing to stop ($DIR does not exist)"; exit 0; }

# Job processes are children of slurmstepd, which outlives slurmd: cancel the jobs while the
# controller still answers, and wait (up to 30 s) for their processes to end.
if alive "$DIR/run/slurmctld.pid"; then
  scancel --quiet --partition=debug || true
  for _ in $(seq 30); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
    sleep 1
  done
fi
stop "$DIR/run/slurmd.pid"
stop "$DIR/run/slurmctld.pid"
stop "$DIR/run/munged.pid"

if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$SLURM_CONF" ]; then
  rm -f /etc/slurm/slurm.conf
fi
rm -rf "$DIR"
echo "slurm_down.sh: stopped; $DIR removed"
