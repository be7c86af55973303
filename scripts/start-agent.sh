#!/bin/bash
# Start kvmhooksd (the resident agent) the way start-libvirtd.sh starts libvirtd: its systemd unit where
# systemd runs, else in the background with its log in /var/log/kvmhooks/agent.log. Optional: VMs are tuned
# without it (the hook's detached worker), only slower and without live re-tuning. As root.
#
# One agent per host: a running one holds STATE/agent.lock for its lifetime (a second one refuses). A restart
# stops the agent its pid file names (with or without the lock: one from before the lock holds none), waits
# until it has exited and the lock is free (it removes its socket and pid file before it lets go), then
# starts the new one, so demo.sh and upgrades run the code just installed.
# KVMHOOKS_STATE_DIR, KVMHOOKS_AGENT_LOG and KVMHOOKS_BIN stand in for /run/kvmhooks, the log and the
# command (the tests; the agent itself reads its state_dir from the config named by KVMHOOKS_CONFIG).
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
state=${KVMHOOKS_STATE_DIR:-/run/kvmhooks}
log=${KVMHOOKS_AGENT_LOG:-/var/log/kvmhooks/agent.log}
bin=${KVMHOOKS_BIN:-kvmhooks}
lock=$state/agent.lock
if [ -z "${KVMHOOKS_STATE_DIR:-}" ] && [ -d /run/systemd/system ]; then
  systemctl restart kvmhooksd.service  # (systemd stops the old process before it starts the new one)
  exit 0
fi
mkdir -p "$state" "$(dirname "$log")"

# Whether pid $1 is a kvmhooks agent (its command line says so: a recycled pid is left alone).
is_agent() {
  tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -Eq 'kvmhooks(\.cli)? agent'
}

# The running agent's pid: the pid file names a live kvmhooks agent. Lock or no lock: an agent from before
# agent.lock (an upgrade) holds none, and left running beside the new one it would remove the new one's socket
# when it exits. (Its pid file is written once it serves, so a starting agent may hold the lock a moment
# before it is named: the lock wait below covers it.)
named_agent() {
  local pid
  pid=$(cat "$state/agent.pid" 2>/dev/null) || return 1
  case $pid in ''|*[!0-9]*) return 1 ;; esac
  is_agent "$pid" || return 1
  echo "$pid"
}

# Wait up to $2 tenths of a second for agent $1 to exit.
gone() {
  local _
  for _ in $(seq "$2"); do
    is_agent "$1" || return 0
    sleep 0.1
  done
  ! is_agent "$1"
}

old=$(named_agent) || old=
if [ -n "$old" ]; then
  kill "$old" 2>/dev/null || true
  gone "$old" 100 || { kill -9 "$old" 2>/dev/null || true; gone "$old" 50; } || {
    echo "start-agent: kvmhooksd (pid $old) does not stop" >&2; exit 1; }
fi
if ! flock -w 5 "$lock" true; then
  echo "start-agent: another process holds $lock (an agent still starting?); not starting a second one" >&2
  exit 1
fi

setsid "$bin" agent </dev/null >>"$log" 2>&1 &
new=$!
for _ in $(seq 100); do
  pid=$(cat "$state/agent.pid" 2>/dev/null) || pid=
  if [ -n "$pid" ] && [ "$pid" != "$old" ] && [ -S "$state/agent.sock" ] && kill -0 "$pid" 2>/dev/null; then
    exit 0
  fi
  kill -0 "$new" 2>/dev/null || break  # it refused or failed: its log says why
  sleep 0.1
done
echo "start-agent: kvmhooksd did not come up: $(tail -n 1 "$log" 2>/dev/null)" >&2
exit 1
