"""kvmhooks: tune KVM guests from annotations in their libvirt domain XML.

The package is laid out as parse → plan → apply:

- :mod:`kvmhooks.domain` parses the (untrusted) domain XML and our annotation into frozen dataclasses;
- :mod:`kvmhooks.topology` reads the host (sysfs, procfs) into a snapshot;
- :mod:`kvmhooks.plan` holds pure planners: (spec, topology, ledger) → plan;
- :mod:`kvmhooks.apply` holds thin adapters that touch sysfs, libvirt and QMP;
- :mod:`kvmhooks.hook`, :mod:`kvmhooks.worker` and :mod:`kvmhooks.cli` are the entry points, the only
  places where exceptions become exit codes.
"""

NAMESPACE = "http://kvmhooks.org/xmlns/domain/1.0"
PREFIX = "kvm"
__version__ = "0.1.0"
# cpufreq governors a kernel may offer (Documentation/admin-guide/pm/cpufreq.rst); a name outside this set
# is refused in the annotation rather than found missing at start. Here, not in kvmhooks.annotation: the
# ledger checks a record's governor at every load, and a stop should not import the annotation parser.
GOVERNORS = ("performance", "powersave", "schedutil", "ondemand", "conservative", "userspace")
