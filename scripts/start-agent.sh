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
if [ -S /run/kvmhooks/agent.sock ] && python3 - <<'PY' 2>/dev/null; then
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(0.5)
s.connect("/run/kvmhooks/agent.sock")
PY
  echo "start-agent: kvmhooksd already runs"
  exit 0
fi
mkdir -p /var/log/kvmhooks
setsid kvmhooks agent </dev/null >>/var/log/kvmhooks/agent.log 2>&1 &
for _ in $(seq 100); do [ -S /run/kvmhooks/agent.sock ] && exit 0; sleep 0.1; done
echo "start-agent: kvmhooksd did not come up; see /var/log/kvmhooks/agent.log" >&2
exit 1
