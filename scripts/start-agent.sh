#!/bin/bash
# Start kvmhooksd (the resident agent) the way start-libvirtd.sh starts libvirtd: its systemd unit where
# systemd runs, else in the background with its log in /var/log/kvmhooks/agent.log. Optional: VMs are tuned
# without it (the hook's detached worker), only slower and without live re-tuning. As root.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
if [ -d /run/systemd/system ]; then
  systemctl restart kvmhooksd.service
  exit 0
fi
# A running agent (its own pid file says which process) is restarted, so it runs the code just installed.
if [ -s /run/kvmhooks/agent.pid ]; then
  pid=$(cat /run/kvmhooks/agent.pid)
  case $pid in ''|*[!0-9]*) pid= ;; esac
  if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "kvmhooks agent"; then
    kill "$pid"
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    [ ! -e "/proc/$pid" ] || kill -9 "$pid" 2>/dev/null || true
  fi
fi
rm -f /run/kvmhooks/agent.sock  # (a killed agent leaves it; waiting below must see the new one)
mkdir -p /var/log/kvmhooks
setsid kvmhooks agent </dev/null >>/var/log/kvmhooks/agent.log 2>&1 &
for _ in $(seq 100); do [ -S /run/kvmhooks/agent.sock ] && exit 0; sleep 0.1; done
echo "start-agent: kvmhooksd did not come up; see /var/log/kvmhooks/agent.log" >&2
exit 1
