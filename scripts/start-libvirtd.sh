#!/bin/bash
# Start libvirtd so that it sees the kvmhooks hook and the hugetlbfs mounts (it reads both at start).
# With systemd: (re)start the units. Without (containers, CI): start virtlogd/libvirtd by hand, restarting
# a running libvirtd (its VMs keep running; the reconnect hook adopts them). As root.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
if [ -d /run/systemd/system ]; then
  systemctl enable -q --now virtlogd.socket libvirtd.service
  systemctl restart libvirtd.service
else
  mkdir -p /run/libvirt
  # What udev does on a normal host: without it every define/start re-probes QEMU for ~40 s.
  if [ -e /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 660 /dev/kvm; fi
  # The daemons' own pid files say which processes are theirs (never kill by name: not ours to guess).
  running() { [ -s "/run/$1.pid" ] && pid=$(cat "/run/$1.pid") && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$1" ]; }
  running virtlogd || virtlogd -d
  if running libvirtd; then
    kill "$pid"
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    [ ! -e "/proc/$pid" ] || kill -9 "$pid" 2>/dev/null || true
  fi
  # Under tini as a subreaper where it is installed: libvirt daemonizes QEMU, so an exited QEMU is reaped by
  # the nearest subreaper or by pid 1, and libvirt waits for that (it polls the pid every 200 ms until it is
  # gone, zombie or not). A container's pid 1 may reap late: here about once a second, which made every
  # `virsh destroy` take 1-2 s instead of ~0.2 s. tini reaps at once, as systemd does.
  if command -v tini >/dev/null; then
    setsid tini -s -- libvirtd </dev/null >/dev/null 2>&1 &
  else
    libvirtd -d
  fi
fi
for _ in $(seq 300); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "start-libvirtd: libvirtd did not answer within 30 s" >&2
exit 1
