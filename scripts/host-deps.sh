#!/bin/bash
# Debian packages kvmhooks, its demo and its tests need: libvirt + QEMU, the Python bindings, what the tiny
# guest is built from, mmdebstrap + e2fsprogs for the systemd test guest (tests/e2e/systemd_guest.py), and
# rt-tests (cyclictest, copied into the guest) + stress-ng (the noisy host) for bench/guest_bench.py, and tini
# (a subreaper for libvirtd where systemd does not run: scripts/start-libvirtd.sh says why).
# Installs only what is missing. As root.
set -euo pipefail
PKGS="libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils python3-libvirt python3-lxml python3-venv
      python3-prometheus-client busybox-static cpio procps mmdebstrap e2fsprogs rt-tests stress-ng tini"
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=$(for p in $PKGS; do installed "$p" || echo "$p"; done)
# The tiny guest's kernel comes from 'apt-get download', which needs package lists.
if [ -n "$missing" ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "host-deps: installing from Debian: $(echo ${missing:-(package lists only)})"
  apt-get update -q >/dev/null
  [ -z "$missing" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
