"""The kvmhooks exception hierarchy, rooted in one class.

::

    KvmhooksError                 anything kvmhooks raises on purpose
     ├── XMLInputError            domain XML unsafe, malformed or too large
     ├── AnnotationError          a value in <kvm:tuning> breaks the v1 contract (names VM/element/attr/value)
     ├── DomainConfigError        the domain itself lacks what the annotation needs (e.g. hugepage backing)
     ├── HostError                the host lacks something (no hugetlbfs mount, unsupported page size)
     ├── CapacityError            the host cannot give what the VM asks for (pages, CPUs)
     ├── LockTimeout              the shared ledger stayed locked past its deadline
     ├── LedgerError              the ledger file is unreadable (says how to repair it)
     ├── ConfigError              /etc/kvmhooks/config.toml is invalid
     ├── UsageError               a command line that cannot be carried out as written (CLI)
     ├── NotFound                 no such domain (CLI)
     ├── ConnectError             libvirtd cannot be reached (CLI, worker)
     └── ApplyError               writing to the host (sysfs, libvirt, QMP) failed; wraps the cause
          ├── QMPTransportError   a VM's QMP socket did not answer, in time or in the expected shape
          ├── Unmovable           host isolation: the kernel keeps this IRQ where it is
          └── Gone                host isolation: the setting no longer exists (IRQ freed, CPU unplugged)

Only the entry points (hook, worker, cli) turn these into exit codes and one-line messages. A wrapper
keeps its root cause (``ApplyError(msg, cause)``) and prints as "message: cause", as qemu.qmp does.
"""

from __future__ import annotations

from kvmhooks.units import clip

# How much of a user's value or VM name one error line repeats: enough to recognise it, never a screenful
# (a rejected 5000-digit number once filled one "line" of virsh start's error).
SHOWN_CHARS = 64


class KvmhooksError(Exception):
    """Root of every error kvmhooks raises on purpose.

    ``vm`` names the VM the error is about (the message then begins "VM 'name': "); the hook names the VM
    itself for errors that carry none, so a message never names it twice or not at all.
    """

    def __init__(self, message: str = "", *, vm: str | None = None):
        self.vm = vm
        super().__init__(message if vm is None else f"VM {clip(vm, SHOWN_CHARS)}: {message}")


class XMLInputError(KvmhooksError):
    """The domain XML on stdin (or from a file) was refused before it was looked at."""


class AnnotationError(KvmhooksError):
    """A value in our annotation breaks the v1 contract.

    The message always names the VM, the element, the attribute and the bad value, so the one line that
    reaches ``virsh start`` is enough to fix it.
    """

    def __init__(self, vm: str, element: str, attribute: str | None, value: str | None, reason: str):
        self.element = element
        self.attribute = attribute
        self.value = value
        self.reason = reason
        where = f"<kvm:{element}>" if attribute is None else f"<kvm:{element} {attribute}=...>"
        shown = "" if value is None else f" value {clip(value, SHOWN_CHARS)}"
        super().__init__(f"{where}{shown}: {reason}", vm=vm)


class DomainConfigError(KvmhooksError):
    """The domain definition lacks something the annotation needs; the message says what XML to add."""


class HostError(KvmhooksError):
    """The host lacks something (a hugetlbfs mount, a page size); the message says how to fix it."""


class CapacityError(KvmhooksError):
    """The host cannot give what the VM asks for without starving itself or another VM."""


class LockTimeout(KvmhooksError):
    """The ledger lock was not granted before its deadline (another hook is stuck?)."""


class LedgerError(KvmhooksError):
    """The ledger cannot be read (not JSON, wrong shape, a newer version); ``kvmhooks reconcile`` sets it
    aside and rebuilds it from the running VMs and the pools."""


class ConfigError(KvmhooksError):
    """The host configuration file is invalid."""


class UsageError(KvmhooksError):
    """A command line that cannot be carried out as written (nothing to do, a bad option value)."""


class Abandoned(KvmhooksError):
    """A hook call kvmhooksd served got the ledger lock after its hook stopped waiting: the hook's own Python
    runs it (or ran it already), and a VM whose hook returned may have been started again since; nothing of
    this late call may be committed."""


class NotFound(KvmhooksError):
    """A domain named on the command line does not exist."""


class ConnectError(KvmhooksError):
    """libvirtd cannot be reached; the message says which URI and suggests starting it."""


class ApplyError(KvmhooksError):
    """Touching the host failed; keeps the underlying cause."""

    def __init__(self, message: str, cause: BaseException | None = None):
        self.cause = cause
        super().__init__(message if cause is None else f"{message}: {cause}")


class Unmovable(ApplyError):
    """The kernel refused to move this IRQ (it manages the affinity itself): reported, not retried."""


class Gone(ApplyError):
    """The setting no longer exists (IRQ freed, CPU unplugged): nothing left to change or restore."""


# Error messages quote the peer; this much is enough to recognise it, and keeps the log line bounded.
_MAX_QMP_MESSAGE = 400


class QMPTransportError(ApplyError):
    """The QMP socket could not be reached, did not answer in time, refused a command or answered nonsense.

    The message is always one bounded line: qemu.qmp quotes a malformed reply over several lines, and the
    peer chooses what is in it.
    """

    def __init__(self, message: str, cause: BaseException | None = None):
        full = " ".join((message if cause is None else f"{message}: {cause}").split())
        super().__init__(full if len(full) <= _MAX_QMP_MESSAGE else full[:_MAX_QMP_MESSAGE] + "…")
        self.cause = cause
