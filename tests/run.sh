#!/bin/bash
# The whole test suite: lint (ruff), types (mypy --strict), unit tests and end-to-end tests against a real
# libvirtd + QEMU (TCG). As root on Debian; installs libvirt/QEMU from Debian's packages when missing.
#   sudo bash tests/run.sh            (extra arguments go to pytest, e.g. tests/unit -k ledger)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

bash scripts/host-deps.sh

VENV=.venv
[ -x $VENV/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $VENV
$VENV/bin/pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff";  $VENV/bin/ruff check .
echo "== mypy";  $VENV/bin/mypy
echo "== pytest (unit + end-to-end)"
exec $VENV/bin/python -m pytest -q -p no:cacheprovider "${@:-tests}"
