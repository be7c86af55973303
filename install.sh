#!/bin/bash
# install.sh — install (or with --uninstall, remove) kvmhooks on a libvirt host. Idempotent; as root.
#
#   ./install.sh                 venv + package, hook, config skeleton, hugetlbfs mounts, `kvmhooks` on PATH
#   ./install.sh --uninstall     remove all of it again and restore a hook we replaced
#
# Options: --prefix DIR (default /opt/kvmhooks), --hook qemu|qemu.d (default: qemu.d on libvirt >= 6.5),
#          --replace-hook (allow moving an existing non-kvmhooks /etc/libvirt/hooks/qemu aside),
#          --no-apt (do not install Debian packages), --no-reload (leave a running libvirtd alone),
#          --hooks-dir DIR, --conf-dir DIR, --bin-link PATH, --state-dir DIR (other locations; the tests
#          use them), --force (uninstall even while VMs hold reservations).
set -euo pipefail

PREFIX=/opt/kvmhooks
HOOKS=/etc/libvirt/hooks
CONF_DIR=/etc/kvmhooks
BIN_LINK=/usr/local/bin/kvmhooks
STATE_DIR=/run/kvmhooks
force=no
STATE_FILE=""        # set after option parsing
MARKER="kvmhooks: libvirt qemu hook"
FSTAB_MARK="# added by kvmhooks install.sh"
mode=install
hook_mode=""
replace_hook=no
use_apt=yes
reload=yes
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall) mode=uninstall ;;
    --prefix) PREFIX=$2; shift ;;
    --hook) hook_mode=$2; shift ;;
    --replace-hook) replace_hook=yes ;;
    --no-apt) use_apt=no ;;
    --no-reload) reload=no ;;
    --hooks-dir) HOOKS=$2; shift ;;
    --conf-dir) CONF_DIR=$2; shift ;;
    --bin-link) BIN_LINK=$2; shift ;;
    --state-dir) STATE_DIR=$2; shift ;;
    --force) force=yes ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
STATE_FILE=$PREFIX/install.state

say() { echo "kvmhooks install: $*"; }
die() { echo "kvmhooks install: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

systemd_running() { [ -d /run/systemd/system ]; }

reload_libvirtd() {
  # libvirtd finds hook scripts at start and at reload (SIGHUP); hugetlbfs mounts only at start.
  [ "$reload" = yes ] || return 0
  local need_restart=$1
  if systemd_running && systemctl is-active -q libvirtd 2>/dev/null; then
    if [ "$need_restart" = yes ]; then systemctl restart libvirtd; say "restarted libvirtd";
    else systemctl reload libvirtd; say "reloaded libvirtd"; fi
  elif pid=$(pgrep -x libvirtd); then
    kill -HUP $pid
    say "sent SIGHUP to libvirtd (pid $pid) so it re-reads its hooks"
    if [ "$need_restart" = yes ]; then
      say "NOTE: a hugetlbfs mount was added: restart libvirtd before starting hugepage-backed VMs"
    fi
  fi
}

libvirt_version() {  # prints e.g. 9000000, or 0 when unknown
  local v
  v=$(libvirtd --version 2>/dev/null | awk '{print $NF}') || true
  [ -n "$v" ] || { echo 0; return; }
  IFS=. read -r a b c <<<"$v"
  echo $(( ${a:-0} * 1000000 + ${b:-0} * 1000 + ${c:-0} ))
}

install_deps() {
  [ "$use_apt" = yes ] && command -v apt-get >/dev/null || return 0
  local missing=()
  for p in python3-venv python3-libvirt python3-lxml python3-prometheus-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
           --no-install-recommends "${missing[@]}" >/dev/null; }
  fi
}

