"""The migrate/restore filter: an incoming VM is planned for *this* host before its QEMU exists.

libvirt runs ``qemu NAME migrate begin -`` (and ``restore begin -``) on the destination with the source's
migratable XML on stdin and takes stdout as the new definition (empty: unchanged; non-zero exit: the
migration is refused and the VM keeps running on its source). That XML still carries the source's placement
— the ``<cputune>`` kvmhooks pinned there, its ``<numatune>`` nodes — which may name CPUs another VM holds
here, or nodes this host has nothing reserved on. So the filter plans the VM with the very planner prepare
uses, against this host's topology and ledger, records a claim (:func:`kvmhooks.operations.claim`) that
the VM's prepare turns into the reservation, and rewrites host-side placement only:

- ``<cputune>``: vcpupin, emulatorpin, iothreadpin become the plan's (pins kvmhooks does not plan are kept
  when this host has their CPUs online, dropped when it has not); vcpusched is indexed by vCPU, not host
  CPU, and stays as it is;
- ``<numatune>``: kept when it fits here; when it names nodes that this host does not have or cannot give
  the pages on, the VM is planned without it and ``<memory>``/``<memnode>`` nodesets name the nodes chosen;
- ``<vcpu cpuset>``: dropped when it names CPUs this host does not have online.

Nothing the guest sees changes (libvirt's ABI check refuses the XML otherwise): vCPU count, memory sizes,
guest NUMA cells, page size, devices. ``<memoryBacking><hugepages><page nodeset>`` names *guest* cells,
so it stays too. Learned from OpenStack Nova (claim on the destination, rewrite the XML, roll back on
failure) and KubeVirt's target-side migration hooks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lxml import etree

from kvmhooks.config import Config
from kvmhooks.domain import Domain, parse_domain
from kvmhooks.errors import CapacityError, HostError, KvmhooksError
from kvmhooks.ledger import LedgerState
from kvmhooks.log import VMLog
from kvmhooks.operations import Placement, check, claim, ledger_for, topology_for
from kvmhooks.plan import pools as accounting
from kvmhooks.topology import HostTopology
from kvmhooks.units import format_cpuset, parse_cpuset
from kvmhooks.xmlsafe import safe_parse

# Children of <cputune> that follow the pins in libvirt's schema (the parser does not mind the order; a
# validating reader might).
_AFTER_PINS = ("vcpusched", "iothreadsched", "cachetune", "memorytune")
_PINS = ("vcpupin", "emulatorpin", "iothreadpin")


@dataclass(frozen=True)
class Incoming:
    """The filter's result: the placement, the XML to print (b"" when nothing changed) and what changed."""

    placement: Placement
    xml: bytes
    changes: tuple[str, ...]


def place(dom: Domain, topo: HostTopology, state: LedgerState, cfg: Config) -> Placement:
    """Plan ``dom`` on this host as prepare would (``state`` must not hold the VM's own record): first as
    its XML says; if its ``<numatune>`` names nodes this host lacks or cannot give the pages on, without it.
    Raises the refusal of the last try when neither fits (what stops the VM here even re-planned). Pure."""
    tries = [dom]
    if dom.numatune_nodes is not None or dom.memnodes:
        tries.append(dataclasses.replace(dom, numatune_nodes=None, numatune_mode=None, memnodes={}))
    refusal: KvmhooksError | None = None
    for d in tries:
        try:
            hp, cpus = check(d, cfg, topo, state)
            if hp is not None:
                view = accounting.after_claims(topo, state, d.uuid)
                problems = accounting.reservation_problems(state, view, cfg, d.uuid, hp.pools())
                if problems:
                    if hp.required:
                        raise CapacityError("not enough memory for huge pages: " + "; ".join(problems), vm=d.name)
                    hp = None  # required="no": it starts without reserved pages, as at prepare
            return Placement(d, hp, cpus, relaxed=d is not dom)
        except (CapacityError, HostError) as e:  # the VM's own mistakes (annotation, domain) are final at once
            refusal = e
    assert refusal is not None
    raise refusal


def incoming(data: bytes, cfg: Config, dry_run: bool = False) -> Incoming | None:
    """Plan, claim (not in a dry run) and rewrite an incoming VM; None for a VM kvmhooks does not tune.

    The dry run (``kvmhooks plan --incoming``) plans against a snapshot of the ledger, holding nothing."""
    dom = parse_domain(data)  # refuses oversize or unsafe XML
    if dom.active_tuning is None:
        return None
    if dry_run:
        state = ledger_for(cfg).read()
        if dom.uuid in state.domains:
            del state.domains[dom.uuid]
        placed = place(dom, topology_for(cfg), state, cfg)
        topo = topology_for(cfg)
    else:
        captured: list[HostTopology] = []

        def plan_here(topo: HostTopology, st: LedgerState) -> Placement:
            captured.append(topo)
            return place(dom, topo, st, cfg)

        placed, _ = claim(dom, cfg, plan_here)
        topo = captured[0]
    xml, changes = rewrite(data, placed, topo)
    if not dry_run:
        VMLog(dom.name, dom.uuid).info("incoming: %s", "; ".join(changes) or "placement unchanged")
    return Incoming(placed, xml, tuple(changes))


# --- the rewrite ------------------------------------------------------------------------------------------

