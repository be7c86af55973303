#!/bin/bash
# The whole test suite: lint (ruff), types (mypy --strict), unit tests and end-to-end tests against a real
# libvirtd + QEMU (TCG). As root on Debian; installs libvirt/QEMU from Debian's packages when missing.
#   sudo bash tests/run.sh            (extra arguments go to pytest, e.g. tests/unit -k ledger)
# Without arguments the systemd test guest (tests/e2e/test_systemd_e2e.py: its own QEMU, no host libvirtd,
# three minutes of TCG) runs beside the rest, and the last line sums both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

bash scripts/host-deps.sh

VENV=.venv
[ -x $VENV/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $VENV
$VENV/bin/pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff";  $VENV/bin/ruff check .
echo "== mypy";  $VENV/bin/mypy
PYTEST=($VENV/bin/python -m pytest -q -p no:cacheprovider)
if [ $# -gt 0 ]; then
  echo "== pytest $*"
  exec "${PYTEST[@]}" "$@"
fi

out=$(mktemp -d /tmp/kvmhooks-tests.XXXXXX)
echo "== pytest: the systemd guest, in the background (its output below when done)"
"${PYTEST[@]}" -m systemd --junitxml="$out/systemd.xml" tests/e2e >"$out/systemd.log" 2>&1 &
guest=$!
echo "== pytest (unit + end-to-end)"
rc=0
"${PYTEST[@]}" -m "not systemd" --junitxml="$out/main.xml" tests || rc=$?
rc_guest=0
wait $guest || rc_guest=$?
echo "== pytest: the systemd guest"
cat "$out/systemd.log"
# One closing line for both runs (junit counts: tests, failures, errors, skipped).
$VENV/bin/python - "$out/main.xml" "$out/systemd.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

passed = failed = skipped = 0
for path in sys.argv[1:]:
    try:
        suites = ET.parse(path).getroot().iter("testsuite")
    except (OSError, ET.ParseError):
        failed += 1  # a run that wrote no report failed
        continue
    for s in suites:
        t, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += t - f - e - sk
        failed += f + e
        skipped += sk
print(f"{passed} passed, {failed} failed, {skipped} skipped")
EOF
rm -rf "$out"
[ $rc -eq 0 ] && [ $rc_guest -eq 0 ]