install_package() {
  # A venv that sees Debian's python3-libvirt and python3-lxml (no compiler needed), plus qemu.qmp from PyPI.
  if [ ! -x "$PREFIX/venv/bin/python3" ]; then
    mkdir -p "$PREFIX"
    /usr/bin/python3 -m venv --system-site-packages "$PREFIX/venv"
  fi
  "$PREFIX/venv/bin/pip" install -q --disable-pip-version-check --upgrade "$SRC" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "is ignored" || true
  "$PREFIX/venv/bin/python3" -c "import kvmhooks.hook, libvirt, lxml, qemu.qmp" \
    || die "the kvmhooks venv cannot import its dependencies"
  # An upgrade while VMs run: give the ledger's records their held/ markers (the shell hook's lookup at stop).
  "$PREFIX/venv/bin/python3" -c "from kvmhooks.config import load_config; from kvmhooks.ledger import Ledger; \
Ledger(load_config().ledger_path, 10).sync_markers()" || say "warning: could not mark the ledger's VMs"
  ln -sfn "$PREFIX/venv/bin/kvmhooks" "$BIN_LINK"
  say "package installed in $PREFIX/venv; 'kvmhooks' is $BIN_LINK"
}

is_ours() { [ -f "$1" ] && grep -q "$MARKER" "$1"; }

choose_hook_mode() {
  # Decided (and a conflict refused) before anything is installed, so a refusal leaves the host as it was.
  if [ -z "$hook_mode" ]; then
    if [ "$(libvirt_version)" -ge 6005000 ] || [ "$(libvirt_version)" = 0 ]; then hook_mode=qemu.d; else hook_mode=qemu; fi
  fi
  case "$hook_mode" in
    qemu.d) ;;
    qemu) if [ -e "$HOOKS/qemu" ] && ! is_ours "$HOOKS/qemu" && [ "$replace_hook" != yes ]; then
            die "$HOOKS/qemu exists and is not ours; use --hook qemu.d (libvirt >= 6.5) \
or --replace-hook to move it to $HOOKS/qemu.kvmhooks-orig"
          fi ;;
    *) die "--hook takes qemu or qemu.d" ;;
  esac
}

install_hook() {
  local target backup=""
  mkdir -p "$HOOKS"
  case "$hook_mode" in
    qemu.d) mkdir -p "$HOOKS/qemu.d"; target=$HOOKS/qemu.d/kvmhooks ;;
    qemu) target=$HOOKS/qemu
      if [ -e "$target" ] && ! is_ours "$target"; then
        backup=$target.kvmhooks-orig
        mv "$target" "$backup"
        say "moved your existing hook to $backup (restored by --uninstall)"
      fi ;;
  esac
  # Install atomically: libvirtd may run the hook at any moment.
  sed "s|^PYTHON=.*|PYTHON=$PREFIX/venv/bin/python3|" "$SRC/hooks/qemu" > "$target.tmp"
  chmod 755 "$target.tmp"
  mv -f "$target.tmp" "$target"
  # If we moved from one location to the other, do not leave a second copy running.
  for other in "$HOOKS/qemu" "$HOOKS/qemu.d/kvmhooks"; do
    [ "$other" != "$target" ] && is_ours "$other" && rm -f "$other"
  done
  printf 'hook=%s\nbackup=%s\n' "$target" "$backup" > "$STATE_FILE.tmp"
  # Keep the first backup we ever made.
  if [ -f "$STATE_FILE" ] && grep -q '^backup=.' "$STATE_FILE" && [ -z "$backup" ]; then
    sed -i "s|^backup=.*|$(grep '^backup=' "$STATE_FILE")|" "$STATE_FILE.tmp"
  fi
  mv "$STATE_FILE.tmp" "$STATE_FILE"
  say "hook installed as $target"
}

