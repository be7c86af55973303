#!/bin/bash
# Set everything up on a fresh Debian machine and run the main job: libvirt + QEMU from Debian, kvmhooks
# (install.sh), libvirtd (re)started so it sees the hook, kvmhooksd, then an annotated demo VM under TCG.  As root:
#   sudo bash demo.sh            (demo.sh --keep leaves the demo VM running)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/host-deps.sh
./install.sh --no-reload
bash scripts/start-libvirtd.sh
bash scripts/start-agent.sh    # kvmhooksd: the demo VM is tuned by it (the hook's worker would do it too)
exec /usr/local/bin/kvmhooks demo "$@"