def rewrite(data: bytes, placed: Placement, topo: HostTopology) -> tuple[bytes, list[str]]:
    """The domain XML with host-side placement set to ``placed``; b"" when nothing changed, and a line for
    every change."""
    root = safe_parse(data)
    changes: list[str] = []
    _rewrite_cputune(root, placed, topo, changes)
    if placed.relaxed:
        _rewrite_numatune(root, placed, topo, changes)
    vcpu = root.find("vcpu")
    if vcpu is not None and vcpu.get("cpuset"):
        try:
            stale = parse_cpuset(vcpu.get("cpuset", "")) - topo.online
        except ValueError:
            stale = frozenset({-1})
        if stale:
            changes.append(f"<vcpu cpuset='{vcpu.get('cpuset')}'> dropped (CPUs not online here)")
            del vcpu.attrib["cpuset"]
    if not changes:
        return b"", []
    return etree.tostring(root, encoding="utf-8"), changes


def _pin(tag: str, cpus: frozenset[int], **attrs: str) -> etree._Element:
    el = etree.Element(tag, {**attrs, "cpuset": format_cpuset(cpus)})
    return el


def _describe(el: etree._Element) -> str:
    who = {"vcpupin": f"vCPU {el.get('vcpu')}", "emulatorpin": "emulator",
           "iothreadpin": f"iothread {el.get('iothread')}"}[str(el.tag)]
    return f"{who} on CPUs {el.get('cpuset')}"


def _rewrite_cputune(root: etree._Element, placed: Placement, topo: HostTopology, changes: list[str]) -> None:
    ct = root.find("cputune")
    before = {(str(e.tag), e.get("vcpu") or e.get("iothread") or ""): e.get("cpuset") or ""
              for e in (ct if ct is not None else []) if e.tag in _PINS}
    plan = placed.cpus
    if plan is None:  # kvmhooks places no CPU of this VM: only pins this host cannot honour go
        if ct is None:
            return
        for e in [e for e in ct if e.tag in _PINS]:
            if not _valid_here(e.get("cpuset"), topo):
                changes.append(f"<cputune> {_describe(e)} dropped (not online here)")
                ct.remove(e)
        return
    if ct is None:
        ct = etree.Element("cputune")
        anchor = root.find("iothreads")
        anchor = anchor if anchor is not None else root.find("vcpu")
        if anchor is not None:
            anchor.addnext(ct)
        else:
            root.append(ct)
    planned_threads = set(plan.iothreads)
    kept = []
    for e in [e for e in ct if e.tag in _PINS]:
        iothread = e.get("iothread")
        if (e.tag == "iothreadpin" and iothread is not None and iothread.isdecimal()
                and int(iothread) not in planned_threads and _valid_here(e.get("cpuset"), topo)):
            kept.append(e)  # an iothread kvmhooks does not place, on CPUs this host has
        ct.remove(e)
    pins = [_pin("vcpupin", c, vcpu=str(v)) for v, c in sorted(plan.vcpus.items())]
    if plan.emulator:
        pins.append(_pin("emulatorpin", plan.emulator))
    pins += kept + [_pin("iothreadpin", c, iothread=str(i)) for i, c in sorted(plan.iothreads.items())]
    later = next((e for e in ct if e.tag in _AFTER_PINS), None)
    for p in pins:
        if later is not None:
            later.addprevious(p)
        else:
            ct.append(p)
    after = {(str(e.tag), e.get("vcpu") or e.get("iothread") or ""): e.get("cpuset") or "" for e in pins}
    if after != before:
        was = ", ".join(f"{_label(k)} {v}" for k, v in sorted(before.items())) or "none"
        now = ", ".join(f"{_label(k)} {v}" for k, v in sorted(after.items()))
        changes.append(f"<cputune> pins {now} (were {was})")
    if len(ct) == 0 and not ct.attrib:
        root.remove(ct)


def _label(key: tuple[str, str]) -> str:
    tag, n = key
    return {"vcpupin": f"vCPU {n}", "emulatorpin": "emulator", "iothreadpin": f"iothread {n}"}[tag]


def _valid_here(cpuset: str | None, topo: HostTopology) -> bool:
    try:
        cpus = parse_cpuset(cpuset or "")
    except ValueError:
        return False
    return bool(cpus) and cpus <= topo.online


def _rewrite_numatune(root: etree._Element, placed: Placement, topo: HostTopology, changes: list[str]) -> None:
    """<numatune> for the nodes chosen here: the huge pages' nodes (per guest cell), else the dedicated
    CPUs' nodes; without either, no binding at all (the source's named nodes this host cannot serve)."""
    nt = root.find("numatune")
    if nt is None:
        return
    old = etree.tostring(nt, encoding="unicode").strip()
    hp, cpus, dom = placed.hugepages, placed.cpus, placed.dom
    nodes: frozenset[int] = frozenset()
    cells: dict[int, frozenset[int]] = {}
    if hp is not None and hp.pages:
        nodes = frozenset(n for n, p in hp.pages.items() if p)
        cells = {c: frozenset({n}) for c, n in hp.cells.items()}
    elif cpus is not None and cpus.dedicated:
        nodes = cpus.nodes
        for cell in dom.cells:
            here = frozenset(topo.cpus[c].node for v in cell.cpus for c in cpus.vcpus.get(v, frozenset())
                             if c in topo.cpus)
            if here:
                cells[cell.id] = here
    if not nodes:
        root.remove(nt)
        changes.append(f"{old} dropped: its nodes cannot serve this VM here")
        return
    mem = nt.find("memory")
    if mem is not None and mem.get("placement") != "auto":
        mem.set("nodeset", format_cpuset(nodes))
    for mn in list(nt.iterfind("memnode")):
        cell_id = mn.get("cellid")
        got = cells.get(int(cell_id)) if cell_id is not None and cell_id.isdecimal() else None
        if got:
            mn.set("nodeset", format_cpuset(got))
        else:
            nt.remove(mn)
    changes.append(f"{old} → {etree.tostring(nt, encoding='unicode').strip()}")

