#!/bin/bash
# The whole test suite: lint (ruff), types (mypy --strict), unit tests and end-to-end tests against a real
# libvirtd + QEMU (TCG). As root on Debian; installs libvirt/QEMU from Debian's packages when missing.
#   sudo bash tests/run.sh            (extra arguments go to pytest, e.g. tests/unit -k ledger)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

PKGS="libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils python3-libvirt python3-lxml python3-venv
      busybox-static cpio procps"
missing=$(for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
# The tiny test guest's kernel comes from 'apt-get download', which needs package lists.
if [ -n "$missing" ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "tests/run.sh: installing from Debian: ${missing:-(package lists only)}"
  apt-get update -q >/dev/null
  [ -z "$missing" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

VENV=.venv
[ -x $VENV/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $VENV
$VENV/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -e "^WARNING: Location" || true

echo "== ruff";  $VENV/bin/ruff check .
echo "== mypy";  $VENV/bin/mypy
echo "== pytest (unit + end-to-end)"
exec $VENV/bin/python -m pytest -q -p no:cacheprovider "${@:-tests}"