install_logrotate() {
  [ -d /etc/logrotate.d ] || return 0
  cat > /etc/logrotate.d/kvmhooks <<ROTATE
$FSTAB_MARK
/var/log/kvmhooks/*.log {
    weekly
    rotate 8
    compress
    missingok
    notifempty
}
ROTATE
}

install_config() {
  mkdir -p "$CONF_DIR" /var/log/kvmhooks
  if [ ! -f "$CONF_DIR/config.toml" ]; then
    cat > "$CONF_DIR/config.toml" <<'TOML'
# kvmhooks host configuration. Every setting is optional; the values shown are the defaults.

# Seconds a hook waits for the shared ledger lock before failing the VM start.
#lock_timeout = 30
# Seconds prepare keeps reclaiming memory when the kernel gives fewer huge pages than asked.
#retry_timeout = 10
# Memory per NUMA node that huge page reservations never take.
#host_reserve = "1G"
# Pools kvmhooks never resizes (VMs may still use free pages the admin put there), e.g. ["node0/1G"].
#leave_alone = []
# Where logs go: "syslog", or a file path. Never stdout.
#log = "/var/log/kvmhooks/kvmhooks.log"
#log_level = "INFO"
#libvirt_uri = "qemu:///system"
# Seconds the post-start worker waits for a VM to be running.
#worker_timeout = 60
# Seconds the worker waits for a guest's balloon driver before leaving its memory alone.
#balloon_timeout = 120
# The automatic balloon service (kvmhooks balloond): cycle, largest step, host memory use that squeezes guests.
#balloon_interval = 10
#balloon_step = "100M"
#balloon_host_target = 0.8

#[cpu]
# Host CPUs automatic placement may hand out (default: all online CPUs minus housekeeping).
#allowed = "2-15"
# CPUs kept for the host itself; never dedicated to a VM.
#housekeeping = "0"
TOML
    say "wrote $CONF_DIR/config.toml (all defaults)"
  fi
}

ensure_mount() {  # $1 mount point, $2 pagesize option or "", returns 0 when it mounted something new
  local dir=$1 opt=$2
  mkdir -p "$dir"
  if ! mountpoint -q "$dir"; then
    mount -t hugetlbfs ${opt:+-o pagesize=$opt} hugetlbfs "$dir"
    say "mounted hugetlbfs on $dir${opt:+ (pagesize=$opt)}"
    newly_mounted=yes
  fi
  if systemd_running; then
    [ "$dir" = /dev/hugepages ] && return 0   # systemd's own dev-hugepages.mount
    local unit
    unit=$(systemd-escape -p --suffix=mount "$dir")
    if [ ! -f "/etc/systemd/system/$unit" ]; then
      cat > "/etc/systemd/system/$unit" <<UNIT
$FSTAB_MARK
[Unit]
Description=Huge pages file system ($opt) for kvmhooks
Before=libvirtd.service
[Mount]
What=hugetlbfs
Where=$dir
Type=hugetlbfs
Options=pagesize=$opt
[Install]
WantedBy=multi-user.target
UNIT
      systemctl daemon-reload && systemctl enable -q "$unit"
    fi
  elif ! awk -v d="$dir" '$2 == d && $3 == "hugetlbfs"' /etc/fstab | grep -q .; then
    echo "hugetlbfs $dir hugetlbfs ${opt:+pagesize=$opt,}mode=1770,gid=kvm 0 0 $FSTAB_MARK" >> /etc/fstab
    say "added $dir to /etc/fstab"
  fi
}

install_service() {
  # kvmhooksd, the resident agent (fast post-start tuning, live re-tuning, the automatic balloon): a systemd
  # unit where systemd runs; elsewhere the admin starts 'kvmhooks agent' as they start libvirtd. VMs are
  # tuned without it too (the hook's detached worker), only slower and without live re-tuning.
  # (start-agent.sh, not 'kvmhooks agent &': on an upgrade it stops the running agent first, even one from
  # before agent.lock, which a second 'kvmhooks agent' would run beside.)
  systemd_running || { say "no systemd: start (after an upgrade: restart) the agent with $SRC/scripts/start-agent.sh (optional: VMs are tuned without it)"; return 0; }
  if [ -f /etc/systemd/system/kvmhooks-balloond.service ]; then  # before the agent absorbed it
    systemctl disable -q --now kvmhooks-balloond.service 2>/dev/null || true
    rm -f /etc/systemd/system/kvmhooks-balloond.service
  fi
  cat > /etc/systemd/system/kvmhooksd.service <<UNIT
$FSTAB_MARK
[Unit]
Description=kvmhooks agent: post-start and live tuning of annotated libvirt VMs, automatic memory balloon
After=libvirtd.service
Wants=libvirtd.service
[Service]
ExecStart=$PREFIX/venv/bin/kvmhooks agent
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
  # --now starts it; try-restart makes a running one (an upgrade) run the code just installed.
  systemctl daemon-reload && systemctl enable -q --now kvmhooksd.service && systemctl try-restart kvmhooksd.service
  say "kvmhooksd.service enabled"
}

install_mounts() {
  newly_mounted=no
  ensure_mount /dev/hugepages ""
  if [ -d /sys/kernel/mm/hugepages/hugepages-1048576kB ]; then
    ensure_mount /dev/hugepages1G 1G
  fi
}

uninstall() {
  local hook="" backup=""
  # The ledger is the only record of which pages and CPUs running VMs hold: never drop it under them.
  if [ -s "$STATE_DIR/ledger.json" ] && grep -q '"name"' "$STATE_DIR/ledger.json" && [ "$force" != yes ]; then
    die "VMs still hold reservations in $STATE_DIR/ledger.json (see 'kvmhooks status'); stop them \
(then 'kvmhooks reconcile') first, or use --force"
  fi
  if [ -f "$STATE_FILE" ]; then
    hook=$(sed -n 's/^hook=//p' "$STATE_FILE"); backup=$(sed -n 's/^backup=//p' "$STATE_FILE")
  fi
  for h in "$hook" "$HOOKS/qemu" "$HOOKS/qemu.d/kvmhooks"; do
    [ -n "$h" ] && is_ours "$h" && rm -f "$h" && say "removed hook $h"
  done
  if [ -n "$backup" ] && [ -f "$backup" ]; then
    mv "$backup" "$HOOKS/qemu" && say "restored your hook $HOOKS/qemu"
  fi
  [ -L "$BIN_LINK" ] && rm -f "$BIN_LINK"
  if [ -f /etc/fstab ] && grep -q "$FSTAB_MARK" /etc/fstab; then
    sed -i "\|$FSTAB_MARK|d" /etc/fstab && say "removed our /etc/fstab lines (mounts stay until reboot)"
  fi
  local units_removed=no
  for unit in kvmhooks-balloond.service kvmhooksd.service; do
    if [ -f "/etc/systemd/system/$unit" ]; then
      systemctl disable -q --now "$unit" 2>/dev/null || true
      rm -f "/etc/systemd/system/$unit"
      units_removed=yes
    fi
  done
  for u in /etc/systemd/system/*.mount; do
    if [ -f "$u" ] && grep -q "$FSTAB_MARK" "$u"; then
      systemctl disable -q "$(basename "$u")" 2>/dev/null || true
      rm -f "$u"
      units_removed=yes
      say "removed $(basename "$u") (the mount stays until reboot)"
    fi
  done
  # systemd keeps a deleted unit file's unit loaded, and warns about it, until it reads its files again.
  if [ "$units_removed" = yes ] && systemd_running; then systemctl daemon-reload; fi
  [ -f /etc/logrotate.d/kvmhooks ] && grep -q "$FSTAB_MARK" /etc/logrotate.d/kvmhooks && rm -f /etc/logrotate.d/kvmhooks
  rm -rf "$PREFIX" "$CONF_DIR" "$STATE_DIR"
  say "uninstalled (logs kept in /var/log/kvmhooks)"
  reload_libvirtd no
}

if [ "$mode" = uninstall ]; then uninstall; exit 0; fi
choose_hook_mode
install_deps
install_package
install_config
install_logrotate
install_mounts
install_hook
install_service
reload_libvirtd "$newly_mounted"
say "done. Annotate a VM (see README) or run 'kvmhooks host' to see what kvmhooks sees."
