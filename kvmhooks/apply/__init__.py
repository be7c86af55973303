"""Thin adapters that touch the host: sysfs hugepage pools, libvirt, QMP. Each can read back and undo."""
